"""The ``mambastep`` command: one entry point, one subcommand per job.

Each subcommand fills the same objects the library uses (``SamplingParams``,
``load`` arguments), so the command line and the API never disagree. Errors
in what the user passed are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mambastep.config import ConfigError
from mambastep.generation import SamplingParams, generate
from mambastep.loading import CheckpointError, load
from mambastep.models.int8 import Int8Linear
from mambastep.settings import DECODE_BACKENDS, MATVEC_KERNELS, PROMPT_MATMULS, SCAN_KERNELS, EngineSettings
from mambastep.state import StateError
from mambastep.tasks import TASKS
from mambastep.tokenizer import TokenizerError, load_tokenizer
from mambastep.training import DataSettings, OptimSettings, TrainSettings, train
from mambastep.training.settings import PRECISIONS

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USER_ERRORS = (CheckpointError, ConfigError, TokenizerError, StateError, ValueError, FileNotFoundError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="checkpoint directory or Hugging Face Hub id (default: the bundled model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_engine_args(parser)
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers (CPU, float32)")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    engine = EngineSettings()
    parser.add_argument("--scan", choices=SCAN_KERNELS, default=engine.scan,
                        help="Mamba-1 and Mamba-2 prompt scans: fused CPU kernels, PyTorch, or auto")
    parser.add_argument("--matvec", choices=MATVEC_KERNELS, default=engine.matvec,
                        help="decode-step products: fused CPU kernel (float32/bfloat16/int8 weights), PyTorch, or auto")
    parser.add_argument("--prompt-matmul", choices=PROMPT_MATMULS, default=engine.prompt_matmul,
                        help="float32 prompt products: oneDNN, PyTorch (MKL on x86), or auto (oneDNN on non-Intel x86)")
    parser.add_argument("--decode", choices=DECODE_BACKENDS, default=engine.decode,
                        help="compiled: torch.compile the decode step (one-time compile, cached; faster steps)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                        help="keep the weights in ordinary 4 KiB pages (default: moved into transparent huge pages)")


def _engine_settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(scan=args.scan, matvec=args.matvec, prompt_matmul=args.prompt_matmul,
                          decode=args.decode, threads=args.threads, huge_pages=args.huge_pages)


def _load_model(args: argparse.Namespace):
    settings = _engine_settings(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    return load(args.model, dtype=dtype, device=args.device, settings=settings, quantize=args.quantize)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The flags that ``_sampling_params`` reads."""
    defaults = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 for greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 for off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--min-p", type=float, default=defaults.min_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # validate before the slow part
    model = _load_model(args)
    tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer)
    start, first, pieces = time.perf_counter(), None, []
    for piece in generate(model, tokenizer, args.prompt, params):
        first = first or time.perf_counter()
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    end = time.perf_counter()
    if args.json:
        print(json.dumps({
            "model": args.model,
            "prompt": args.prompt,
            "completion": "".join(pieces),
            "params": asdict(params),
            "time_to_first_piece_s": round((first or end) - start, 4),
            "total_s": round(end - start, 4),
        }))
    else:
        sys.stdout.write("\n")
    return 0


def model_info(model) -> dict:
    """What a user wants to know before running a model: size and state cost."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    int8 = [m.weight_int8 for m in model.modules() if isinstance(m, Int8Linear)]
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # weights, int8 and scales
    return {
        "family": model.config.family,
        "fingerprint": model.config.fingerprint,
        "config": asdict(model.config),
        "parameters": sum(t.numel() for t in [*params, *int8]),
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "dtype": str(model.dtype).removeprefix("torch."),
        "state_bytes_per_sequence": model.new_state(batch_size=1).nbytes,
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(_load_model(args))
    if args.json:
        print(json.dumps(info))
        return 0
    for key in ("family", "fingerprint", "dtype", "parameters", "weight_bytes", "state_bytes_per_sequence"):
        print(f"{key:26} {info[key]:,}" if isinstance(info[key], int) else f"{key:26} {info[key]}")
    for key, value in info["config"].items():
        print(f"  {key:24} {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        data=DataSettings(
            paths=tuple(args.data), include=tuple(args.include or ["*"]), exclude=tuple(args.exclude),
            skip_binary=args.skip_binary, tokenizer=args.tokenizer, holdout=args.holdout, seed=args.seed,
            seq_len=args.seq_len,
        ),
        optim=OptimSettings(
            lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ),
        out=args.out, config=args.config, init=args.init, steps=args.steps, batch_size=args.batch_size,
        precision=args.precision, device=args.device, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
        stop_after=args.stop_after, threads=args.threads, progress=not args.no_progress,
    )
    record = train(settings)
    final = [e for e in record.get("eval", []) if e["full"]]
    if record and args.json:
        print(json.dumps({"out": args.out, "wall_s": record["wall_s"], "final_eval": final[-1] if final else None,
                          "baselines": record["baselines"]}))
    elif final:
        baselines = ", ".join(f"{name} {value:.3f}" for name, value in record["baselines"].items())
        print(f"held-out: {final[-1]['bits_per_byte']:.3f} bits per byte ({baselines}); model in {args.out}/model")
    return 0


def _add_train_parser(sub) -> None:
    data, optim = DataSettings(paths=("-",)), OptimSettings()
    run = TrainSettings(data=data, out="-", config="-")
    tr = sub.add_parser("train", help="train or fine-tune a language model on text files (also under torchrun)")
    tr.add_argument("data", nargs="+", help="text files and folders (searched recursively)")
    tr.add_argument("--out", required=True, help="folder for model/, train_state.pt, log.json and curve.png")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="built-in config name, or a config.json file (Hugging Face or state-spaces format)")
    source.add_argument("--init", help="checkpoint to fine-tune")
    tr.add_argument("--tokenizer", default=None, help="'bytes', tokenizer.json or checkpoint (default: --init's, else bytes)")
    tr.add_argument("--include", action="append", default=[], help="glob on paths relative to a folder, e.g. '*.py' (repeatable)")
    tr.add_argument("--exclude", action="append", default=[], help="glob of files to leave out (repeatable)")
    tr.add_argument("--skip-binary", action="store_true", help="skip files that are not UTF-8 text instead of failing")
    tr.add_argument("--holdout", type=float, default=data.holdout, help="share of files held out (by a hash of their path)")
    tr.add_argument("--seed", type=int, default=data.seed)
    tr.add_argument("--seq-len", type=int, default=data.seq_len)
    tr.add_argument("--steps", type=int, default=run.steps)
    tr.add_argument("--batch-size", type=int, default=run.batch_size, help="sequences per step over all processes")
    tr.add_argument("--lr", type=float, default=optim.lr)
    tr.add_argument("--min-lr-ratio", type=float, default=optim.min_lr_ratio)
    tr.add_argument("--warmup-steps", type=int, default=optim.warmup_steps)
    tr.add_argument("--weight-decay", type=float, default=optim.weight_decay)
    tr.add_argument("--grad-clip", type=float, default=optim.grad_clip, help="0 for off")
    tr.add_argument("--precision", choices=PRECISIONS, default=run.precision, help="bf16: autocast the forward pass")
    tr.add_argument("--device", default=run.device, help="cpu or cuda (under torchrun: one GPU per process)")
    tr.add_argument("--eval-every", type=int, default=run.eval_every)
    tr.add_argument("--eval-tokens", type=int, default=run.eval_tokens, help="held-out tokens per periodic evaluation")
    tr.add_argument("--checkpoint-every", type=int, default=run.checkpoint_every)
    tr.add_argument("--log-every", type=int, default=run.log_every)
    tr.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    tr.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after this step; resume later")
    tr.add_argument("--threads", type=int, default=None, help="intra-op threads per process")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    tr.set_defaults(func=cmd_train)


def _hardware(args: argparse.Namespace):
    """The profile for the roofline: --calibrate (or no --hardware where there is no default)
    measures this machine, else --hardware names a built-in part or a JSON file."""
    from mambastep.hardware import calibrate, get_hardware

    hardware = calibrate() if args.calibrate or args.hardware is None else get_hardware(args.hardware)
    if args.save_hardware:
        args.save_hardware.write_text(json.dumps(hardware.to_dict(), indent=2) + "\n")
    return hardware


def _add_hardware_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    from mambastep.hardware import BUILTIN_HARDWARE

    parser.add_argument("--hardware", default=default,
                        help=f"profile for the roofline: {', '.join(BUILTIN_HARDWARE)}, or a JSON file "
                             f"(default: {default or 'calibrate this machine'})")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine's bandwidth and peaks instead")
    parser.add_argument("--save-hardware", type=Path, default=None, help="write the profile used to this JSON file")


def cmd_cost(args: argparse.Namespace) -> int:
    from mambastep.configs import resolve_config
    from mambastep.cost import cost_report
    from mambastep.report import cost_table

    configs = {name: resolve_config(name) for name in args.model}
    for name, values in (("--context", args.context), ("--batch", args.batch)):
        if min(values) < 1:
            raise ValueError(f"{name} values must be >= 1, got {values}")
    report = cost_report(configs, args.context, args.batch, _hardware(args), with_terms=args.terms)
    print(json.dumps(report) if args.json else cost_table(report))
    return 0


def _add_cost_parser(sub) -> None:
    from mambastep.compare import DEFAULT_MODELS
    from mambastep.configs import BUILTIN_CONFIGS

    co = sub.add_parser("cost", help="analytic FLOPs, bytes and roofline time of a decode step and a prefill, by primitive")
    co.add_argument("--model", "--models", nargs="+", default=list(DEFAULT_MODELS),
                    help=f"built-in configurations ({', '.join(BUILTIN_CONFIGS)}) or checkpoints (only config.json is read)")
    _add_hardware_args(co, "h100")
    co.add_argument("--context", "--contexts", type=int, nargs="+", default=[2048],
                    help="tokens before the decode step; prompt length")
    co.add_argument("--batch", type=int, nargs="+", default=[1])
    co.add_argument("--terms", action="store_true", help="add every operation to the JSON")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_cost)


def cmd_compare(args: argparse.Namespace) -> int:
    from mambastep.compare import CompareSettings, run_compare
    from mambastep.report import compare_table

    settings = CompareSettings(
        models=tuple(args.models), contexts=tuple(args.contexts), prefill_max=args.prefill_max,
        decode_steps=args.decode_steps, repeats=args.repeats, batch=args.batch, dtype=args.dtype,
        memory_budget=int(args.memory_budget_gib * 2**30), seed=args.seed,
    )
    engine = _engine_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # before --calibrate measures
    report = run_compare(settings, _hardware(args), engine)
    if args.out:
        from mambastep.plots import plot_compare

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_compare(report, args.out)
    print(json.dumps(report) if args.json else compare_table(report))
    return 0


def _add_compare_parser(sub) -> None:
    from mambastep.compare import CompareSettings

    d = CompareSettings()
    cm = sub.add_parser("compare", help="Mamba against a transformer on this machine: latency and memory by context")
    cm.add_argument("--models", "--model", nargs="+", default=list(d.models),
                    help="built-in configurations (random weights) or checkpoints")
    cm.add_argument("--contexts", "--context", type=int, nargs="+", default=list(d.contexts))
    cm.add_argument("--prefill-max", type=int, default=d.prefill_max, help="measure time to first token up to this context")
    cm.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed steps per measurement")
    cm.add_argument("--repeats", type=int, default=d.repeats, help="interleaved repeats (the median is reported)")
    cm.add_argument("--batch", type=int, default=d.batch)
    cm.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    cm.add_argument("--memory-budget-gib", type=float, default=0, help="for the largest batch (default: this machine's memory)")
    cm.add_argument("--seed", type=int, default=d.seed)
    _add_engine_args(cm)
    _add_hardware_args(cm, None)
    cm.add_argument("--out", type=Path, default=None, help="folder for compare.json, latency.png and memory.png")
    cm.add_argument("--json", action="store_true")
    cm.set_defaults(func=cmd_compare)


def cmd_stream(args: argparse.Namespace) -> int:
    from mambastep.stream import StreamSettings, input_kind, run_stream

    requested = "bytes" if args.bytes else "ids" if args.ids else None
    needs_tokenizer = requested is None or args.generate_every or args.tokenizer
    settings = StreamSettings(  # validate before the slow part
        save_state=args.save_state, resume=args.resume, generate_every=args.generate_every,
        params=_sampling_params(args), report_every=args.report_every, json=args.json,
    )
    model = _load_model(args)
    tokenizer = load_tokenizer(args.model, tokenizer=args.tokenizer) if needs_tokenizer else None
    settings = replace(settings, input=input_kind(requested, tokenizer))
    return run_stream(settings, model, tokenizer, sys.stdin.buffer, sys.stdout, sys.stderr)


def _add_stream_parser(sub) -> None:
    st = sub.add_parser("stream", help="feed standard input to a model as it arrives, with live reports on stderr")
    _add_model_args(st)
    st.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)")
    kind = st.add_mutually_exclusive_group()
    kind.add_argument("--bytes", action="store_true",
                      help="each input byte is a token id (the default for byte-level models; else text, a line at a time)")
    kind.add_argument("--ids", action="store_true", help="the input is whitespace-separated token ids")
    st.add_argument("--save-state", type=Path, default=None, metavar="FILE", help="session file written at end of input and on Ctrl-C")
    st.add_argument("--resume", type=Path, default=None, metavar="FILE", help="session file to continue (from --save-state)")
    st.add_argument("--generate-every", type=int, default=0, metavar="N",
                    help="every N tokens, write a continuation to stdout (from a copy: the stream is unchanged)")
    _add_sampling_args(st)
    st.add_argument("--report-every", type=float, default=1.0, metavar="SECONDS", help="0: after every chunk")
    st.add_argument("--json", action="store_true", help="reports and continuations as JSON lines")
    st.set_defaults(func=cmd_stream)


def cmd_bench(args: argparse.Namespace) -> int:
    from mambastep.bench import BenchSettings, markdown, run_bench

    settings = BenchSettings(
        model=args.model, dtype=args.dtype, quantize=args.quantize, batches=tuple(args.batches),
        prompts=tuple(args.prompts), decode_steps=args.decode_steps, repeats=args.repeats,
        long_context=args.long_context, baseline=not args.no_baseline,
    )
    engine = _engine_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # before the machine is measured
    report = run_bench(settings, engine)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + markdown(report))
    print(json.dumps(report) if args.json else markdown(report))
    return 0


def _add_bench_parser(sub) -> None:
    from mambastep.bench import BenchSettings

    d = BenchSettings()
    b = sub.add_parser("bench", help="decode and prefill speed against the roofline and transformers")
    b.add_argument("--model", default=d.model, help="built-in configuration (random weights) or checkpoint")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    b.add_argument("--quantize", choices=["int8"], default=None)
    b.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    b.add_argument("--prompts", type=int, nargs="+", default=list(d.prompts), help="prompt lengths for prefill")
    b.add_argument("--decode-steps", type=int, default=d.decode_steps)
    b.add_argument("--repeats", type=int, default=d.repeats)
    b.add_argument("--long-context", type=int, default=d.long_context, help="0 skips the long-context decode")
    b.add_argument("--no-baseline", action="store_true", help="skip transformers")
    _add_engine_args(b)
    b.add_argument("--markdown", default=None, help="append the Markdown table to this file (e.g. BENCHMARKS.md)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)


def _parse_ids(text: str, flag: str) -> list[int]:
    """Comma-separated token ids ("3,1,4"; spaces allowed) -> a list of ints."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integer token ids, e.g. 3,1,4; got {text!r}") from None


def _inspect_input(args: argparse.Namespace, model) -> tuple[torch.Tensor, list[str] | None, torch.Tensor | None]:
    """The tokens ``inspect`` traces, their labels (None: the plot shows the ids) and the
    positions to highlight (None: none), from --input, --input-file or --ids and --highlight-ids."""
    from mambastep.selection import as_token_ids, token_labels

    if args.ids is not None:
        tokens = _parse_ids(args.ids, "--ids")
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
    tokens = as_token_ids(torch.tensor(tokens, dtype=torch.int64), model.config.vocab_size)
    labels = token_labels(tokenizer, tokens) if tokenizer is not None else None
    highlight = None
    if args.highlight_ids is not None:
        marked = torch.tensor(_parse_ids(args.highlight_ids, "--highlight-ids"), dtype=torch.int64)
        highlight = torch.isin(tokens, marked)
    return tokens, labels, highlight


def _task_input(args: argparse.Namespace) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """A validation sequence of ``args.task`` (its task settings from the run's task.json), labelled by id,
    its key positions highlighted."""
    from mambastep.tasks import task as make_task
    from mambastep.tasks.train import read_task_record

    record = read_task_record(Path(args.model).parent)
    if record["task"] != args.task:
        raise ValueError(f"{args.model} was trained on {record['task']!r}, not {args.task!r}")
    task = make_task(args.task, **record["task_settings"])
    tokens = task.validation_set(args.length or task.train_length, 1, seed=args.seed).tokens[0]  # (l,)
    return tokens, [str(t) for t in tokens.tolist()], task.key_positions(tokens)


def _task_model(args: argparse.Namespace) -> str:
    """The model directory ``inspect --task`` reads: the shipped S6 run unless --model names a run or a model."""
    from mambastep.tasks.train import MODEL_DIR, TASK_FILE, shipped_runs

    if args.model == str(DEFAULT_MODEL):
        runs = shipped_runs(args.task)
        if not runs:
            raise FileNotFoundError(f"no trained model of {args.task!r} ships with mambastep: pass --model")
        return str(runs[0] / MODEL_DIR)
    run = Path(args.model)
    return str(run / MODEL_DIR) if (run / TASK_FILE).is_file() else args.model


def cmd_inspect(args: argparse.Namespace) -> int:
    from mambastep.selection import plot_selection, selection_summary, trace_selection

    if args.task is not None:
        args.model = _task_model(args)
    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    if args.ids is not None:
        _parse_ids(args.ids, "--ids")  # validate before the slow part
    model = _load_model(args)
    tokens, labels, highlight = _task_input(args) if args.task is not None else _inspect_input(args, model)
    trace = trace_selection(model, tokens, groups=args.groups, progress=True)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    if args.task is not None and name == "model":  # the model of a `tasks train` run: name the run
        name = Path(args.model).parent.name
    plot_selection(trace, args.out, labels=labels, highlight=highlight,
                   title=f"what {name} ({trace.family}) selects over {trace.length} tokens: log Δ per token, "
                         f"state norm below" + ("" if highlight is None else f"; red: {int(highlight.sum())} highlighted"))
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


def _add_inspect_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="PNG of what an SSM selects: Δ per token and channel group, and the state norm")
    _add_model_args(ins)
    ins.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)")
    source = ins.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", default=None, help="text to trace")
    source.add_argument("--input-file", type=Path, default=None, metavar="PATH", help="UTF-8 text file to trace")
    source.add_argument("--ids", default=None, help="comma-separated token ids, e.g. 3,1,4")
    source.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="a validation sequence of this synthetic task, its key tokens highlighted "
                             "(--model: a run of `mambastep tasks train`; default: the shipped S6 run)")
    ins.add_argument("--length", type=int, default=None, help="with --task: the sequence length (default: the training length)")
    ins.add_argument("--seed", type=int, default=0, help="with --task: which validation sequence")
    ins.add_argument("--highlight-ids", default=None, metavar="IDS",
                     help="comma-separated token ids: mark the positions that hold them (e.g. data tokens)")
    ins.add_argument("--groups", type=int, default=16,
                     help="channel groups per layer for Mamba-1 (Δ averaged within each); Mamba-2 shows every head")
    ins.add_argument("--out", type=Path, default=Path("selection.png"), help="PNG to write (default: selection.png)")
    ins.add_argument("--json", action="store_true", help="print the summary (mean Δ per layer...) as JSON")
    ins.set_defaults(func=cmd_inspect)


def cmd_tasks_train(args: argparse.Namespace) -> int:
    from mambastep.tasks.train import TaskTrainSettings, train_task

    task_settings = {k: v for k, v in {"train_length": args.length, "n_memorize": args.n_memorize,
                                       "vocab_size": args.vocab_size}.items() if v is not None}
    record = train_task(TaskTrainSettings(
        task=args.name, layer=args.layer, out=str(args.out or f"{args.name}-{args.layer}"), task_settings=task_settings,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        optim=OptimSettings(lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0),
        eval_every=args.eval_every, eval_count=args.eval_count, stop_at=args.stop_at, threads=args.threads,
        init=str(args.init) if args.init else None,
    ))
    summary = {k: record[k] for k in ("task", "layer", "train_length", "steps", "wall_s", "validation_accuracy", "parameters")}
    print(json.dumps(summary) if args.json else
          f"{args.name}, {args.layer}: validation accuracy {100 * record['validation_accuracy']:.1f}% after "
          f"{record['steps']} steps ({record['wall_s']:.0f} s); wrote {args.out or f'{args.name}-{args.layer}'}")
    return 0


def cmd_tasks_eval(args: argparse.Namespace) -> int:
    from mambastep.tasks.evaluate import EvalSettings, evaluate, markdown_table, parse_lengths, plot_accuracy
    from mambastep.tasks.train import shipped_runs

    runs = [Path(m) for m in args.model] if args.model else shipped_runs(args.name)
    if not runs:
        raise FileNotFoundError(f"no trained model of {args.name!r} ships with mambastep: pass --model")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        lengths=parse_lengths(args.lengths), count=args.count, batch_size=args.batch_size, time_budget_s=args.time_budget,
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


def _add_tasks_parser(sub) -> None:
    from mambastep.tasks.layers import LAYERS

    tasks = sub.add_parser("tasks", help="the Mamba paper's synthetic tasks: selective copying, induction heads")
    verbs = tasks.add_subparsers(dest="tasks_command", required=True)
    tr = verbs.add_parser("train", help="train a 2-layer model of one layer type on a task (fresh data every step)")
    tr.add_argument("name", choices=sorted(TASKS))
    tr.add_argument("--layer", choices=LAYERS, required=True,
                    help="s6: Mamba (selective); s4d: Mamba block, time-invariant SSM; mamba2; attention: transformer with RoPE")
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
    tr.add_argument("--init", type=Path, default=None,
                    help="continue from this run's weights (same task, layer and length; fresh optimiser and schedule)")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_tasks_train)
    ev = verbs.add_parser("eval", help="accuracy by sequence length, in constant memory for SSMs")
    ev.add_argument("name", choices=sorted(TASKS))
    ev.add_argument("--model", nargs="+", default=None, help="run directories of `tasks train` (default: the shipped runs)")
    ev.add_argument("--lengths", default="64..1048576", help="'A..B' (powers of two) or a comma-separated list")
    ev.add_argument("--count", type=int, default=16, help="validation sequences per length")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--time-budget", type=float, default=600.0, help="skip a length predicted to take longer (seconds)")
    ev.add_argument("--memory-budget", type=float, default=None, help="GiB a model's state may take (default: 80%% of free memory)")
    ev.add_argument("--out", type=Path, default=Path("tasks-eval"), help="directory for report.json, table.md, accuracy.png")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_tasks_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambastep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory, tokenizer.json, hub id or 'bytes' (default: the model's)")
    _add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="config, parameter count, weight and state bytes")
    _add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    _add_train_parser(sub)
    _add_cost_parser(sub)
    _add_compare_parser(sub)
    _add_stream_parser(sub)
    _add_bench_parser(sub)
    _add_inspect_parser(sub)
    _add_tasks_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="mambastep: %(message)s", level=logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"mambastep: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
