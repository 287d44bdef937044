"""Training settings: what to read, how to optimise, how to run.

Three typed objects, kept apart from the model's config (what the model is)
and from the engine's settings (how a trained model runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PRECISIONS = ("fp32", "bf16")
WINDOW_STARTS = ("tokens", "lines")
BPE_PREFIX = "bpe:"  # tokenizer "bpe:N": learn a byte-level BPE of N tokens from the training split
BPE_MIN_VOCAB = 257  # the 256 bytes and the end-of-sequence token


class TrainingError(ValueError):
    """Training inputs or settings that cannot work; raised before any training step."""


def _check(obj: Any, name: str, low: float, high: float | None = None, integer: bool = True) -> None:
    value = getattr(obj, name)
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise TrainingError(f"{name} must be {'an integer' if integer else 'a number'} {bounds}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise TrainingError(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class DataSettings:
    """Which text to train on, and how it is cut.

    paths: text files and folders (folders are searched recursively).
    include / exclude: glob patterns on each file's path relative to its folder;
        a file is read when it matches an include pattern and no exclude pattern.
    skip_binary: leave out files that are not UTF-8 text (else they are an error).
    tokenizer: "bytes" (byte-level), "bpe:N" (a byte-level BPE tokenizer of N tokens learned
        from the training side of the split, saved with the model), a tokenizer.json file or a
        checkpoint directory; None takes the fine-tuned checkpoint's tokenizer, or "bytes".
    holdout: share of files held out for evaluation, chosen by a hash of
        ``f"{seed}/{relative path}"``, so the split never depends on the order files are found in.
    seed: seeds the split, the model's initialisation and the training windows' offsets.
    window_seed: seeds the training windows' offsets instead, where given: a run that goes on
        from a checkpoint (``init``) reads other windows than the run that made it, on the same split.
    seq_len: tokens per training window; each starts from a fresh state.
    window_starts: "tokens" (a training window may start at any token) or "lines" (only where a
        line starts, its indentation included, as a prompt does; see ``mambastep.training.data``).
    """

    paths: tuple[str, ...]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    skip_binary: bool = False
    tokenizer: str | None = None
    holdout: float = 0.05
    seed: int = 0
    window_seed: int | None = None
    seq_len: int = 512
    window_starts: Literal["tokens", "lines"] = "tokens"

    def __post_init__(self):
        for name in ("paths", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise TrainingError(f"{name} must be a sequence of non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.paths:
            raise TrainingError("no training data given: pass at least one text file or folder")
        if not self.include:
            raise TrainingError("include must hold at least one pattern, e.g. '*.py'")
        _check(self, "holdout", 0.0, 0.5, integer=False)
        _check(self, "seed", 0, 2**31 - 1)
        if self.window_seed is not None:
            _check(self, "window_seed", 0, 2**31 - 1)
        _check(self, "seq_len", 2)
        if self.window_starts not in WINDOW_STARTS:
            raise TrainingError(f"window_starts must be one of {WINDOW_STARTS}, got {self.window_starts!r}")
        _bpe_vocab_size(self.tokenizer)  # a malformed "bpe:N" fails here

    @property
    def offsets_seed(self) -> int:
        """The seed of the training windows' offsets."""
        return self.seed if self.window_seed is None else self.window_seed

    @property
    def bpe_vocab_size(self) -> int | None:
        """N of a "bpe:N" tokenizer, else None."""
        return _bpe_vocab_size(self.tokenizer)


def _bpe_vocab_size(tokenizer: str | None) -> int | None:
    """N of a "bpe:N" tokenizer, else None.

    Raises:
        TrainingError: "bpe:" followed by anything but a whole number of at least ``BPE_MIN_VOCAB``.
    """
    if tokenizer is None or not tokenizer.startswith(BPE_PREFIX):
        return None
    size = tokenizer.removeprefix(BPE_PREFIX)
    if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
        raise TrainingError(
            f"tokenizer {tokenizer!r}: {BPE_PREFIX}N needs a whole number N of at least "
            f"{BPE_MIN_VOCAB} (the 256 bytes and an end-of-sequence token), e.g. {BPE_PREFIX}8192"
        )
    return int(size)


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warm-up and cosine decay, and gradient clipping.

    Weight decay applies to matrices only (not to norms, biases, A_log, D or the dt bias).
    The learning rate rises linearly over ``warmup_steps``, then follows a cosine
    from ``lr`` down to ``lr * min_lr_ratio`` at the last step.
    ``grad_clip`` bounds the global gradient norm; 0 turns clipping off.
    """

    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        _check(self, "lr", 0.0, integer=False)
        _check(self, "min_lr_ratio", 0.0, 1.0, integer=False)
        _check(self, "warmup_steps", 0)
        _check(self, "weight_decay", 0.0, integer=False)
        _check(self, "beta1", 0.0, 1.0, integer=False)
        _check(self, "beta2", 0.0, 1.0, integer=False)
        _check(self, "eps", 0.0, integer=False)
        _check(self, "grad_clip", 0.0, integer=False)


@dataclass(frozen=True)
class TrainSettings:
    """One training run.

    out: folder for the model (out/model, readable by ``mambastep.load``), the
        training state (out/train_state.pt, for exact resume), log.json and curve.png.
    config: a built-in configuration name or a JSON file (a config.json in the Hugging
        Face or the state-spaces format); exactly one of ``config`` and ``init``.
    init: a checkpoint to fine-tune (its config and weights).
    n_layer: with ``init``, the depth to deepen it to first (``training.init.deepen``: new layers
        copy its own, with output projections at zero); None keeps its depth.
    steps: optimiser steps in the whole run (the schedule's length). A resumed run may change it:
        a larger value extends a run, finished or not, and from the step it resumes at the learning
        rate follows the schedule over the new length.
    batch_size: sequences per step, over all processes (each process takes an equal share).
    precision: "bf16" runs the forward pass under bfloat16 autocast (weights and
        optimiser stay float32).
    eval_every / checkpoint_every / log_every: in steps; 0 turns periodic evaluation or
        checkpoints off (the end of the run always evaluates and checkpoints).
    eval_tokens: held-out tokens read by each evaluation, the periodic ones and the one at the end
        (at most: the held-out split may hold fewer).
    resume: continue the run saved in ``out`` (the settings of ``resume_key`` must be the same,
        but for ``steps``).
    stop_after: stop (with a checkpoint) after this step, without changing the schedule;
        0 runs to ``steps``.
    threads: intra-op threads per process (None keeps PyTorch's default).
    compile: run each step's forward and backward through ``torch.compile``, which fuses the
        elementwise operations between mambastep's kernels (a compile of about half a minute
        when the run starts or resumes). The weights differ from an eager run's by rounding only,
        as with another number of threads; evaluation stays eager.
    progress: show a progress bar.
    """

    data: DataSettings
    out: str
    config: str | None = None
    init: str | None = None
    n_layer: int | None = None
    optim: OptimSettings = field(default_factory=OptimSettings)
    steps: int = 1000
    batch_size: int = 16
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "cpu"
    eval_every: int = 250
    eval_tokens: int = 1 << 18
    checkpoint_every: int = 250
    log_every: int = 10
    resume: bool = False
    stop_after: int = 0
    threads: int | None = None
    compile: bool = False
    progress: bool = True

    def __post_init__(self):
        if (self.config is None) == (self.init is None):
            raise TrainingError("give exactly one of config (a new model) and init (a checkpoint to fine-tune)")
        if self.n_layer is not None:
            if self.init is None:
                raise TrainingError("n_layer deepens the init checkpoint; a new model takes its depth from config")
            _check(self, "n_layer", 1)
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "eval_tokens", "log_every"):
            _check(self, name, 1)
        for name in ("eval_every", "checkpoint_every", "stop_after"):
            _check(self, name, 0)
        if self.threads is not None:
            _check(self, "threads", 1)

    def resume_key(self) -> dict:
        """The settings that shape the trained weights: a resumed run must keep them, all but ``steps``."""
        key = json.loads(json.dumps(asdict(self)))
        for name in _FREE_ON_RESUME:
            del key[name]
        return key


# Settings that may change when a run is resumed: they do not change the weights it ends with.
_FREE_ON_RESUME = (
    "out",
    "resume",
    "stop_after",
    "threads",
    "compile",
    "progress",
    "device",
    "eval_every",
    "eval_tokens",
    "checkpoint_every",
    "log_every",
)
