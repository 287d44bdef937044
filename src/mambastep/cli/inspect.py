"""``mambastep inspect``: a PNG of what an SSM selects, Δ per token and the state norm."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambastep.cli.common import DEFAULT_MODEL, add_model_args, load_model
from mambastep.evidence.selection import labelled_input, parse_ids, plot_selection, selection_summary, trace_selection
from mambastep.evidence.tasks import TASKS
from mambastep.evidence.tasks.train import run_model, validation_sequence
from mambastep.files.tokenizer import TokenizerError, load_tokenizer


def _input(args: argparse.Namespace, model) -> tuple[torch.Tensor, list[str] | None, torch.Tensor | None]:
    """The tokens ``inspect`` traces, their labels and the positions to highlight, from
    --input, --input-file or --ids and --highlight-ids."""
    if args.ids is not None:
        tokens = parse_ids(args.ids, "--ids")
        try:  # labels only: a model without a tokenizer still gets a picture, labelled by id
            tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer)
        except (TokenizerError, OSError):
            tokenizer = None
    else:
        if args.input_file is not None:
            try:
                text = args.input_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise FileNotFoundError(f"no input file at {args.input_file}") from None
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"cannot read --input-file {args.input_file} as UTF-8 text ({err})") from None
        else:
            text = args.input
        tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer)
        tokens = tokenizer.encode(text)
    marked = None if args.highlight_ids is None else parse_ids(args.highlight_ids, "--highlight-ids")
    return labelled_input(tokens, model.config.vocab_size, tokenizer, marked)


def run(args: argparse.Namespace) -> int:
    if args.task is not None:
        args.model = str(run_model(args.task, None if args.model == str(DEFAULT_MODEL) else args.model))
    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    if args.ids is not None:
        parse_ids(args.ids, "--ids")  # validate before the slow part
    model = load_model(args)
    if args.task is not None:
        tokens, highlight = validation_sequence(Path(args.model), args.task, args.length, args.seed)
        labels = [str(t) for t in tokens.tolist()]
    else:
        tokens, labels, highlight = _input(args, model)
    trace = trace_selection(model, tokens, groups=args.groups, progress=True)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    if args.task is not None and name == "model":  # the model of a `tasks train` run: name the run
        name = Path(args.model).parent.name
    plot_selection(
        trace,
        args.out,
        labels=labels,
        highlight=highlight,
        title=f"what {name} ({trace.family}) selects over {trace.length} tokens: log Δ per token, "
        f"state norm below" + ("" if highlight is None else f"; red: {int(highlight.sum())} highlighted"),
    )
    summary = selection_summary(trace, highlight)
    if args.json:
        print(json.dumps({"png": str(args.out), "model": args.model, **summary}))
        return 0
    print(f"wrote {args.out}")
    for row in summary["layers"]:
        line = f"  layer {row['layer']:<3} mean Δ {row['mean_dt']:.4g}"
        if highlight is not None and row["highlighted_over_other"] is not None:
            line += f"   highlighted / other {row['highlighted_over_other']:.3g}"
        print(line + ("   (time-invariant)" if row["time_invariant"] else ""))
    if highlight is not None and summary["highlighted_over_other"] is not None:
        print(f"  all layers: Δ at highlighted positions is {summary['highlighted_over_other']:.3g}x Δ elsewhere")
    return 0


def add_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect", help="PNG of what an SSM selects: Δ per token and channel group, and the state norm"
    )
    add_model_args(ins)
    ins.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)",
    )
    source = ins.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", default=None, help="text to trace")
    source.add_argument("--input-file", type=Path, default=None, metavar="PATH", help="UTF-8 text file to trace")
    source.add_argument("--ids", default=None, help="comma-separated token ids, e.g. 3,1,4")
    source.add_argument(
        "--task",
        default=None,
        choices=sorted(TASKS),
        help="a validation sequence of this synthetic task, its key tokens highlighted "
        "(--model: a run of `mambastep tasks train`; default: the shipped S6 run)",
    )
    ins.add_argument(
        "--length", type=int, default=None, help="with --task: the sequence length (default: the training length)"
    )
    ins.add_argument("--seed", type=int, default=0, help="with --task: which validation sequence")
    ins.add_argument(
        "--highlight-ids",
        default=None,
        metavar="IDS",
        help="comma-separated token ids: mark the positions that hold them (e.g. data tokens)",
    )
    ins.add_argument(
        "--groups",
        type=int,
        default=16,
        help="channel groups per layer for Mamba-1 (Δ averaged within each); Mamba-2 shows every head",
    )
    ins.add_argument("--out", type=Path, default=Path("selection.png"), help="PNG to write (default: selection.png)")
    ins.add_argument("--json", action="store_true", help="print the summary (mean Δ per layer...) as JSON")
    ins.set_defaults(func=run)
