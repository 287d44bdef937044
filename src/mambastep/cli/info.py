"""``mambastep info``: config, parameter count, weight and state bytes."""

from __future__ import annotations

import argparse
import json

from mambastep.cli.common import add_model_args, load_model


def run(args: argparse.Namespace) -> int:
    info = load_model(args).info()
    if args.json:
        print(json.dumps(info))
        return 0
    for key in ("family", "fingerprint", "dtype", "parameters", "weight_bytes", "state_bytes_per_sequence"):
        print(f"{key:26} {info[key]:,}" if isinstance(info[key], int) else f"{key:26} {info[key]}")
    for key, value in info["config"].items():
        print(f"  {key:24} {value}")
    return 0


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="config, parameter count, weight and state bytes")
    add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run)
