"""``mambastep tasks``: the Mamba paper's synthetic tasks, trained and evaluated by length."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambastep.evidence.tasks import TASKS
from mambastep.evidence.tasks.evaluate import EvalSettings, evaluate, markdown_table, parse_lengths, plot_accuracy
from mambastep.evidence.tasks.layers import LAYERS
from mambastep.evidence.tasks.train import TaskTrainSettings, shipped_runs, train_task
from mambastep.training.settings import OptimSettings


def cmd_tasks_train(args: argparse.Namespace) -> int:
    task_settings = {
        k: v
        for k, v in {"train_length": args.length, "n_memorize": args.n_memorize, "vocab_size": args.vocab_size}.items()
        if v is not None
    }
    record = train_task(
        TaskTrainSettings(
            task=args.name,
            layer=args.layer,
            out=str(args.out or f"{args.name}-{args.layer}"),
            task_settings=task_settings,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            optim=OptimSettings(lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0),
            eval_every=args.eval_every,
            eval_count=args.eval_count,
            stop_at=args.stop_at,
            threads=args.threads,
            init=str(args.init) if args.init else None,
        )
    )
    summary = {
        k: record[k] for k in ("task", "layer", "train_length", "steps", "wall_s", "validation_accuracy", "parameters")
    }
    print(
        json.dumps(summary)
        if args.json
        else f"{args.name}, {args.layer}: validation accuracy {100 * record['validation_accuracy']:.1f}% after "
        f"{record['steps']} steps ({record['wall_s']:.0f} s); wrote {args.out or f'{args.name}-{args.layer}'}"
    )
    return 0


def cmd_tasks_eval(args: argparse.Namespace) -> int:
    runs = [Path(m) for m in args.model] if args.model else shipped_runs(args.name)
    if not runs:
        raise FileNotFoundError(f"no trained model of {args.name!r} ships with mambastep: pass --model")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        lengths=parse_lengths(args.lengths),
        count=args.count,
        batch_size=args.batch_size,
        time_budget_s=args.time_budget,
        memory_budget=int(args.memory_budget * 2**30) if args.memory_budget else None,
    )
    report = evaluate(args.name, runs, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot = plot_accuracy(report, args.out / "accuracy.png")
    table = markdown_table(report)
    (args.out / "table.md").write_text(table + "\n")
    print(json.dumps(report) if args.json else f"{table}\n\nwrote {args.out / 'report.json'}, {plot}")
    return 0


def add_parser(sub) -> None:
    tasks = sub.add_parser("tasks", help="the Mamba paper's synthetic tasks: selective copying, induction heads")
    verbs = tasks.add_subparsers(dest="tasks_command", required=True)
    tr = verbs.add_parser("train", help="train a 2-layer model of one layer type on a task (fresh data every step)")
    tr.add_argument("name", choices=sorted(TASKS))
    tr.add_argument(
        "--layer",
        choices=LAYERS,
        required=True,
        help="s6: Mamba (selective); s4d: Mamba block, time-invariant SSM; mamba2; attention: transformer with RoPE",
    )
    tr.add_argument("--out", type=Path, default=None, help="run directory (default: NAME-LAYER)")
    tr.add_argument("--length", type=int, default=None, help="training length in tokens (default: the paper's)")
    tr.add_argument("--n-memorize", type=int, default=None, help="selective copying: data tokens to copy (default 16)")
    tr.add_argument("--vocab-size", type=int, default=None, help="tokens, special ones included (default 16)")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--eval-count", type=int, default=256, help="validation sequences")
    tr.add_argument("--stop-at", type=float, default=None, help="stop once validation accuracy reaches this (e.g. 1.0)")
    tr.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from this run's weights (same task, layer and length; fresh optimiser and schedule)",
    )
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_tasks_train)
    ev = verbs.add_parser("eval", help="accuracy by sequence length, in constant memory for SSMs")
    ev.add_argument("name", choices=sorted(TASKS))
    ev.add_argument(
        "--model", nargs="+", default=None, help="run directories of `tasks train` (default: the shipped runs)"
    )
    ev.add_argument("--lengths", default="64..1048576", help="'A..B' (powers of two) or a comma-separated list")
    ev.add_argument("--count", type=int, default=16, help="validation sequences per length")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--time-budget", type=float, default=600.0, help="skip a length predicted to take longer (seconds)")
    ev.add_argument(
        "--memory-budget", type=float, default=None, help="GiB a model's state may take (default: 80%% of free memory)"
    )
    ev.add_argument(
        "--out", type=Path, default=Path("tasks-eval"), help="directory for report.json, table.md, accuracy.png"
    )
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_tasks_eval)
