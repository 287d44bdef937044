"""``mambastep info``: config, parameter count, weight and state bytes."""

from __future__ import annotations

import argparse
import json

from mambastep.cli.common import add_model_args, model_shape
from mambastep.files.checkpoints import builtin_name

KEYS = (
    "family",
    "fingerprint",
    "dtype",
    "parameters",
    "weight_bytes",
    "state_bytes_per_sequence",
    "state_bytes_per_token",
)


def run(args: argparse.Namespace) -> int:
    random_weights = builtin_name(args.model) is not None
    info = {**model_shape(args).info(), "random_weights": random_weights}
    if args.json:
        print(json.dumps(info))
        return 0
    if random_weights:
        print(f"{args.model}: a built-in configuration, the published shape with random weights (not a trained model)")
    for key in KEYS:
        print(f"{key:26} {info[key]:,}" if isinstance(info[key], int) else f"{key:26} {info[key]}")
    for key, value in info["config"].items():
        print(f"  {key:24} {value}")
    return 0


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="config, parameter count, weight and state bytes")
    add_model_args(info, builtin=True)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run)
