"""Training speed on CPU: mambastep's kernels with their backward passes against PyTorch's operators.

Forward + backward of each kernel alone (the Mamba-1 scan at a task model's layer and a 130m
model's layer; the Mamba-2 scan and the conv with its SiLU at a layer of the default model,
16 x 512 tokens), the next-token loss of the default model's bfloat16 logits, and whole
training steps (forward, loss, backward) of the 2-layer width-64 S6 task model and of the
default model's shape (``mamba2-bpe8k``, 16 x 512 tokens, bfloat16 autocast and an AdamW step,
as ``mambastep train --precision bf16`` runs it). Each case runs with the kernels
(``scan="cpp"``; the loss: ``training.loss.token_nll`` of the head's logits) and with PyTorch's
operators (``scan="torch"``; the loss: ``F.cross_entropy`` of float32 logits), the two
alternated in the same run; the ratio is what to read. Last, the default model's step with the
kernels compiled (``mambastep train --compile``) against eager. One JSON line per case.

    python benchmarks/train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mambastep import ops
from mambastep.evidence.tasks import task
from mambastep.evidence.tasks.layers import layer_config
from mambastep.evidence.tasks.train import scored_loss
from mambastep.families import family_of
from mambastep.families.presets import BPE_CONFIG, builtin_config
from mambastep.settings import EngineSettings
from mambastep.training.init import init_for_training
from mambastep.training.loss import token_nll

SCANS = ("cpp", "torch")
BACKENDS = {scan: ops.resolve(EngineSettings(scan=scan), "cpu") for scan in SCANS}


def _random(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _selective_scan_case(b: int, l: int, e: int, n: int) -> Callable[[str], None]:
    gen = torch.Generator().manual_seed(0)
    x, B, C = _random(b, l, e, gen=gen), _random(b, l, n, gen=gen), _random(b, l, n, gen=gen)
    dt = F.softplus(torch.randn(b, l, e, generator=gen) - 2).requires_grad_()
    A = (-torch.rand(e, n, generator=gen) - 0.5).requires_grad_()
    D, h = _random(e, gen=gen), torch.zeros(b, e, n)

    def step(scan: str) -> None:
        y, final = ops.selective_scan(x, dt, A, B, C, D, h, backend=BACKENDS[scan])
        (y.square().mean() + final.square().mean()).backward()

    return step


def _ssd_scan_case(b: int, l: int, h: int, p: int, g: int, n: int) -> Callable[[str], None]:
    gen = torch.Generator().manual_seed(0)
    x, B, C = _random(b, l, h, p, gen=gen), _random(b, l, g, n, gen=gen), _random(b, l, g, n, gen=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 2).requires_grad_()
    A = (-torch.rand(h, generator=gen) * 4 - 0.5).requires_grad_()
    D, state = _random(h, gen=gen), torch.zeros(b, h, p, n)

    def step(scan: str) -> None:
        y, final = ops.ssd_scan(x, dt, A, B, C, D, state, backend=BACKENDS[scan])
        (y.square().mean() + final.square().mean()).backward()

    return step


def _conv_case(b: int, l: int, c: int, k: int) -> Callable[[str], None]:
    """bfloat16 activations and float32 weights, as under bfloat16 autocast."""
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = _random(b, l, c, gen=gen, dtype=torch.bfloat16), _random(c, k, gen=gen), _random(c, gen=gen)
    state = torch.zeros(b, k - 1, c, dtype=torch.bfloat16)

    def step(scan: str) -> None:
        y, _ = ops.causal_conv_silu(x, weight, bias, state, backend=BACKENDS[scan])
        y.float().square().mean().backward()

    return step


def _next_token_loss(scan: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean loss as ``mambastep train`` takes it (kernels) or through a float32 copy (PyTorch)."""
    return token_nll(logits, target).mean() if scan == "cpp" else F.cross_entropy(logits.float(), target)


def _loss_case(rows: int, vocab: int) -> Callable[[str], None]:
    """bfloat16 logits, as the head gives them under bfloat16 autocast."""
    gen = torch.Generator().manual_seed(0)
    logits = _random(rows, vocab, gen=gen, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), generator=gen)

    def step(scan: str) -> None:
        logits.grad = None  # written afresh, as a step's logits are
        _next_token_loss(scan, logits, target).backward()

    return step


def _task_model_case() -> Callable[[str], None]:
    heads = task("induction_heads")
    batch = heads.sample(32, 256, torch.Generator().manual_seed(0))
    config = layer_config("s6", heads.vocab_size)
    models = {}
    for scan in SCANS:  # one model per backend, the same weights
        torch.manual_seed(0)
        models[scan] = family_of(config).model(config).configure(EngineSettings(scan=scan)).train()

    def step(scan: str) -> None:
        logits, _ = models[scan](batch.tokens)
        scored_loss(logits, batch).backward()

    return step


def _default_model_case(batch: int, length: int, compiled: bool = False) -> Callable[[str], None]:
    """The step of ``mambastep train --precision bf16`` (``--compile``: the kernels' model compiled)."""
    config = builtin_config(BPE_CONFIG)
    models, optimizers = {}, {}
    for scan in SCANS:  # one model and optimiser per backend, the same weights
        torch.manual_seed(0)
        model = family_of(config).model(config)
        init_for_training(model)
        model.configure(EngineSettings(scan=scan)).train()
        optimizers[scan] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        models[scan] = torch.compile(model) if compiled and scan == "cpp" else model
    tokens = torch.randint(0, config.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(0))

    def step(scan: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernels' side reads the head's bfloat16 logits
            logits, _ = models[scan](tokens[:, :-1], float_logits=scan != "cpp")
        _next_token_loss(scan, logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizers[scan].step()
        optimizers[scan].zero_grad(set_to_none=True)

    return step


def _compiled_case(batch: int, length: int) -> Callable[[str], None]:
    """The default model's step with the kernels, compiled (``mambastep train --compile``) and eager."""
    steps = {"compiled": _default_model_case(batch, length, compiled=True), "eager": _default_model_case(batch, length)}
    return lambda side: steps[side]("cpp")


def _compare(step: Callable[[str], None], repeats: int, sides: tuple[str, str] = SCANS) -> dict[str, float]:
    """Median seconds of ``step`` on each side (the scan settings: "kernels" and "torch"), the two
    alternated after one warm-up each; the speed-up is the first side's."""
    times = {side: [] for side in sides}
    for side in sides:
        step(side)
    for _ in range(repeats):
        for side in sides:
            start = time.perf_counter()
            step(side)
            times[side].append(time.perf_counter() - start)
    fast, plain = (statistics.median(times[side]) for side in sides)
    names = ("kernels", "torch") if sides == SCANS else sides
    return {f"{names[0]}_s": round(fast, 4), f"{names[1]}_s": round(plain, 4), "speedup": round(plain / fast, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {
        "Mamba-1 scan forward+backward, b 16, l 256, e 128, n 16": lambda: _selective_scan_case(16, 256, 128, 16),
        "Mamba-1 scan forward+backward, b 1, l 512, e 1536, n 16 (a 130m layer)": lambda: _selective_scan_case(
            1, 512, 1536, 16
        ),
        "Mamba-2 scan forward+backward, b 16, l 512, h 8, p 64, g 1, n 64 (a default-model layer)": lambda: (
            _ssd_scan_case(16, 512, 8, 64, 1, 64)
        ),
        "conv + SiLU forward+backward in bfloat16, b 16, l 512, c 640, k 4 (a default-model layer)": lambda: _conv_case(
            16, 512, 640, 4
        ),
        "next-token loss forward+backward, 8,192 rows of 8,192 bfloat16 logits (a default-model step)": lambda: (
            _loss_case(16 * 512, 8192)
        ),
        "training step, 2-layer width-64 S6 task model, batch 32 x 256": _task_model_case,
        f"training step, {BPE_CONFIG} (the default model's shape), batch 16 x 512, bfloat16 autocast": lambda: (
            _default_model_case(16, 512)
        ),
    }
    for name, make in cases.items():
        print(json.dumps({"case": name, **_compare(make(), args.repeats)}), flush=True)
    name = f"training step, {BPE_CONFIG}, batch 16 x 512, bfloat16 autocast, kernels: compiled against eager"
    print(json.dumps({"case": name, **_compare(_compiled_case(16, 512), args.repeats, ("compiled", "eager"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
