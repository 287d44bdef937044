"""A stream of a million tokens or more through a Session: memory stays constant, numerics hold.

Feeds seeded random token ids in fixed chunks, sampling the process RSS and the time per
token along the way; checks every chunk's logits for NaN/Inf; then feeds the same tokens
again in one call and in chunks of random sizes (runs of single tokens among them) and
reports the largest difference of the final state and logits from the first run.
Prints JSON to stdout and plots RSS and time per token against tokens consumed.

    python benchmarks/stream_memory.py --tokens 1000000 --plot benchmarks/figures/stream_memory.png
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import mambastep
from mambastep import Session
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.memory import rss_bytes
from mambastep.settings import SCAN_KERNELS, EngineSettings

# fp32 end to end: other chunkings only reorder roundings, and the state forgets old ones.
TOLERANCE = 1e-4


def stream(model, tokens: torch.Tensor, chunk: int, sample_every: int) -> tuple[Session, list[dict], float]:
    """Feed ``tokens`` in chunks; return the session, the samples and the wall time."""
    session, samples, busy, since = Session(model), [], 0.0, 0
    start = time.perf_counter()
    for at in range(0, len(tokens), chunk):
        piece = tokens[at : at + chunk]
        t0 = time.perf_counter()
        session.feed(piece)
        busy += time.perf_counter() - t0
        since += len(piece)
        if not torch.isfinite(session.logits).all():
            raise FloatingPointError(f"non-finite logits after {session.position} tokens")
        if since >= sample_every or session.position == len(tokens):
            samples.append(
                {
                    "tokens": session.position,
                    "rss_mib": round(rss_bytes() / 2**20, 2),
                    "us_per_token": round(1e6 * busy / since, 3),
                    "state_finite": all(
                        torch.isfinite(t).all() for layer in session.state.layers for t in layer.tensors().values()
                    ),
                }
            )
            busy, since = 0.0, 0
    return session, samples, time.perf_counter() - start


def random_chunks(model, tokens: torch.Tensor, seed: int) -> Session:
    """The same tokens in chunks of 1 to 8192 tokens, one in ten preceded by 20 single tokens."""
    gen = torch.Generator().manual_seed(seed)
    session, at = Session(model), 0
    while at < len(tokens):
        if int(torch.randint(0, 10, (), generator=gen)) == 0:
            for token in tokens[at : at + 20].tolist():
                session.feed([token])
            at += 20
        size = int(torch.randint(1, 8193, (), generator=gen))
        session.feed(tokens[at : at + size])
        at += size
    return session


def max_abs_diff(a: Session, b: Session) -> dict:
    state = max(
        float((x - y).abs().max())
        for la, lb in zip(a.state.layers, b.state.layers)
        for x, y in zip(la.tensors().values(), lb.tensors().values())
    )
    return {"max_abs_diff_state": state, "max_abs_diff_logits": float((a.logits - b.logits).abs().max())}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["tokens"] / 1e6 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(x, [s["rss_mib"] for s in samples], marker=".")
    top.set_ylabel("process RSS (MiB)")
    top.set_ylim(0, max(s["rss_mib"] for s in samples) * 1.2)
    bottom.plot(x, [s["us_per_token"] for s in samples], marker=".", color="tab:orange")
    bottom.set_ylabel("time per token (µs)")
    bottom.set_ylim(0, max(s["us_per_token"] for s in samples) * 1.2)
    bottom.set_xlabel("tokens consumed (millions)")
    top.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per feed in the sampled run")
    parser.add_argument("--sample-every", type=int, default=20_000, help="tokens between samples")
    parser.add_argument("--warmup", type=int, default=100_000, help="tokens before RSS growth is counted")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1 keeps timings steady on a shared machine)"
    )
    parser.add_argument("--scan", choices=SCAN_KERNELS, default="auto", help="Mamba-1 prompt scan (see EngineSettings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/figures/stream_memory.png"))
    args = parser.parse_args()

    model = mambastep.load(args.model, settings=EngineSettings(scan=args.scan, threads=args.threads))
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(args.seed))
    gc.collect()
    session, samples, wall = stream(model, tokens, args.chunk, args.sample_every)
    warm = [s for s in samples if s["tokens"] >= args.warmup]
    at_warmup, after = warm[0]["rss_mib"], [s["rss_mib"] for s in warm]
    times = [s["us_per_token"] for s in warm]
    deciles = [round(q, 3) for q in statistics.quantiles(times, n=10)]

    whole = Session(model)
    whole.feed(tokens)
    chunked = random_chunks(model, tokens, args.seed + 1)
    chunking = [
        {"variant": "one feed of all tokens", **max_abs_diff(whole, session)},
        {"variant": "random chunks of 1..8192, with single-token runs", **max_abs_diff(chunked, session)},
    ]
    for row in chunking:
        row["within_tolerance"] = max(row["max_abs_diff_state"], row["max_abs_diff_logits"]) <= TOLERANCE

    name = "the bundled model" if args.model == str(DEFAULT_MODEL) else args.model
    plot(samples, args.plot, f"{args.tokens:,} tokens through {name}, chunks of {args.chunk}, {args.scan} scan")
    print(
        json.dumps(
            {
                "model": args.model,
                "fingerprint": model.config.fingerprint,
                "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                "threads": torch.get_num_threads(),
                "scan": args.scan,
                "tokens": args.tokens,
                "chunk": args.chunk,
                "state_bytes": session.state_bytes,
                "session_bytes": session.nbytes,
                "wall_s": round(wall, 2),
                "tokens_per_s": round(args.tokens / wall, 1),
                "us_per_token_after_warmup": {
                    "median": statistics.median(times),
                    "p10": deciles[0],
                    "p90": deciles[-1],
                    "max": max(times),
                },
                "rss_mib": {
                    "at_warmup": at_warmup,
                    "final": after[-1],
                    "max_after_warmup": max(after),
                    "growth_after_warmup": round(max(after) - at_warmup, 2),
                    "final_minus_at_warmup": round(after[-1] - at_warmup, 2),
                },
                "finite": all(s["state_finite"] for s in samples),
                "tolerance": TOLERANCE,
                "chunking": chunking,
                "plot": str(args.plot),
                "samples": samples,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
