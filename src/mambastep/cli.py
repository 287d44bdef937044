"""The ``mambastep`` command: one entry point, one subcommand per job.

Each subcommand fills the same objects the library uses (``SamplingParams``,
``load`` arguments), so the command line and the API never disagree. Errors
in what the user passed are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mambastep.config import ConfigError
from mambastep.generation import SamplingParams, generate
from mambastep.loading import CheckpointError, load
from mambastep.settings import DECODE_BACKENDS, SCAN_KERNELS, EngineSettings
from mambastep.state import StateError
from mambastep.tokenizer import TokenizerError, load_tokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USER_ERRORS = (CheckpointError, ConfigError, TokenizerError, StateError, ValueError, FileNotFoundError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="checkpoint directory or Hugging Face Hub id (default: the bundled model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    engine = EngineSettings()
    parser.add_argument("--scan", choices=SCAN_KERNELS, default=engine.scan,
                        help="Mamba-1 prompt scan: fused CPU kernel, PyTorch, or auto")
    parser.add_argument("--decode", choices=DECODE_BACKENDS, default=engine.decode,
                        help="compiled: torch.compile the decode step (one-time compile, cached; faster steps)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")


def _load_model(args: argparse.Namespace):
    settings = EngineSettings(scan=args.scan, decode=args.decode, threads=args.threads)
    return load(args.model, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device, settings=settings)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # validate before the slow part
    model = _load_model(args)
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
        print(json.dumps({
            "model": args.model,
            "prompt": args.prompt,
            "completion": "".join(pieces),
            "params": asdict(params),
            "time_to_first_piece_s": round((first or end) - start, 4),
            "total_s": round(end - start, 4),
        }))
    else:
        sys.stdout.write("\n")
    return 0


def model_info(model) -> dict:
    """What a user wants to know before running a model: size and state cost."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {
        "family": model.config.family,
        "fingerprint": model.config.fingerprint,
        "config": asdict(model.config),
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(model.dtype).removeprefix("torch."),
        "state_bytes_per_sequence": model.new_state(batch_size=1).nbytes,
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(_load_model(args))
    if args.json:
        print(json.dumps(info))
        return 0
    for key in ("family", "fingerprint", "dtype", "parameters", "weight_bytes", "state_bytes_per_sequence"):
        print(f"{key:26} {info[key]:,}" if isinstance(info[key], int) else f"{key:26} {info[key]}")
    for key, value in info["config"].items():
        print(f"  {key:24} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambastep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)")
    defaults = SamplingParams()
    gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    gen.add_argument("--temperature", type=float, default=defaults.temperature, help="0 for greedy")
    gen.add_argument("--top-k", type=int, default=defaults.top_k, help="0 for off")
    gen.add_argument("--top-p", type=float, default=defaults.top_p)
    gen.add_argument("--min-p", type=float, default=defaults.min_p)
    gen.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="config, parameter count, weight and state bytes")
    _add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="mambastep: %(message)s", level=logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"mambastep: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
