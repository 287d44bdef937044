"""``mambastep bench``: decode and prefill speed against the roofline and transformers."""

from __future__ import annotations

import argparse
import json

import torch

from mambastep.cli.common import DTYPES, add_engine_args, engine_settings
from mambastep.evidence.bench import BenchSettings, markdown, run_bench


def run(args: argparse.Namespace) -> int:
    settings = BenchSettings(
        model=args.model,
        dtype=args.dtype,
        quantize=args.quantize,
        batches=tuple(args.batches),
        prompts=tuple(args.prompts),
        decode_steps=args.decode_steps,
        repeats=args.repeats,
        long_context=args.long_context,
        baseline=not args.no_baseline,
    )
    engine = engine_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # before the machine is measured
    report = run_bench(settings, engine)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + markdown(report))
    print(json.dumps(report) if args.json else markdown(report))
    return 0


def add_parser(sub) -> None:
    d = BenchSettings()
    b = sub.add_parser("bench", help="decode and prefill speed against the roofline and transformers")
    b.add_argument("--model", default=d.model, help="built-in configuration (random weights) or checkpoint")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    b.add_argument("--quantize", choices=["int8"], default=None)
    b.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    b.add_argument("--prompts", type=int, nargs="+", default=list(d.prompts), help="prompt lengths for prefill")
    b.add_argument("--decode-steps", type=int, default=d.decode_steps)
    b.add_argument("--repeats", type=int, default=d.repeats)
    b.add_argument("--long-context", type=int, default=d.long_context, help="0 skips the long-context decode")
    b.add_argument("--no-baseline", action="store_true", help="skip transformers")
    add_engine_args(b)
    b.add_argument("--markdown", default=None, help="append the Markdown table to this file (e.g. BENCHMARKS.md)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=run)
