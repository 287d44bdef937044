"""``mambastep cost``: analytic FLOPs, bytes and roofline time of a decode step and a prefill, by primitive."""

from __future__ import annotations

import argparse
import json

from mambastep.cli.common import add_hardware_args, hardware
from mambastep.evidence.compare import DEFAULT_MODELS
from mambastep.evidence.cost import cost_report
from mambastep.evidence.report import cost_table
from mambastep.families.presets import BUILTIN_CONFIGS
from mambastep.files.checkpoints import resolve_config


def run(args: argparse.Namespace) -> int:
    configs = {name: resolve_config(name) for name in args.model}
    for name, values in (("--context", args.context), ("--batch", args.batch)):
        if min(values) < 1:
            raise ValueError(f"{name} values must be >= 1, got {values}")
    report = cost_report(configs, args.context, args.batch, hardware(args), with_terms=args.terms)
    print(json.dumps(report) if args.json else cost_table(report))
    return 0


def add_parser(sub) -> None:
    co = sub.add_parser(
        "cost", help="analytic FLOPs, bytes and roofline time of a decode step and a prefill, by primitive"
    )
    co.add_argument(
        "--model",
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"built-in configurations ({', '.join(BUILTIN_CONFIGS)}) or checkpoints (only config.json is read)",
    )
    add_hardware_args(co, "h100")
    co.add_argument(
        "--context",
        "--contexts",
        type=int,
        nargs="+",
        default=[2048],
        help="tokens before the decode step; prompt length",
    )
    co.add_argument("--batch", type=int, nargs="+", default=[1])
    co.add_argument("--terms", action="store_true", help="add every operation to the JSON")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=run)
