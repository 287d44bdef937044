"""What the commands share: the model, engine and sampling flags, the hardware profile, and
the errors that are the user's (one line on stderr, exit status 1)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from mambastep.evidence.hardware import BUILTIN_HARDWARE, calibrate, get_hardware
from mambastep.families.presets import BUILTIN_CONFIGS
from mambastep.files.checkpoints import CheckpointError, builtin_name, load, model_for
from mambastep.files.tokenizer import TokenizerError
from mambastep.models.config import ConfigError
from mambastep.models.lm import LanguageModel
from mambastep.models.state import StateError
from mambastep.runtime.sampling import SamplingParams
from mambastep.serve.settings import ServeError
from mambastep.settings import DECODE_BACKENDS, MATVEC_KERNELS, PROMPT_MATMULS, RENAMED, SCAN_KERNELS, EngineSettings

DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    TokenizerError,
    StateError,
    ServeError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
)
# A field name in an error message: one with an underscore anywhere (not in a path or quotes),
# or any that opens the message before "must" ("temperature must be ...").
_FIELD = re.compile(r"^\w+(?= must )|(?<![\w./'-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w/'-])")


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The field each flag of ``parser`` sets (its ``dest``), and the flag (its first long option)."""
    return {
        action.dest: next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        for action in parser._actions  # argparse keeps its actions in no public attribute
        if action.option_strings and action.dest != argparse.SUPPRESS
    }


def in_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each field it names written as the flag that sets it (``flag_names``):
    ``max_new_tokens must be ...`` becomes ``--max-new-tokens must be ...``."""
    return _FIELD.sub(lambda match: flags.get(match.group(0), match.group(0)), message)


def add_model_args(parser: argparse.ArgumentParser, builtin: bool = False) -> None:
    """The model, engine and weight flags; ``builtin``: --model takes a built-in configuration too."""
    names = f", or a built-in configuration ({', '.join(BUILTIN_CONFIGS)}: random weights)" if builtin else ""
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help=f"checkpoint directory or Hugging Face Hub id{names} (default: the bundled model)",
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
        help="auto: CUDA graphs for a Mamba or Mamba-2 model on a CUDA GPU, else eager. "
        "graphs: each step replayed from CUDA graphs (CUDA GPUs only). "
        "eager: starts at once; where mambastep's C++ kernels run it is as fast as compiled or faster. "
        "compiled: torch.compile the decode step, faster per token only without those kernels (e.g. --matvec torch); "
        "every run first traces it (4-5 s on a 2-core Xeon; the first run on a machine also compiles, 10-20 s more, "
        "cached in TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), so it pays off after about "
        "500 tokens of a 130M model, 3,000 of a 690k-parameter one (BENCHMARKS.md)",
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


def load_model(args: argparse.Namespace) -> LanguageModel:
    """The trained model that --model names (a checkpoint directory or a hub id), to run.

    Raises:
        CheckpointError: a built-in configuration (``refuse_random_weights``), or no checkpoint.
    """
    refuse_random_weights(args.model)
    return load(args.model, _dtype(args), args.device, engine_settings(args), args.quantize)


def model_shape(args: argparse.Namespace) -> LanguageModel:
    """The model that --model names, to look at (sizes, config), never to run: a checkpoint
    is loaded; a built-in configuration is built on the meta device, where its random weights
    take neither memory nor time.

    Raises:
        CheckpointError: neither; the message lists the built-in names.
    """
    if builtin_name(args.model) is None:
        return model_for(args.model, _dtype(args), args.device, engine_settings(args), args.quantize)
    settings = EngineSettings(scan="torch", matvec="torch", huge_pages=False)  # nothing runs on the meta device
    return model_for(args.model, _dtype(args), "meta", settings, args.quantize)


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPES[args.dtype] if args.dtype else None


def refuse_random_weights(model: str) -> None:
    """Raise ``CheckpointError`` where --model names a built-in configuration: its weights are
    random, so the text it writes is noise.

    Raises:
        CheckpointError: ``model`` is a built-in name (and no local directory of that name).
    """
    if builtin_name(model) is not None:
        raise CheckpointError(
            f"{model} is a built-in configuration with random weights (for info, cost, bench and compare), "
            "not a trained model: pass a checkpoint directory or a Hugging Face Hub id, "
            "e.g. --model state-spaces/mamba-130m-hf"
        )


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
        f"(default: {default or 'calibrate this machine'}); ignored when --calibrate is given",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine's bandwidth and peaks instead; wins over --hardware when both are given",
    )
    parser.add_argument("--save-hardware", type=Path, default=None, help="write the profile used to this JSON file")


def hardware(args: argparse.Namespace):
    """The profile for the roofline: --calibrate (or no --hardware where there is no default)
    measures this machine, else --hardware names a built-in part or a JSON file."""
    profile = calibrate() if args.calibrate or args.hardware is None else get_hardware(args.hardware)
    if args.save_hardware:
        args.save_hardware.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return profile
