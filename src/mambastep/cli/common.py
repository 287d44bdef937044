"""What the commands share: the model, engine and sampling flags, the hardware profile, and
the errors that are the user's (one line on stderr, exit status 1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambastep.evidence.hardware import BUILTIN_HARDWARE, calibrate, get_hardware
from mambastep.files.checkpoints import CheckpointError, load
from mambastep.files.tokenizer import TokenizerError
from mambastep.models.config import ConfigError
from mambastep.models.state import StateError
from mambastep.runtime.sampling import SamplingParams
from mambastep.serve.settings import ServeError
from mambastep.settings import DECODE_BACKENDS, MATVEC_KERNELS, PROMPT_MATMULS, RENAMED, SCAN_KERNELS, EngineSettings

DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USER_ERRORS = (CheckpointError, ConfigError, TokenizerError, StateError, ServeError, ValueError, FileNotFoundError)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="checkpoint directory or Hugging Face Hub id (default: the bundled model)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: the checkpoint's)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_engine_args(parser)
    parser.add_argument(
        "--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers (CPU, float32)"
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    engine = EngineSettings()
    parser.add_argument(
        "--scan",
        type=_not_renamed,
        choices=SCAN_KERNELS,
        default=engine.scan,
        help="prompt scans, conv and norms: cpp (the C++ CPU kernels), torch, or auto",
    )
    parser.add_argument(
        "--matvec",
        type=_not_renamed,
        choices=MATVEC_KERNELS,
        default=engine.matvec,
        help="decode-step products: cpp (the C++ CPU kernel, float32/bfloat16/int8 weights), torch, or auto",
    )
    parser.add_argument(
        "--prompt-matmul",
        choices=PROMPT_MATMULS,
        default=engine.prompt_matmul,
        help="float32 prompt products: oneDNN, PyTorch (MKL on x86), or auto (oneDNN on non-Intel x86)",
    )
    parser.add_argument(
        "--decode",
        choices=DECODE_BACKENDS,
        default=engine.decode,
        help="eager: starts at once; where mambastep's C++ kernels run it is as fast as compiled or faster. "
        "compiled: torch.compile the decode step, faster per token only without those kernels (e.g. --matvec torch); "
        "every run first traces it (4-5 s on a 2-core Xeon; the first run on a machine also compiles, 10-20 s more, "
        "cached in TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), so it pays off after about "
        "500 tokens of a 130M model, 3,000 of the bundled one (BENCHMARKS.md)",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="keep the weights in ordinary 4 KiB pages (default: moved into transparent huge pages)",
    )


def _not_renamed(value: str) -> str:
    if value in RENAMED:
        raise argparse.ArgumentTypeError(f"{value!r} is now called {RENAMED[value]!r}")
    return value


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        scan=args.scan,
        matvec=args.matvec,
        prompt_matmul=args.prompt_matmul,
        decode=args.decode,
        threads=args.threads,
        huge_pages=args.huge_pages,
    )


def load_model(args: argparse.Namespace):
    settings = engine_settings(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    return load(args.model, dtype=dtype, device=args.device, settings=settings, quantize=args.quantize)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The flags that ``sampling_params`` reads."""
    defaults = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 for greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 for off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--min-p", type=float, default=defaults.min_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
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


def add_hardware_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--hardware",
        default=default,
        help=f"profile for the roofline: {', '.join(BUILTIN_HARDWARE)}, or a JSON file "
        f"(default: {default or 'calibrate this machine'})",
    )
    parser.add_argument("--calibrate", action="store_true", help="measure this machine's bandwidth and peaks instead")
    parser.add_argument("--save-hardware", type=Path, default=None, help="write the profile used to this JSON file")


def hardware(args: argparse.Namespace):
    """The profile for the roofline: --calibrate (or no --hardware where there is no default)
    measures this machine, else --hardware names a built-in part or a JSON file."""
    profile = calibrate() if args.calibrate or args.hardware is None else get_hardware(args.hardware)
    if args.save_hardware:
        args.save_hardware.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return profile
