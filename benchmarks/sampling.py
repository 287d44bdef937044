"""Cost of choosing each next token: mambastep's sampler against the straightforward one.

A decode step of a 130m model takes 11-35 ms on a 2-core CPU; the sampler runs once per
token on top of it, over the whole vocabulary. The baseline is the textbook sampler, run in
the same process and interleaved: a sort of the whole row for top-p and ``torch.multinomial``
for the draw. Two kinds of rows: "peaked" (logits of standard deviation 6: a few tokens
hold most of the probability, as after a confident prediction) and "flat" (standard deviation
2: the top-p nucleus holds thousands of tokens, the sampler's worst case). One JSON line per
case, times in ms per token (batch of one).

    python benchmarks/sampling.py --vocab 50280
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from mambastep.runtime.sampling import SamplingParams, sample

CASES = {
    "default": SamplingParams(),
    "top_k=50": SamplingParams(top_k=50),
    "top_p=0.9": SamplingParams(top_p=0.9),
    "top_k=50 top_p=0.9 temperature=0.8": SamplingParams(top_k=50, top_p=0.9, temperature=0.8),
    "min_p=0.05": SamplingParams(min_p=0.05),
}
ROWS = {"peaked": 6.0, "flat": 2.0}  # standard deviation of the logits


def straightforward_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The baseline for one row (1, vocab): the same filters, top-p by a sort of the whole row,
    then ``torch.multinomial``."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(params.top_k, dim=-1).values[:, -1:], -math.inf)
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
    return torch.multinomial(logits.softmax(-1)[0], 1, generator=generator)


def _ms_per_token(draw, tokens: int) -> float:
    start = time.perf_counter()
    for _ in range(tokens):
        draw()
    return 1000 * (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50280, help="vocabulary size (mamba-130m's: 50,280)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100, help="draws per timing")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timings of each sampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for row, std in ROWS.items():
        logits = torch.randn(1, args.vocab, generator=torch.Generator().manual_seed(0)) * std
        for case, params in CASES.items():
            ours, theirs = [], []
            generator = torch.Generator().manual_seed(0)
            draws = {
                "ours": lambda: sample(logits, params, [generator], [()]),
                "theirs": lambda: straightforward_sample(logits, params, generator),
            }
            for name in draws:  # warm-up
                _ms_per_token(draws[name], 3)
            for _ in range(args.repeats):
                ours.append(_ms_per_token(draws["ours"], args.tokens))
                theirs.append(_ms_per_token(draws["theirs"], args.tokens))
            ms, baseline = statistics.median(ours), statistics.median(theirs)
            print(
                json.dumps(
                    {
                        "vocab": args.vocab,
                        "row": row,
                        "params": case,
                        "ms_per_token": round(ms, 3),
                        "straightforward_ms_per_token": round(baseline, 3),
                        "speedup": round(baseline / ms, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
