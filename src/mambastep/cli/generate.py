"""``mambastep generate``: text from a prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from mambastep.cli.common import add_model_args, add_sampling_args, load_model, sampling_params
from mambastep.files.tokenizer import load_tokenizer
from mambastep.runtime.generation import generate


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before the slow part
    model = load_model(args)
    tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer)
    start, first, pieces = time.perf_counter(), None, []
    for piece in generate(model, tokenizer, args.prompt, params):
        first = first or time.perf_counter()
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    end = time.perf_counter()
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "prompt": args.prompt,
                    "completion": "".join(pieces),
                    "params": asdict(params),
                    "time_to_first_piece_s": round((first or end) - start, 4),
                    "total_s": round(end - start, 4),
                }
            )
        )
    else:
        sys.stdout.write("\n")
    return 0


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)",
    )
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=run)
