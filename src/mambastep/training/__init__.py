"""Training: ``train(TrainSettings(...))``, the library side of ``mambastep train``.

settings  DataSettings, OptimSettings, TrainSettings, TrainingError
data      files -> checked text -> split by file -> tokens -> lanes (one shard per process)
optim     AdamW (decay on matrices only), warm-up + cosine
init      how a model starts: initialised from scratch, or deepened from a trained one
budget    memory estimate before anything is allocated
checkpoint  out/model (for mambastep.load) and out/train_state.pt (exact resume)
report    log.json, curve.png, gzip/xz baselines
distributed torchrun placement, gloo/nccl, collectives
loss      the next-token loss, read from 16-bit logits block by block
loop      the run itself
"""

from mambastep.training.loop import train
from mambastep.training.settings import DataSettings, OptimSettings, TrainingError, TrainSettings

__all__ = ["DataSettings", "OptimSettings", "TrainSettings", "TrainingError", "train"]
