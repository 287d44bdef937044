"""``mambastep serve``: the HTTP server (OpenAI-compatible completions, durable sessions)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mambastep.cli.common import DEFAULT_MODEL, add_model_args, load_model, refuse_random_weights
from mambastep.files.tokenizer import load_tokenizer
from mambastep.serve.settings import Limits, ServeError, ServeSettings, read_keys_file
from mambastep.serve.store import StoreUnavailable


def run(args: argparse.Namespace) -> int:
    refuse_random_weights(args.model)  # the model loads once the server runs: refused before it starts
    settings = serve_settings(args)  # checked before anything loads: a refused address fails at once
    if args.ray:
        from mambastep.serve import cluster

        return cluster.run(args, settings)
    if args.ray_address or args.replicas != "1":
        raise ServeError("--ray-address and --replicas need --ray")
    import uvicorn

    from mambastep.serve.app import create_app

    try:  # the store is opened first: an unreachable database fails at once, before the model loads
        app = create_app(settings, lambda: load_model_and_tokenizer(args))
    except (StoreUnavailable, ModuleNotFoundError) as err:
        raise ServeError(str(err)) from None
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings from its flags."""
    keys = tuple(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else ())
    limits = Limits(
        body_bytes=args.max_body_bytes,
        import_bytes=args.max_import_bytes,
        max_tokens=args.max_tokens,
        prompt_tokens=args.max_prompt_tokens,
        sessions_per_key=args.sessions_per_key,
        n=args.max_n,
        queue=args.queue,
    )
    name = args.model_name or ("mambastep-default" if args.model == str(DEFAULT_MODEL) else Path(args.model).name)
    return ServeSettings(
        host=args.host,
        port=args.port,
        api_keys=keys,
        data_dir=args.data_dir or ServeSettings.data_dir,
        store=args.store,
        max_batch=args.max_batch,
        sessions_in_memory=args.sessions_in_memory,
        prefill_piece=args.prefill_piece,
        model_name=name,
        limits=limits,
    )


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model and tokenizer the flags name."""
    return load_model(args), load_tokenizer(args.model, tokenizer=args.tokenizer)


def _replicas(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive number of replicas or 'auto', got {value!r}")
    return value


def add_parser(sub) -> None:
    d, limits = ServeSettings(), Limits()
    sv = sub.add_parser("serve", help="HTTP server: OpenAI-compatible completions and durable sessions")
    add_model_args(sv)
    sv.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes'")
    sv.add_argument("--model-name", default=None, help="the model's name in /v1/models (default: from --model)")
    sv.add_argument("--host", default=d.host, help="address to listen on (not loopback: an API key is required)")
    sv.add_argument("--port", type=int, default=d.port)
    where = sv.add_mutually_exclusive_group()
    where.add_argument(
        "--data-dir", type=Path, default=None, help=f"where sessions are stored, in SQLite (default: {d.data_dir})"
    )
    where.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="where sessions are stored: sqlite:///DIR (as --data-dir DIR) or postgresql://USER@HOST:PORT/DBNAME "
        "(servers that share their sessions; needs the cluster extra)",
    )
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY", help="a key callers present (repeatable)")
    sv.add_argument("--api-keys-file", type=Path, default=None, metavar="FILE", help="keys, one a line")
    sv.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded in one step")
    sv.add_argument("--sessions-in-memory", type=int, default=d.sessions_in_memory, help="sessions kept hot")
    sv.add_argument("--prefill-piece", type=int, default=d.prefill_piece, help="prompt tokens read per decode step")
    sv.add_argument("--max-tokens", type=int, default=limits.max_tokens, help="tokens one request may generate")
    sv.add_argument("--max-prompt-tokens", type=int, default=limits.prompt_tokens, help="input tokens per request")
    sv.add_argument("--max-body-bytes", type=int, default=limits.body_bytes)
    sv.add_argument("--max-import-bytes", type=int, default=limits.import_bytes, help="an imported session file")
    sv.add_argument("--sessions-per-key", type=int, default=limits.sessions_per_key)
    sv.add_argument("--max-n", type=int, default=limits.n, help="completions per prompt")
    sv.add_argument("--queue", type=int, default=limits.queue, help="requests waiting or running (then 429)")
    ray = sv.add_argument_group("scale-out (Ray Serve; needs the [cluster] extra)")
    ray.add_argument("--ray", action="store_true", help="run the server as a Ray Serve application")
    ray.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start one on this machine)")
    ray.add_argument(
        "--replicas",
        type=_replicas,
        default="1",
        help="model replicas, or 'auto' for Ray Serve's autoscaling (see docs/scale-out.md)",
    )
    sv.set_defaults(func=run)
