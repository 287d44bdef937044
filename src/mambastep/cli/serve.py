"""``mambastep serve``: the HTTP server (OpenAI-compatible completions, durable sessions)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mambastep.cli.common import DEFAULT_MODEL, add_model_args, load_model, refuse_random_weights
from mambastep.files.tokenizer import load_tokenizer
from mambastep.serve.settings import Limits, ServeSettings, read_keys_file


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from mambastep.serve.app import create_app

    refuse_random_weights(args.model)  # the model loads once the server runs: refused before it starts
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
    settings = ServeSettings(  # checked before anything loads: a refused address fails at once
        host=args.host,
        port=args.port,
        api_keys=keys,
        data_dir=args.data_dir,
        max_batch=args.max_batch,
        sessions_in_memory=args.sessions_in_memory,
        prefill_piece=args.prefill_piece,
        model_name=name,
        limits=limits,
    )
    app = create_app(settings, lambda: (load_model(args), load_tokenizer(args.model, tokenizer=args.tokenizer)))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def add_parser(sub) -> None:
    d, limits = ServeSettings(), Limits()
    sv = sub.add_parser("serve", help="HTTP server: OpenAI-compatible completions and durable sessions")
    add_model_args(sv)
    sv.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes'")
    sv.add_argument("--model-name", default=None, help="the model's name in /v1/models (default: from --model)")
    sv.add_argument("--host", default=d.host, help="address to listen on (not loopback: an API key is required)")
    sv.add_argument("--port", type=int, default=d.port)
    sv.add_argument("--data-dir", type=Path, default=d.data_dir, help="where sessions are stored (SQLite)")
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
    sv.set_defaults(func=run)
