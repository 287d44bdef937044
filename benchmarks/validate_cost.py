"""The cost model against the real models at published sizes: matrix-product FLOPs and state bytes.

For each model, phase, batch and context: the matrix-product FLOPs that
torch.utils.flop_counter.FlopCounterMode counts in a real call next to the
cost model's, and the bytes of the real state next to ``cost.state_bytes``.
Random weights; the PyTorch scan and linear layers (FlopCounterMode cannot see
inside the fused CPU kernels, which do the same arithmetic); one JSON line per case; exit status
1 if anything differs.

    python benchmarks/validate_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from mambastep.evidence import cost
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.settings import EngineSettings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=sorted(BUILTIN_CONFIGS), default=["mamba-130m", "mamba2-130m", "pythia-160m"]
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 257])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [
        (m, p, b, c) for m in args.models for p in ("prefill", "decode") for b in args.batches for c in args.contexts
    ]
    exact, model, name = True, None, None
    for model_name, phase, batch, context in tqdm(cases, desc="validating", disable=None):
        if model_name != name:
            model, name = random_model(model_name, settings=EngineSettings(scan="torch", matvec="torch")), model_name
        row = {
            "model": model_name,
            "phase": phase,
            "batch": batch,
            "context": context,
            **cost.validate_flops(model, phase, context, batch),
        }
        if phase == "prefill":
            _, state = model.prefill(torch.zeros(batch, context, dtype=torch.long))
            row["state_bytes"] = {
                "counted": state.nbytes,
                "predicted": cost.state_bytes(model.config, context, batch, model.dtype),
            }
        row["exact"] = all(
            row[k]["counted"] == row[k]["predicted"]
            for k in ("weight_matmuls", "contractions", "state_bytes")
            if k in row
        )
        exact &= row["exact"]
        print(json.dumps(row), flush=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
