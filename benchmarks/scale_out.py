"""The server past one process: Ray Serve replicas over one PostgreSQL store, in the same run as
the single-process server on that store.

Sixteen clients, each with its own session, ask for a committed continuation again and again
(every answer is a write of the session's file to the store). Three ways of spending this
machine's cores: the single-process server with all its threads, one Ray replica with all of
them, and one replica per core. For each: tokens/s over all clients, request latency (p50,
p99), store writes/s and bytes per write. Then the takeover: a session's replica is killed
and the time of its next request (a one-token continuation) is compared with the same request
on a warm replica; beside it, the time to read the session's file from the store alone.
One JSON document on stdout.

    python benchmarks/scale_out.py --model mamba-130m --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
import torch
from ray import serve

from mambastep.evidence.hardware import cpu_description, read_bandwidth
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.files.checkpoints import save
from mambastep.serve.cluster import REPLICA_HEADER, app_builder
from mambastep.serve.local_postgres import PostgresServer
from mambastep.serve.process import ServeProcess, free_port
from mambastep.serve.store import open_store
from serve_load import percentile


def session_load(url: str, clients: int, seconds: float, tokens: int) -> dict:
    """``clients`` threads, each feeding its own session committed continuations of ``tokens``."""
    with httpx.Client(base_url=url, timeout=600) as http:
        sessions = [
            http.post("/v1/sessions", json={"prompt": f"def client_{i}(x):\n"}).json()["id"] for i in range(clients)
        ]
    latencies, written, errors = [], [], []
    deadline = time.perf_counter() + seconds
    body = {"max_tokens": tokens, "temperature": 0.8, "ignore_eos": True}

    def client(session: str) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                answer = http.post(f"/v1/sessions/{session}/generate", json=body)
                if answer.status_code != 200:
                    errors.append(answer.status_code)
                    continue
                latencies.append(time.perf_counter() - start)
                written.append(answer.json()["session"]["file_bytes"])
                done += len(answer.json()["tokens"])
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(client, sessions))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(generated / wall, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "latency_ms_p50": round(1000 * percentile(latencies, 0.5), 1),
        "latency_ms_p99": round(1000 * percentile(latencies, 0.99), 1),
        "store_writes_per_s": round(len(written) / wall, 2),
        "bytes_per_write": round(statistics.mean(written)),
    }


def running_engines() -> int:
    deployments = serve.status().applications["mambastep"].deployments
    return deployments["Engine"].replica_states.get("RUNNING", 0)


def takeover(url: str, store_url: str, trials: int) -> dict:
    """Kill the replica holding a session; the next request's time against a warm one's."""
    one = {"max_tokens": 1, "temperature": 0}
    warm, after, reads, sizes = [], [], [], []
    store = open_store(store_url)
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(trials):
                while running_engines() < 2:  # the replacement of the last one killed
                    time.sleep(0.5)
                session = http.post("/v1/sessions", json={"prompt": f"takeover {i}\n" * 32}).json()["id"]
                http.post(f"/v1/sessions/{session}/generate", json=one).raise_for_status()
                start = time.perf_counter()
                answer = http.post(f"/v1/sessions/{session}/generate", json=one)
                warm.append(time.perf_counter() - start)
                holder = answer.headers[REPLICA_HEADER]
                ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
                start = time.perf_counter()
                answer = http.post(f"/v1/sessions/{session}/generate", json=one)
                after.append(time.perf_counter() - start)
                assert answer.status_code == 200 and answer.headers[REPLICA_HEADER] != holder, answer.text
                start = time.perf_counter()
                stored = store.get(session, "local")
                reads.append(time.perf_counter() - start)
                sizes.append(len(stored.data))
    finally:
        store.close()
    return {
        "trials": trials,
        "warm_request_ms": round(1000 * statistics.median(warm), 1),
        "after_kill_request_ms": round(1000 * statistics.median(after), 1),
        "after_kill_request_ms_max": round(1000 * max(after), 1),
        "takeover_ms": round(1000 * (statistics.median(after) - statistics.median(warm)), 1),
        "store_read_ms": round(1000 * statistics.median(reads), 1),
        "session_file_bytes": sizes[-1],
    }


def main() -> int:
    with contextlib.redirect_stdout(sys.stderr):  # Ray's own messages: stdout is the report's
        report = measure()
    print(json.dumps(report, indent=1))
    return 0


def measure() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-130m", choices=sorted(BUILTIN_CONFIGS), help="random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="per configuration")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per continuation")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--takeovers", type=int, default=3)
    args = parser.parse_args()

    report = {
        "model": args.model,
        "weights": args.dtype,
        "machine": {**cpu_description(), "read_bandwidth_gb_s": round(read_bandwidth() / 1e9, 1)},
        "store": "PostgreSQL (local, fsync on)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save(random_model(args.model), tmp / "model", extra_config={"tokenizer": "bytes"})
        postgres = PostgresServer(fsync=True)
        try:
            common = {"model": str(tmp / "model"), "dtype": args.dtype, "max_batch": args.clients}
            store = postgres.create_database()
            engine = ["--threads", str(args.cores), "--dtype", args.dtype, "--max-batch", str(args.clients)]
            single = ServeProcess(tmp / "model", tmp / "single", *engine, store=store)
            try:
                report["single_process"] = session_load(single.url, args.clients, args.seconds, args.tokens)
            finally:
                single.stop()
            print(json.dumps(report["single_process"]), file=sys.stderr)
            ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            try:
                for name, replicas, threads in (
                    ("one_replica", 1, args.cores),
                    ("replica_per_core", args.cores, 1),
                ):
                    options = {**common, "replicas": replicas, "threads": threads, "store": store}
                    serve.run(app_builder(options), name="mambastep", route_prefix="/")
                    row = {"replicas": replicas, "threads_each": threads}
                    row |= session_load(url, args.clients, args.seconds, args.tokens)
                    report[name] = row
                    print(json.dumps(row), file=sys.stderr)
                    if replicas >= 2:
                        report["takeover"] = takeover(url, store, args.takeovers)
                    serve.delete("mambastep")
            finally:
                serve.shutdown()
                ray.shutdown()
        finally:
            postgres.close()
    base = report["single_process"]["tokens_per_s"]
    for name in ("one_replica", "replica_per_core"):
        report[name]["tokens_per_s_over_single_process"] = round(report[name]["tokens_per_s"] / base, 3)
    report["replica_per_core_over_one_replica"] = round(
        report["replica_per_core"]["tokens_per_s"] / report["one_replica"]["tokens_per_s"], 3
    )
    return report


if __name__ == "__main__":
    raise SystemExit(main())
