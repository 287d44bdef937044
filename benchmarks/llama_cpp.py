"""llama.cpp against mambastep on the same random-weight Mamba-1 model, on this CPU.

Saves a random-weight checkpoint of a built-in Mamba-1 configuration (Hugging Face
format), converts it to GGUF in each type with llama.cpp's own convert_hf_to_gguf.py,
then for each type, interleaved repeat by repeat in the same run, measures batch 1:

- llama.cpp: one ``llama-bench -p PROMPT -n STEPS -t THREADS -r 1 -o json`` per repeat
  (it runs its own warm-up): prefill tokens/s (ppPROMPT) and decode ms/token (tgSTEPS);
- mambastep on the same weights (f32: float32; bf16: bfloat16; q8_0: float32 with int8
  weight-only linear layers), decode as ``--decode`` says: decode ms/token as ``mambastep bench``
  measures it (model.step after a warm-up step, from a state prefilled with 16 tokens),
  and prefill tokens/s of model.prefill on a PROMPT-token prompt (after one untimed
  warm-up prefill).

Prints one JSON document: medians over the repeats, and ratios of mambastep's speed
to llama.cpp's (above 1: mambastep is faster). The weights' values do not matter for
speed. No tokenizer is needed: for a Mamba checkpoint without tokenizer files the
converter writes the GPT-NeoX vocabulary that ships with llama.cpp
(models/ggml-vocab-gpt-neox.gguf), the tokenizer of the released Mamba models.

Run it on an otherwise idle machine: with as many threads as cores, llama.cpp's
threads spin at a barrier per graph node, and a competing process (a test suite, say)
slows its decode by an order of magnitude or more. On x86, llama.cpp's only extra
weight layout for these types is AMX (q8_0); where AMX tile instructions fault (as in
some VMs; llama-bench then dies of SIGILL or SIGSEGV), pass --no-repack.

Build llama.cpp for the CPU first, e.g. the tree vendored in the llama-cpp-python
sdist (vendor/llama.cpp), and have torch, numpy and transformers in this Python for
its converter (it imports its own gguf-py from the tree):

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON
    cmake --build build --config Release -j --target llama-bench

    python benchmarks/llama_cpp.py --llama-cpp /path/to/llama.cpp --threads 2 --no-repack --json-out llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import mambastep
from mambastep.evidence.bench import _ours_decode, _seconds
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.files.checkpoints import load, save
from mambastep.models.config import MambaConfig
from mambastep.settings import EngineSettings

# GGUF type -> mambastep weights of the same precision: (dtype, quantize).
TYPES = {"f32": (torch.float32, None), "bf16": (torch.bfloat16, None), "q8_0": (torch.float32, "int8")}
MAMBA1 = [name for name, config in BUILTIN_CONFIGS.items() if isinstance(config, MambaConfig)]
CONTEXT = 16  # tokens prefilled before decode, as in `mambastep bench`


def _tools(root: Path) -> tuple[Path, Path]:
    """The converter and llama-bench of the llama.cpp tree at ``root``; exits with a one-line
    error if one is missing."""
    convert, bench = root / "convert_hf_to_gguf.py", root / "build" / "bin" / "llama-bench"
    if not root.is_dir():
        sys.exit(f"error: --llama-cpp {root}: no such directory")
    if not convert.is_file():
        sys.exit(f"error: --llama-cpp {root}: no convert_hf_to_gguf.py there; not a llama.cpp source tree")
    if not bench.is_file():
        sys.exit(
            f"error: no {bench}; build it: cmake -B build -DCMAKE_BUILD_TYPE=Release "
            "&& cmake --build build --target llama-bench"
        )
    return convert, bench


def _run(command: list[str]) -> str:
    """Run ``command``; its stdout, or exit with the tail of its stderr."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode < 0:
        sys.exit(
            f"error: {command[0]} died of {signal.Signals(-done.returncode).name}; "
            "where llama.cpp's AMX kernels fault (some VMs), run with --no-repack"
        )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        sys.exit(f"error: {' '.join(command)} exited with {done.returncode}:\n{tail}")
    return done.stdout


def _llama_bench(
    bench: Path, gguf: Path, threads: int, prompt: int, steps: int, repack: bool
) -> tuple[float, float, dict]:
    """One llama-bench run: (prefill tokens/s, decode seconds/token, its JSON record of the decode test)."""
    tests = json.loads(
        _run(
            [
                str(bench),
                "-m",
                str(gguf),
                "-t",
                str(threads),
                "-p",
                str(prompt),
                "-n",
                str(steps),
                "-r",
                "1",
                "--repack",
                str(int(repack)),
                "-o",
                "json",
            ]
        )
    )
    pp = next(t for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == steps and t["n_prompt"] == 0)
    return pp["avg_ts"], 1 / tg["avg_ts"], tg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-cpp", type=Path, required=True, help="llama.cpp source tree with a build (build/bin/llama-bench)"
    )
    parser.add_argument(
        "--model", default="mamba-130m", choices=MAMBA1, help="built-in Mamba-1 configuration (random weights)"
    )
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES), help="GGUF weight types")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="run llama-bench with --repack 0: no extra weight layouts, so no AMX kernels (on x86 the "
        "only extra layout for these types); for machines where AMX tile instructions fault",
    )
    parser.add_argument(
        "--decode", choices=["eager", "compiled"], default="compiled", help="mambastep's decode backend"
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON document here")
    args = parser.parse_args()
    if min(args.threads, args.prompt, args.decode_steps, args.repeats) < 1:
        parser.error("--threads, --prompt, --decode-steps and --repeats must be positive")
    convert, bench = _tools(args.llama_cpp.resolve())

    report = {
        "model": args.model,
        "threads": args.threads,
        "prompt_tokens": args.prompt,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "decode": args.decode,
        "llama_cpp_repack": not args.no_repack,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"mambastep": mambastep.__version__, "torch": torch.__version__},
        "types": [],
    }
    progress = tqdm(total=len(args.types) * (1 + args.repeats), desc="llama.cpp vs mambastep", disable=None)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save(random_model(args.model), Path(tmp) / args.model)
        settings = EngineSettings(decode=args.decode, threads=args.threads)
        gen = torch.Generator().manual_seed(0)
        for kind in args.types:
            gguf = Path(tmp) / f"{args.model}-{kind}.gguf"
            _run([sys.executable, str(convert), str(checkpoint), "--outtype", kind, "--outfile", str(gguf)])
            dtype, quantize = TYPES[kind]
            model = load(checkpoint, dtype=dtype, settings=settings, quantize=quantize)
            prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
            _, state = model.prefill(prompt[:, :CONTEXT])
            model.prefill(prompt)  # warm-up: the fused scan kernel is built on first use
            progress.update()
            theirs, mine = [], []
            for _ in range(args.repeats):
                theirs.append(
                    _llama_bench(bench, gguf, args.threads, args.prompt, args.decode_steps, not args.no_repack)
                )
                mine.append(
                    (
                        args.prompt / _seconds(lambda: model.prefill(prompt)),
                        _ours_decode(model, state, args.decode_steps),
                    )
                )
                progress.update()
            llama_tps, llama_s = (statistics.median(r[i] for r in theirs) for i in (0, 1))
            ours_tps, ours_s = (statistics.median(r[i] for r in mine) for i in (0, 1))
            record = theirs[-1][2]
            report["versions"]["llama_cpp"] = {k: record[k] for k in ("build_commit", "build_number", "backends")}
            report["cpu"] = record["cpu_info"]
            report["types"].append(
                {
                    "type": kind,
                    "mambastep_dtype": str(dtype).removeprefix("torch."),
                    "mambastep_quantize": quantize,
                    "gguf_mib": round(gguf.stat().st_size / 2**20, 1),
                    "llama_cpp": {
                        "decode_ms_per_token": round(1000 * llama_s, 2),
                        "prefill_tokens_per_s": round(llama_tps, 1),
                    },
                    "mambastep": {
                        "decode_ms_per_token": round(1000 * ours_s, 2),
                        "prefill_tokens_per_s": round(ours_tps, 1),
                    },
                    "decode_speed_ratio": round(llama_s / ours_s, 2),
                    "prefill_speed_ratio": round(ours_tps / llama_tps, 2),
                }
            )
    progress.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
