"""Training speed of the Mamba-1 scan on CPU: the fused kernel's backward against the PyTorch scan.

Forward + backward of the scan alone at two sizes (a task model's layer and a
130m model's layer), and a whole training step (forward, loss, backward) of
the 2-layer width-64 task model, with the fused kernel and with the PyTorch
scan, interleaved in the same run; the ratio is what to read. One JSON line
per case.

    python benchmarks/train_step.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mambastep import ops
from mambastep.evidence.tasks import task
from mambastep.evidence.tasks.layers import layer_config
from mambastep.evidence.tasks.train import scored_loss
from mambastep.families import family_of
from mambastep.settings import EngineSettings

CPP = ops.resolve(EngineSettings(scan="cpp"), "cpu")


def _scan_inputs(b: int, l: int, e: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, B, C = (
        torch.randn(b, l, e, generator=gen),
        torch.randn(b, l, n, generator=gen),
        torch.randn(b, l, n, generator=gen),
    )
    dt = torch.nn.functional.softplus(torch.randn(b, l, e, generator=gen) - 2)
    A, D, h = -torch.rand(e, n, generator=gen) - 0.5, torch.randn(e, generator=gen), torch.zeros(b, e, n)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)] + [h]


def _scan_step(scan, inputs) -> None:
    y, h = scan(*inputs)
    (y.square().mean() + h.square().mean()).backward()


def _model_step(model, batch) -> None:
    logits, _ = model(batch.tokens)
    scored_loss(logits, batch).backward()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for b, l, e, n in [(16, 256, 128, 16), (1, 512, 1536, 16)]:
        inputs = _scan_inputs(b, l, e, n)
        fused = _median_seconds(
            lambda: _scan_step(lambda *t: ops.selective_scan(*t, backend=CPP), inputs), args.repeats
        )
        plain = _median_seconds(lambda: _scan_step(ops.selective_scan, inputs), args.repeats)
        print(
            json.dumps(
                {
                    "case": "scan forward+backward",
                    "shape_blen": [b, l, e, n],
                    "fused_s": round(fused, 5),
                    "torch_scan_s": round(plain, 5),
                    "speedup": round(plain / fused, 1),
                }
            )
        )
    heads = task("induction_heads")
    batch = heads.sample(32, 256, torch.Generator().manual_seed(0))
    config = layer_config("s6", heads.vocab_size)
    seconds = {}
    for scan in ("cpp", "torch"):
        torch.manual_seed(0)
        model = family_of(config).model(config).configure(EngineSettings(scan=scan)).train()
        seconds[scan] = _median_seconds(lambda: _model_step(model, batch), args.repeats)
    print(
        json.dumps(
            {
                "case": "training step, 2-layer width-64 S6, batch 32 x 256",
                "fused_s": round(seconds["cpp"], 4),
                "torch_scan_s": round(seconds["torch"], 4),
                "speedup": round(seconds["torch"] / seconds["cpp"], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
