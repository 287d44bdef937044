"""``mambastep stream``: standard input into a session as it arrives, with live reports on stderr."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from mambastep.cli.common import add_model_args, add_sampling_args, load_model, sampling_params
from mambastep.files.tokenizer import load_tokenizer
from mambastep.runtime.stream import StreamSettings, input_kind, run_stream


def run(args: argparse.Namespace) -> int:
    requested = "bytes" if args.bytes else "ids" if args.ids else None
    needs_tokenizer = requested is None or args.generate_every or args.tokenizer
    settings = StreamSettings(  # validate before the slow part
        save_state=None if args.no_save else args.save_state or args.resume,
        resume=args.resume,
        overwrite=args.overwrite,
        other_weights=args.other_weights,
        generate_every=args.generate_every,
        params=sampling_params(args),
        report_every=args.report_every,
        json=args.json,
    )
    model = load_model(args)
    tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer) if needs_tokenizer else None
    settings = replace(settings, input=input_kind(requested, tokenizer))
    return run_stream(settings, model, tokenizer, sys.stdin.buffer, sys.stdout, sys.stderr)


def add_parser(sub) -> None:
    st = sub.add_parser("stream", help="feed standard input to a model as it arrives, with live reports on stderr")
    add_model_args(st)
    st.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)",
    )
    kind = st.add_mutually_exclusive_group()
    kind.add_argument(
        "--bytes",
        action="store_true",
        help="each input byte is a token id (the default for byte-level models; else text, a line at a time)",
    )
    kind.add_argument("--ids", action="store_true", help="the input is whitespace-separated token ids")
    save = st.add_mutually_exclusive_group()
    save.add_argument(
        "--save-state",
        type=Path,
        default=None,
        metavar="FILE",
        help="session file written (atomically) at end of input, on Ctrl-C and after an input error; "
        "an existing file is refused unless it is the one resumed (default: the --resume file, else none)",
    )
    save.add_argument("--no-save", action="store_true", help="with --resume: do not save the session back")
    st.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="FILE",
        help="session file to continue (from --save-state); saved back to FILE unless --save-state or --no-save",
    )
    st.add_argument(
        "--overwrite", action="store_true", help="let --save-state replace a session file that was not resumed"
    )
    st.add_argument(
        "--other-weights",
        action="store_true",
        help="resume a session saved with other weights of the same architecture (another dtype, int8, a fine-tune)",
    )
    st.add_argument(
        "--generate-every",
        type=int,
        default=0,
        metavar="N",
        help="every N tokens, write a continuation to stdout (from a copy: the stream is unchanged)",
    )
    add_sampling_args(st)
    st.add_argument("--report-every", type=float, default=1.0, metavar="SECONDS", help="0: after every chunk")
    st.add_argument("--json", action="store_true", help="reports and continuations as JSON lines")
    st.set_defaults(func=run)
