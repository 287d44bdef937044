"""``mambastep compare``: Mamba against a transformer on this machine, latency and memory by context."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambastep.cli.common import DTYPES, add_engine_args, add_hardware_args, engine_settings, hardware
from mambastep.evidence.compare import CompareSettings, run_compare
from mambastep.evidence.plots import plot_compare
from mambastep.evidence.report import compare_table


def run(args: argparse.Namespace) -> int:
    settings = CompareSettings(
        models=tuple(args.models),
        contexts=tuple(args.contexts),
        prefill_max=args.prefill_max,
        decode_steps=args.decode_steps,
        repeats=args.repeats,
        batch=args.batch,
        dtype=args.dtype,
        memory_budget=int(args.memory_budget_gib * 2**30),
        seed=args.seed,
    )
    engine = engine_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # before --calibrate measures
    report = run_compare(settings, hardware(args), engine, progress=not args.no_progress)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_compare(report, args.out)
    print(json.dumps(report) if args.json else compare_table(report))
    return 0


def add_parser(sub) -> None:
    d = CompareSettings()
    cm = sub.add_parser("compare", help="Mamba against a transformer on this machine: latency and memory by context")
    cm.add_argument(
        "--models",
        "--model",
        nargs="+",
        default=list(d.models),
        help="built-in configurations (random weights) or checkpoints",
    )
    cm.add_argument("--contexts", "--context", type=int, nargs="+", default=list(d.contexts))
    cm.add_argument(
        "--prefill-max", type=int, default=d.prefill_max, help="measure time to first token up to this context"
    )
    cm.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed steps per measurement")
    cm.add_argument("--repeats", type=int, default=d.repeats, help="interleaved repeats (the median is reported)")
    cm.add_argument("--batch", type=int, default=d.batch)
    cm.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    cm.add_argument(
        "--memory-budget-gib", type=float, default=0, help="for the largest batch (default: this machine's memory)"
    )
    cm.add_argument("--seed", type=int, default=d.seed)
    add_engine_args(cm)
    add_hardware_args(cm, None)
    cm.add_argument("--out", type=Path, default=None, help="folder for compare.json, latency.png and memory.png")
    cm.add_argument("--json", action="store_true")
    cm.add_argument("--no-progress", action="store_true", help="no progress bars")
    cm.set_defaults(func=run)
