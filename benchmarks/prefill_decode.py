"""Prefill tokens/s and decode ms/token, mambastep against `transformers` in the same run.

Random weights in the published configurations (no download needed). Each
measurement alternates mambastep and the baseline, and reports the median of
the repeats and the ratio baseline / mambastep (> 1 means mambastep is faster).

    python benchmarks/prefill_decode.py --models mamba-130m mamba2-130m --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import mambastep
from mambastep.configs import BUILTIN_CONFIGS
from mambastep.loading import save

CONFIGS = {name: BUILTIN_CONFIGS[name] for name in ("mamba-130m", "mamba2-130m")}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ours_decode(model, prompt, steps):
    last, state = model.prefill(prompt)
    token = last.argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        last, state = model.step(token, state)
        token = last.argmax(-1)
    return (time.perf_counter() - start) / steps


def _theirs_decode(ref, prompt, steps):
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        one = _timed(lambda: ref.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs))
        many = _timed(lambda: ref.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs))
    return (many - one) / steps


def bench(name: str, prompt_len: int, steps: int, repeats: int, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS[name]
    ours = mambastep.models.model_class(config)(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save(ours, tmp)
        ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    ours = ours.to(dtype)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    short = prompt[:, :16]
    rows = {"prefill_ours": [], "prefill_theirs": [], "decode_ours": [], "decode_theirs": []}
    ours.prefill(short), _ours_decode(ours, short, 2)  # warm-up
    for _ in range(repeats):
        rows["prefill_ours"].append(_timed(lambda: ours.prefill(prompt)))
        with torch.no_grad():
            rows["prefill_theirs"].append(_timed(lambda: ref(prompt)))
        rows["decode_ours"].append(_ours_decode(ours, short, steps))
        rows["decode_theirs"].append(_theirs_decode(ref, short, steps))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_len,
        "prefill_tokens_per_s": round(prompt_len / med["prefill_ours"], 1),
        "prefill_tokens_per_s_transformers": round(prompt_len / med["prefill_theirs"], 1),
        "prefill_speedup": round(med["prefill_theirs"] / med["prefill_ours"], 2),
        "decode_ms_per_token": round(1000 * med["decode_ours"], 2),
        "decode_ms_per_token_transformers": round(1000 * med["decode_theirs"], 2),
        "decode_speedup": round(med["decode_theirs"] / med["decode_ours"], 2),
        "state_bytes_per_sequence": ours.new_state(1).nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        print(json.dumps(bench(name, args.prompt_len, args.decode_steps, args.repeats, getattr(torch, args.dtype))), flush=True)


if __name__ == "__main__":
    main()
