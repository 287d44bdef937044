"""What ``--decode compiled`` costs at the start of a run, and what it saves per token.

Start: ``mambastep generate`` in fresh processes, timed from outside: compiled with an empty
Inductor cache (``TORCHINDUCTOR_CACHE_DIR``, the first run on a machine), compiled again on
that cache (every later run), and eager. Per token: an eager and a compiled model of each
built-in configuration, random weights, stepped in one process, alternated round by round
(the median step of each round), with the settings' kernels and with PyTorch's operators
only (``matvec="torch"``, ``scan="torch"``: a machine without mambastep's C++ kernels);
its first compiled step is timed on the Inductor cache of the environment. One JSON line per
measurement; the bundled model is named "default".

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compiled_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import mambastep
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.families.presets import random_model
from mambastep.settings import EngineSettings

KERNELS = {"settings": {}, "torch": {"matvec": "torch", "scan": "torch"}}


def start_times(tokens: int, rounds: int, threads: int) -> None:
    """Wall seconds of ``mambastep generate`` with the bundled model in fresh processes."""
    command = [sys.executable, "-m", "mambastep.cli", "generate", "--prompt", "def ", "--ignore-eos", "--seed", "0"]
    command += ["--max-new-tokens", str(tokens), "--threads", str(threads)]

    def seconds(args: list[str], env: dict[str, str]) -> float:
        start = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        if done.stderr.strip():
            raise RuntimeError(f"{' '.join(args)} wrote to stderr:\n{done.stderr}")
        return time.perf_counter() - start

    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            first = seconds([*command, "--decode", "compiled"], env)
            second = seconds([*command, "--decode", "compiled"], env)
            eager = seconds(command, env)
        row = {"tokens": tokens, "compiled_first_s": first, "compiled_second_s": second, "eager_s": eager}
        print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)


def _model(name: str, settings: EngineSettings):
    if name == "default":
        return mambastep.load(DEFAULT_MODEL, settings=settings)
    return random_model(name, settings=settings)


def step_times(name: str, kernels: str, rounds: int, steps: int) -> None:
    """Median ms per decode step, eager and compiled, alternated in this process."""
    models = {d: _model(name, EngineSettings(decode=d, **KERNELS[kernels])) for d in ("eager", "compiled")}
    models["compiled"].load_state_dict(models["eager"].state_dict())
    _, state = models["eager"].prefill(torch.tensor([[100, 101, 102, 32]]))
    token = torch.tensor([65])
    start = time.perf_counter()
    models["compiled"].step(token, state)
    first_step = time.perf_counter() - start
    models["eager"].step(token, state)
    medians: dict[str, list[float]] = {d: [] for d in models}
    for _ in range(rounds):
        for decode, model in models.items():
            s, times = state, []
            for _ in range(steps):
                start = time.perf_counter()
                _, s = model.step(token, s)
                times.append(time.perf_counter() - start)
            medians[decode].append(1000 * statistics.median(times))
    row = {"model": name, "kernels": kernels, "compiled_first_step_s": round(first_step, 2)}
    row |= {f"{d}_ms": round(statistics.median(v), 3) for d, v in medians.items()}
    row |= {f"{d}_ms_rounds": [round(x, 3) for x in v] for d, v in medians.items()}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "mamba-130m", "mamba2-130m", "pythia-160m"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20, help="tokens generated in the start-up runs")
    parser.add_argument("--start-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="alternated rounds of the per-token comparison")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_times(args.tokens, args.start_rounds, args.threads)
    for name in args.models:
        for kernels in KERNELS:
            step_times(name, kernels, args.rounds, args.steps)


if __name__ == "__main__":
    main()
