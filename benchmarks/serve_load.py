"""`mambastep serve` under load: clients streaming completions over HTTP, against the same model
stepped in process in the same run.

For each number of concurrent clients: aggregate tokens/s, time to first token and the time
between tokens (p50, p99), errors. Then the same model's decode step in process at each of
those batch sizes: at batch 1 for the server's overhead on one stream, the others for what a
server could reach; a soak at 16 clients with the server's RSS sampled; and
many stored sessions with the server's RSS as they are added (the hot set bounds it). One JSON
document on stdout; a PNG of tokens/s and latency against clients.

    python benchmarks/serve_load.py --model mamba-130m --dtype bfloat16 --plot benchmarks/figures/serve_load.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from mambastep.cli.common import DEFAULT_MODEL
from mambastep.evidence.hardware import cpu_description, read_bandwidth
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.files.checkpoints import load, save
from mambastep.serve.process import ServeProcess
from mambastep.settings import EngineSettings


def _rss(server: ServeProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _stream_one(http: httpx.AsyncClient, prompt: str, tokens: int, record: dict) -> None:
    start = time.perf_counter()
    last, count = None, 0
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "stream": True, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            record["errors"] += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                record["errors"] += 1
                return
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                count += 1
                if last is None:
                    record["ttft"].append(now - start)
                else:
                    record["itl"].append(now - last)
                last = now
    record["tokens"] += count


async def stream_clients(url: str, clients: int, seconds: float, tokens: int) -> dict:
    record = {"ttft": [], "itl": [], "tokens": 0, "errors": 0, "requests": 0}
    deadline = time.perf_counter() + seconds

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while time.perf_counter() < deadline:
                record["requests"] += 1
                try:
                    await _stream_one(http, f"def client_{i}_{record['requests']}(x):\n", tokens, record)
                except httpx.HTTPError:
                    record["errors"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "wall_s": round(wall, 2),
        "requests": record["requests"],
        "errors": record["errors"],
        "tokens": record["tokens"],
        "tokens_per_s": round(record["tokens"] / wall, 1),
        "ttft_ms_p50": _ms(percentile(record["ttft"], 0.5)),
        "ttft_ms_p99": _ms(percentile(record["ttft"], 0.99)),
        "itl_ms_p50": _ms(percentile(record["itl"], 0.5)),
        "itl_ms_p99": _ms(percentile(record["itl"], 0.99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def _in_process_steps_ms(path: Path, dtype: str, quantize: str | None, threads: int, batches: list[int]) -> dict:
    """The median time (ms) of the model's decode step at each batch size, in this process."""
    model = load(path, dtype=getattr(torch, dtype), quantize=quantize, settings=EngineSettings(threads=threads))
    medians = {}
    for batch in batches:
        _, state = model.prefill(torch.zeros(batch, 16, dtype=torch.long))
        token, times = torch.zeros(batch, dtype=torch.long), []
        for _ in range(35):
            start = time.perf_counter()
            _, state = model.step(token, state)
            times.append(time.perf_counter() - start)
        medians[batch] = round(1000 * statistics.median(times[5:]), 2)
    return medians


def _sessions(url: str, count: int, server: ServeProcess) -> dict:
    """Create ``count`` sessions, the server's RSS sampled after every tenth of them."""
    rss = [(0, round(_rss(server) / 2**20, 1))]
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(count):
            response = http.post("/v1/sessions", json={"prompt": f"session {i}\n"})
            response.raise_for_status()
            if (i + 1) % max(1, count // 10) == 0:
                rss.append((i + 1, round(_rss(server) / 2**20, 1)))
        stored = http.get("/v1/sessions", params={"limit": 1}).json()["total"]
        state_bytes = response.json()["state_bytes"]
    return {
        "sessions": count,
        "stored": stored,
        "seconds": round(time.perf_counter() - start, 1),
        "state_bytes_each": state_bytes,
        "rss_mib_by_sessions": rss,
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["clients"]
    x = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    left.plot(x, [r["tokens_per_s"] for r in rows], "o-", label="server, over HTTP")
    ceiling = [r["in_process_tokens_per_s"] for r in rows]
    left.plot(x, ceiling, "o--", color="gray", label="in process, batched steps only")
    left.legend(fontsize=8)
    left.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s, all streams", title="throughput")
    left.set_xticks(x, [str(c) for c in x])
    for key, style in (("itl_ms_p50", "o-"), ("itl_ms_p99", "o--"), ("ttft_ms_p50", "s-"), ("ttft_ms_p99", "s--")):
        right.plot(x, [r[key] for r in rows], style, label=key.replace("_ms_", " ").replace("itl", "between tokens"))
    right.axhline(report["in_process_step_ms"], color="gray", lw=1, label="in-process step, batch 1")
    right.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency")
    right.set_xticks(x, [str(c) for c in x])
    right.legend(fontsize=8)
    fig.suptitle(f"mambastep serve, {report['model']} ({report['weights']}), 2 cores")
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-130m", choices=sorted(BUILTIN_CONFIGS), help="random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights (float32 dtype)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=30.0, help="per number of clients")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--soak", type=float, default=600.0, help="seconds at 16 clients (0: none)")
    parser.add_argument("--sessions", type=int, default=10000, help="sessions stored (bundled model; 0: none)")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.quantize:
        args.dtype = "float32"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save(random_model(args.model), tmp / "model", extra_config={"tokenizer": "bytes"})
        weights = args.quantize or args.dtype
        report = {
            "model": args.model,
            "weights": weights,
            "threads": args.threads,
            "tokens_per_completion": args.tokens,
            "machine": {
                **cpu_description(),
                "read_bandwidth_gb_s": round(read_bandwidth() / 1e9, 1),
            },
        }
        engine = ["--threads", str(args.threads), "--max-batch", str(max(args.clients)), "--queue", "1024"]
        engine += ["--quantize", args.quantize] if args.quantize else ["--dtype", args.dtype]
        server = ServeProcess(tmp / "model", tmp / "data", *engine)
        try:
            report["clients"] = []
            for clients in args.clients:
                row = asyncio.run(stream_clients(server.url, clients, args.seconds, args.tokens))
                print(json.dumps(row), file=sys.stderr)
                report["clients"].append(row)
            if args.soak:
                samples, stop = [], time.perf_counter() + args.soak

                async def soak():
                    task = asyncio.create_task(stream_clients(server.url, 16, args.soak, args.tokens))
                    while time.perf_counter() < stop:
                        samples.append(_rss(server))
                        await asyncio.sleep(5)
                    return await task

                row = asyncio.run(soak())
                steady = samples[len(samples) // 5 :]  # after the first fifth: allocators warm
                report["soak"] = {
                    **row,
                    "rss_mib_min": round(min(steady) / 2**20, 1),
                    "rss_mib_max": round(max(steady) / 2**20, 1),
                    "rss_samples": len(samples),
                }
        finally:
            server.stop()
        batches = sorted({1, *args.clients})
        steps = _in_process_steps_ms(tmp / "model", args.dtype, args.quantize, args.threads, batches)
        for row in report["clients"]:  # the same batch in process: what the server could reach
            ms = steps[row["clients"]]
            row["in_process_step_ms"], row["in_process_tokens_per_s"] = ms, round(1000 * row["clients"] / ms, 1)
        report["in_process_step_ms"] = steps[1]
        one = next((r for r in report["clients"] if r["clients"] == 1), None)
        if one and one["itl_ms_p50"]:
            report["server_step_over_in_process"] = round(one["itl_ms_p50"] / report["in_process_step_ms"], 3)
        sixteen = next((r for r in report["clients"] if r["clients"] == 16), None)
        if one and sixteen:
            report["tokens_per_s_16_over_1"] = round(sixteen["tokens_per_s"] / one["tokens_per_s"], 2)
        if args.sessions:
            small = ServeProcess(DEFAULT_MODEL, tmp / "sessions", "--threads", str(args.threads))
            try:
                report["stored_sessions"] = _sessions(small.url, args.sessions, small)
            finally:
                small.stop()
    if args.plot:
        _plot(report, args.plot)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
