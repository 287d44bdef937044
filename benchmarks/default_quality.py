"""How good the bundled default model is, by the measures its model card reports: bits per byte
on the held-out standard-library files against xz -9 and gzip -9 (concatenated, and file by
file), the share of sampled Python whose complete lines parse, decode speed with the default
settings, and the size the model adds to the package. One JSON document on stdout.

The held-out files are the training run's (docs/default-model.md): this Python's standard
library, `*.py` outside site-packages, text only, held out by the split rule (seed 0, holdout
0.05). Bits per byte are read as training evaluates: windows of 512 tokens, each from a fresh
state, every token but the text's first predicted (``mambastep.evidence.likelihood``).

    python benchmarks/default_quality.py [--model DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import codeop
import gzip
import json
import lzma
import sys
import sysconfig
import time
import warnings
from pathlib import Path

from tqdm import tqdm

import mambastep
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.evidence.hardware import cpu_description
from mambastep.evidence.likelihood import text_bits
from mambastep.settings import EngineSettings
from mambastep.training.data import find_files, is_heldout
from mambastep.training.settings import DataSettings

WINDOW = 512
PROMPTS = ("def ", "class ", "import ", "    if ")
SAMPLES_PER_PROMPT = 16
SAMPLE_BYTES = 400


def heldout_files() -> list[tuple[str, bytes]]:
    """The held-out files of the default model's training run, in path order, with their bytes."""
    stdlib = sysconfig.get_paths()["stdlib"]
    settings = DataSettings(paths=(stdlib,), include=("*.py",), exclude=("site-packages/*",), skip_binary=True)
    files = []
    for f in find_files(settings):
        if not is_heldout(f.name, settings.seed, settings.holdout):
            continue
        data = f.path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if b"\0" not in data and data:
            files.append((f.name, data))
    return files


def compressed_bits(data: bytes) -> dict:
    return {"xz_-9": 8 * len(lzma.compress(data, preset=9)), "gzip_-9": 8 * len(gzip.compress(data, 9))}


def syntax(model, tokenizer) -> dict:
    """Seeded samples of SAMPLE_BYTES bytes at temperature 0.8; a sample passes when its complete
    lines compile or are an incomplete statement (codeop), not a SyntaxError. A prompt that
    starts indented is read inside ``def _():`` so that its indentation is valid."""
    passed, failures = 0, []
    for prompt in PROMPTS:
        for seed in range(SAMPLES_PER_PROMPT):
            text = prompt + sample(model, tokenizer, prompt, seed)
            lines = text.split("\n")[:-1]  # complete lines only
            source = ("def _():\n" if prompt.startswith(" ") else "") + "\n".join(lines) + "\n"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences and the like warn, not fail
                    codeop.compile_command(source, symbol="exec")
                passed += 1
            except (SyntaxError, ValueError, OverflowError) as err:
                failures.append({"prompt": prompt, "seed": seed, "error": f"{type(err).__name__}: {err}"[:120]})
    total = len(PROMPTS) * SAMPLES_PER_PROMPT
    return {"samples": total, "passed": passed, "share": round(passed / total, 3), "failures": failures[:8]}


def sample(model, tokenizer, prompt: str, seed: int) -> str:
    """The first SAMPLE_BYTES bytes (whole characters) the model writes after ``prompt``."""
    params = mambastep.SamplingParams(max_new_tokens=SAMPLE_BYTES, temperature=0.8, seed=seed, ignore_eos=True)
    written = b""
    for piece in mambastep.generate(model, tokenizer, prompt, params):  # a token is at least one byte
        written += piece.encode("utf-8")
        if len(written) >= SAMPLE_BYTES:
            break
    return written[:SAMPLE_BYTES].decode("utf-8", errors="ignore")


def decode_speed(model, tokenizer, tokens: int = 400) -> dict:
    """Tokens and bytes per second of 400 new tokens after ``def `` (prefill included)."""
    params = mambastep.SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
    start = time.perf_counter()
    ids = [token for _, token in mambastep.generate_tokens(model, [tokenizer.encode("def ")], params)]
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": round(len(ids) / seconds, 1),
        "bytes_per_s": round(len(tokenizer.decode(ids).encode("utf-8")) / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = mambastep.load(args.model, settings=EngineSettings(threads=args.threads))
    tokenizer = mambastep.load_tokenizer(args.model)
    files = heldout_files()
    joined = b"".join(data for _, data in files)
    cost = text_bits(model, tokenizer, joined.decode("utf-8"), WINDOW)
    whole = {"bytes": len(joined), "tokens": cost.tokens, "model_bits_per_byte": round(cost.bits_per_byte, 4)}
    whole |= {f"{k}_bits_per_byte": round(v / len(joined), 4) for k, v in compressed_bits(joined).items()}
    by_file = {"model": 0.0, "xz_-9": 0, "gzip_-9": 0, "bytes": 0, "predicted": 0, "files_below_xz": 0}
    for _, data in tqdm(files, desc="held-out files", file=sys.stderr, disable=None):
        cost = text_bits(model, tokenizer, data.decode("utf-8"), WINDOW)
        packed = compressed_bits(data)
        by_file["model"] += cost.bits
        by_file["predicted"] += cost.predicted_bytes
        by_file["bytes"] += len(data)
        by_file["xz_-9"] += packed["xz_-9"]
        by_file["gzip_-9"] += packed["gzip_-9"]
        by_file["files_below_xz"] += cost.bits_per_byte < packed["xz_-9"] / len(data)
    report = {
        "model": str(args.model),
        "machine": cpu_description(),
        "threads": args.threads,
        "parameters": model.info()["parameters"],
        "tokenizer": "bytes" if isinstance(tokenizer, mambastep.ByteTokenizer) else f"{tokenizer.vocab_size} tokens",
        "package_bytes": sum(p.stat().st_size for p in Path(args.model).iterdir() if p.is_file()),
        "heldout_files": len(files),
        "concatenated": whole,
        "file_by_file": {
            "files": len(files),
            "files_below_xz": by_file["files_below_xz"],
            "model_bits_per_byte": round(by_file["model"] / by_file["predicted"], 4),
            "xz_-9_bits_per_byte": round(by_file["xz_-9"] / by_file["bytes"], 4),
            "gzip_-9_bits_per_byte": round(by_file["gzip_-9"] / by_file["bytes"], 4),
        },
        "syntax": syntax(model, tokenizer),
        "decode": decode_speed(model, tokenizer),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
