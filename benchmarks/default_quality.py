"""How good the bundled default model is, by the measures its model card reports: bits per byte
on the held-out standard-library files against xz -9 and gzip -9 (concatenated, and file by
file), the share of sampled Python whose complete lines parse, decode speed with the default
settings, and the size the model adds to the package. One JSON document on stdout.

The held-out files are the training run's (docs/default-model.md): this Python's standard
library, `*.py` outside site-packages, text only, held out by the split rule (seed 0, holdout
0.05). Bits per byte are read as training evaluates: windows of 512 bytes, each from a fresh
state, every byte but a window's first predicted.

    python benchmarks/default_quality.py [--model DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import codeop
import gzip
import json
import lzma
import math
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mambastep
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.evidence.hardware import cpu_description
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


@torch.no_grad()
def nll_bits(model, data: bytes) -> tuple[float, int]:
    """Total bits the model needs for ``data`` (byte tokens) and the bytes it predicted."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    pieces = [tokens[start : start + WINDOW + 1] for start in range(0, len(tokens) - 1, WINDOW)]
    bits, count = 0.0, 0
    full = [p for p in pieces if len(p) == WINDOW + 1]
    for batch in range(0, len(full), 32):  # full windows in batches, the last short one alone
        rows = torch.stack(full[batch : batch + 32])
        logits, _ = model(rows[:, :-1])
        bits += F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    for piece in pieces:
        if len(piece) < WINDOW + 1 and len(piece) > 1:
            logits, _ = model(piece[None, :-1])
            bits += F.cross_entropy(logits[0].float(), piece[1:], reduction="sum").item()
            count += len(piece) - 1
    return bits / math.log(2), count


def compressed_bits(data: bytes) -> dict:
    return {"xz_-9": 8 * len(lzma.compress(data, preset=9)), "gzip_-9": 8 * len(gzip.compress(data, 9))}


def syntax(model, tokenizer) -> dict:
    """Seeded samples of SAMPLE_BYTES bytes at temperature 0.8; a sample passes when its complete
    lines compile or are an incomplete statement (codeop), not a SyntaxError. A prompt that
    starts indented is read inside ``def _():`` so that its indentation is valid."""
    passed, failures = 0, []
    for prompt in PROMPTS:
        for seed in range(SAMPLES_PER_PROMPT):
            params = mambastep.SamplingParams(max_new_tokens=SAMPLE_BYTES, temperature=0.8, seed=seed, ignore_eos=True)
            text = prompt + "".join(mambastep.generate(model, tokenizer, prompt, params))
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


def decode_speed(model, tokenizer, tokens: int = 400) -> float:
    params = mambastep.SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
    start = time.perf_counter()
    produced = sum(1 for _ in mambastep.generate(model, tokenizer, "def ", params))
    return round(produced / (time.perf_counter() - start), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = mambastep.load(args.model, settings=EngineSettings(threads=args.threads))
    tokenizer = mambastep.load_tokenizer(args.model)
    files = heldout_files()
    joined = b"".join(data for _, data in files)
    bits, count = nll_bits(model, joined)
    whole = {"bytes": len(joined), "model_bits_per_byte": round(bits / count, 4)}
    whole |= {f"{k}_bits_per_byte": round(v / len(joined), 4) for k, v in compressed_bits(joined).items()}
    by_file = {"model": 0.0, "xz_-9": 0, "gzip_-9": 0, "bytes": 0, "predicted": 0, "files_below_xz": 0}
    for _, data in tqdm(files, desc="held-out files", file=sys.stderr, disable=None):
        file_bits, file_count = nll_bits(model, data)
        packed = compressed_bits(data)
        by_file["model"] += file_bits
        by_file["predicted"] += file_count
        by_file["bytes"] += len(data)
        by_file["xz_-9"] += packed["xz_-9"]
        by_file["gzip_-9"] += packed["gzip_-9"]
        by_file["files_below_xz"] += file_bits / max(file_count, 1) < packed["xz_-9"] / len(data)
    report = {
        "model": str(args.model),
        "machine": cpu_description(),
        "threads": args.threads,
        "parameters": model.info()["parameters"],
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
        "decode_tokens_per_s": decode_speed(model, tokenizer),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
