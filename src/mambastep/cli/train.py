"""``mambastep train``: train or fine-tune a language model on text files (also under torchrun)."""

from __future__ import annotations

import argparse
import json

from mambastep.families.presets import BPE_CONFIG, BYTE_CONFIG
from mambastep.training import DataSettings, OptimSettings, TrainSettings, train
from mambastep.training.settings import PRECISIONS, WINDOW_STARTS


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        data=DataSettings(
            paths=tuple(args.data),
            include=tuple(args.include or ["*"]),
            exclude=tuple(args.exclude),
            skip_binary=args.skip_binary,
            tokenizer=args.tokenizer,
            holdout=args.holdout,
            seed=args.seed,
            window_seed=args.window_seed,
            seq_len=args.seq_len,
            window_starts=args.window_starts,
        ),
        optim=OptimSettings(
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
        ),
        out=args.out,
        config=args.config,
        init=args.init,
        n_layer=args.n_layer,
        steps=args.steps,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        resume=args.resume,
        stop_after=args.stop_after,
        threads=args.threads,
        compile=args.compile,
        progress=not args.no_progress,
    )
    record = train(settings)
    final = [e for e in record.get("eval", []) if e.get("final", e.get("full"))]  # "full": runs logged before "final"
    if record and args.json:
        print(
            json.dumps(
                {
                    "out": args.out,
                    "wall_s": record["wall_s"],
                    "final_eval": final[-1] if final else None,
                    "baselines": record["baselines"],
                }
            )
        )
    elif final:
        last, held_out = final[-1], record["data"]["heldout_tokens"]
        baselines = ", ".join(f"{name} {value:.3f}" for name, value in record["baselines"].items())
        print(
            f"held-out: {last['bits_per_byte']:.3f} bits per byte on {last['tokens_read']:,} of {held_out:,} tokens "
            f"(all held-out bytes: {baselines}); model in {args.out}/model"
        )
    return 0


def add_parser(sub) -> None:
    data, optim = DataSettings(paths=("-",)), OptimSettings()
    defaults = TrainSettings(data=data, out="-", config="-")
    tr = sub.add_parser("train", help="train or fine-tune a language model on text files (also under torchrun)")
    tr.add_argument("data", nargs="+", help="text files and folders (searched recursively)")
    tr.add_argument("--out", required=True, help="folder for model/, train_state.pt, log.json and curve.png")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config",
        help=f"built-in config name ({BYTE_CONFIG}: byte-level, 690k parameters, a start for text read as bytes; "
        f"{BPE_CONFIG}: the shape the bundled model started from, 5.6M parameters, for --tokenizer bpe:8192), "
        "or a config.json file (Hugging Face or state-spaces format)",
    )
    source.add_argument("--init", help="checkpoint to fine-tune")
    tr.add_argument(
        "--n-layer",
        type=int,
        default=None,
        help="with --init: deepen it to this many layers first; each new layer copies the one before it with "
        "its output projection at zero, so training starts from what --init computes (Mamba and Mamba-2)",
    )
    tr.add_argument(
        "--tokenizer",
        default=None,
        help="'bytes', 'bpe:N' (a byte-level BPE of N tokens learned from the training files, saved with the "
        "model), tokenizer.json or checkpoint (default: --init's, else bytes)",
    )
    tr.add_argument(
        "--include", action="append", default=[], help="glob on paths relative to a folder, e.g. '*.py' (repeatable)"
    )
    tr.add_argument("--exclude", action="append", default=[], help="glob of files to leave out (repeatable)")
    tr.add_argument("--skip-binary", action="store_true", help="skip files that are not UTF-8 text instead of failing")
    tr.add_argument(
        "--holdout", type=float, default=data.holdout, help="share of files held out (by a hash of their path)"
    )
    tr.add_argument("--seed", type=int, default=data.seed, help="seeds the split, the initialisation and the windows")
    tr.add_argument(
        "--window-seed",
        type=int,
        default=None,
        help="seeds the training windows' offsets instead (default: --seed), e.g. to go on from --init elsewhere",
    )
    tr.add_argument("--seq-len", type=int, default=data.seq_len)
    tr.add_argument(
        "--window-starts",
        choices=WINDOW_STARTS,
        default=data.window_starts,
        help="where a training window may start: at any token, or where a line starts, as a prompt does",
    )
    tr.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="optimiser steps in the whole run (with --resume, a larger value extends it)",
    )
    tr.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step over all processes")
    tr.add_argument("--lr", type=float, default=optim.lr)
    tr.add_argument("--min-lr-ratio", type=float, default=optim.min_lr_ratio)
    tr.add_argument("--warmup-steps", type=int, default=optim.warmup_steps)
    tr.add_argument("--weight-decay", type=float, default=optim.weight_decay)
    tr.add_argument("--grad-clip", type=float, default=optim.grad_clip, help="0 for off")
    tr.add_argument(
        "--precision", choices=PRECISIONS, default=defaults.precision, help="bf16: autocast the forward pass"
    )
    tr.add_argument("--device", default=defaults.device, help="cpu or cuda (under torchrun: one GPU per process)")
    tr.add_argument("--eval-every", type=int, default=defaults.eval_every)
    tr.add_argument(
        "--eval-tokens",
        type=int,
        default=defaults.eval_tokens,
        help="held-out tokens read by each evaluation (periodic and final)",
    )
    tr.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    tr.add_argument("--log-every", type=int, default=defaults.log_every)
    tr.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out (to a larger --steps, if given)"
    )
    tr.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after this step; resume later")
    tr.add_argument("--threads", type=int, default=None, help="intra-op threads per process")
    tr.add_argument(
        "--compile",
        action="store_true",
        help="compile each step's forward and backward with torch.compile (faster steps after a compile at the start)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    tr.set_defaults(func=run)
