"""``mambastep bench``: decode and prefill speed on this machine, against the roofline and `transformers`.

Every figure is measured in the same run as its baseline, interleaved repeat by
repeat, and reported as a ratio, because a shared machine is noisy:

- decode ms/token per batch size, against `transformers` (same weights) and the
  roofline: the longer of the memory time (weights + state read once per step, at this
  machine's measured bandwidth) and the compute time (the products' FLOPs for the whole
  batch at the measured float32 matmul peak, the dtype the decode kernels compute in), which
  takes over from about 16 sequences on a CPU;
- prefill tokens/s per prompt length, against `transformers` and the compute bound
  (matrix FLOPs at this machine's measured matmul peak, in the dtype the products compute
  in: float32 for bfloat16 weights on a CPU without native bfloat16; of oneDNN's product where
  the engine sends float32 prompts there, ``prompt_matmul``), with the peak resident
  memory the prefill added;
- decode after a long context against decode after a short one.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from mambastep.evidence.hardware import DTYPES, cpu_description, matmul_peak, read_bandwidth
from mambastep.files.checkpoints import model_for, save
from mambastep.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from mambastep.models.int8 import Int8Linear, quantize_int8
from mambastep.models.lm import LanguageModel
from mambastep.ops.backend import Backend, computes_in, uses_onednn
from mambastep.ops.cpu import build
from mambastep.ops.products import onednn_linear
from mambastep.settings import EngineSettings

SCHEMA = "mambastep.bench/1"


@dataclass(frozen=True)
class BenchSettings:
    """What ``bench`` measures.

    model: a built-in configuration (random weights: speed does not depend on their values)
        or a checkpoint directory.
    quantize: "int8" for int8 weight-only linear layers (float32 only), or None.
    batches: batch sizes for decode; prompts: prompt lengths for prefill.
    long_context: tokens prefilled before the long-context decode measurement (0 skips it).
    baseline: also run `transformers` with the same weights.
    """

    model: str = "mamba-130m"
    dtype: str = "float32"
    quantize: str | None = None
    batches: tuple[int, ...] = (1, 4, 16, 64)
    prompts: tuple[int, ...] = (512, 2048)
    decode_steps: int = 16
    repeats: int = 3
    long_context: int = 16384
    baseline: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.quantize and self.dtype != "float32":
            raise ValueError("int8 weights go with float32 activations: use --dtype float32")
        for name in ("batches", "prompts"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)!r}")
        for name in ("decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_context < 0:
            raise ValueError(f"long_context must be >= 0, got {self.long_context}")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: LanguageModel) -> int:
    """Bytes a decode step reads from the weights: each tensor once (tied ones once), except the
    input embedding table, of which a step reads one row per sequence, unless the head reads it whole."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    embedding = model.get_parameter(model.embedding_weight)
    head = model.get_submodule(model.head_weight.rpartition(".")[0])
    if getattr(head, "weight", None) is not embedding:  # untied, or an int8 copy of it
        del tensors[embedding.data_ptr()]
    return sum(t.numel() * t.element_size() for t in tensors.values())


def matmul_flops_per_token(model: LanguageModel, head: bool = False) -> int:
    """Multiply-add FLOPs of the linear layers per token: a prompt's without the LM head
    (prefill computes it for the last token only), a decode step's with it (``head``)."""
    head_module = model.get_submodule(model.head_weight.rpartition(".")[0])
    total = 0
    for module in model.modules():
        if module is head_module and not head:
            continue
        if isinstance(module, torch.nn.Linear):
            total += 2 * module.weight.numel()
        elif isinstance(module, Int8Linear):
            total += 2 * module.weight_int8.numel()
    return total


def _ours_decode(model: LanguageModel, state, steps: int) -> float:
    token = torch.zeros(state.batch_size, dtype=torch.long)
    # Warm-up, untimed: with decode="compiled" the one compile happens here. Two steps, which the
    # timed ones continue: a fused step writes large states into the memory of dropped ones, and
    # from a state the caller still holds that memory goes round from the third step on.
    for _ in range(2):
        _, state = model.step(token, state)
    start = time.perf_counter()
    for _ in range(steps):
        _, state = model.step(token, state)
    return (time.perf_counter() - start) / steps


def _theirs_decode(ref, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per decode step of `transformers`' ``generate``: the time between the first and
    the last of ``steps + 1`` tokens, read from a clock called as each token is chosen (so the
    prefill is left out, and a time can never come out negative)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    clock: list[float] = []

    class Tick(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            clock.append(time.perf_counter())
            return scores

    with torch.no_grad():
        ref.generate(
            prompt,
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([Tick()]),
        )
    if len(clock) != steps + 1:
        raise RuntimeError(f"transformers chose {len(clock)} tokens, not {steps + 1}")
    return (clock[-1] - clock[0]) / steps


def _baseline(model: LanguageModel, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()


def run_bench(s: BenchSettings, engine: EngineSettings | None = None) -> dict:
    """Measure; return a JSON-ready report (schema ``mambastep.bench/1``)."""
    dtype = DTYPES[s.dtype]
    progress = tqdm(total=3 + len(s.batches) + len(s.prompts) + bool(s.long_context), desc="bench", disable=None)
    # Prompts multiply in the weights' dtype where this CPU has native kernels for it, else in float32.
    compute_dtype = dtype if computes_in(dtype) else torch.float32
    engine = engine or EngineSettings()
    # The peak of the product the prompts take: oneDNN's, where the engine chose it for float32.
    onednn = compute_dtype == torch.float32 and uses_onednn(engine.prompt_matmul)
    peak_by = "onednn" if onednn else "torch"
    bandwidth = read_bandwidth()
    peak = matmul_peak(compute_dtype, product=(lambda a, b: onednn_linear(a, b, None)) if onednn else torch.mm)
    # Decode steps multiply in float32 whatever the weights' storage.
    decode_peak = peak if compute_dtype == torch.float32 else matmul_peak(torch.float32, product=torch.mm)
    progress.update()
    ours = model_for(s.model, dtype, settings=engine)
    ref = _baseline(ours, dtype) if s.baseline else None
    if s.quantize:
        quantize_int8(ours)
    progress.update()
    gen = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    w_bytes = weight_bytes(ours)
    report = {
        "schema": SCHEMA,
        "settings": asdict(s),
        "engine": asdict(ours.settings),
        "kernels": kernels_taken(ours.backend),
        "threads": torch.get_num_threads(),
        "machine": {
            **cpu_description(),
            "bandwidth_gb_s": round(bandwidth / 1e9, 1),
            f"matmul_peak_gflop_s_{str(compute_dtype).removeprefix('torch.')}": round(peak / 1e9, 1),
            "matmul_peak_by": peak_by,
            "matmul_peak_gflop_s_float32_decode": round(decode_peak / 1e9, 1),
        },
        "weight_bytes": w_bytes,
        "state_bytes_per_sequence": ours.new_state(1).nbytes,
        "decode": [],
        "prefill": [],
    }
    decode_flops = matmul_flops_per_token(ours, head=True)
    for batch in s.batches:
        prompt = torch.randint(0, vocab, (batch, 16), generator=gen)
        _, state = ours.prefill(prompt)
        mine, theirs = [], []
        for _ in range(s.repeats):
            mine.append(_ours_decode(ours, state, s.decode_steps))
            if ref is not None:
                theirs.append(_theirs_decode(ref, prompt, s.decode_steps))
        ms = 1000 * statistics.median(mine)
        # One step reads every weight once and the batch's state twice (read, write), and
        # multiplies every weight into each sequence's activations.
        memory_ms = 1000 * (w_bytes + 2 * state.nbytes) / bandwidth
        compute_ms = 1000 * batch * decode_flops / decode_peak
        roofline_ms = max(memory_ms, compute_ms)
        row = {
            "batch": batch,
            "ms_per_step": round(ms, 2),
            "tokens_per_s": round(1000 * batch / ms, 1),
            "memory_ms": round(memory_ms, 2),
            "compute_ms": round(compute_ms, 2),
            "roofline_ms": round(roofline_ms, 2),
            "roofline_fraction": round(roofline_ms / ms, 2),
        }
        if theirs:
            their_ms = 1000 * statistics.median(theirs)
            row.update(transformers_ms_per_step=round(their_ms, 2), speedup=round(their_ms / ms, 2))
        report["decode"].append(row)
        progress.update()
    flops = matmul_flops_per_token(ours)
    for length in s.prompts:
        prompt = torch.randint(0, vocab, (1, length), generator=gen)
        mine, theirs, extra = [], [], []
        for _ in range(s.repeats):
            gc.collect()
            before, tracked = rss_bytes(), reset_peak_rss()
            mine.append(_seconds(lambda: ours.prefill(prompt)))
            if tracked:
                extra.append(peak_rss_bytes() - before)
            if ref is not None:
                with torch.no_grad():
                    theirs.append(_seconds(lambda: ref(prompt, use_cache=False)))
        tps = length / statistics.median(mine)
        bound = peak / flops
        row = {
            "tokens": length,
            "tokens_per_s": round(tps, 1),
            "compute_bound_tokens_per_s": round(bound, 1),
            "compute_fraction": round(tps / bound, 2),
            "peak_rss_added_mb": round(max(extra) / 2**20, 1) if extra else None,
        }
        if theirs:
            their_tps = length / statistics.median(theirs)
            row.update(transformers_tokens_per_s=round(their_tps, 1), speedup=round(tps / their_tps, 2))
        report["prefill"].append(row)
        progress.update()
    if s.long_context:
        short = ours.prefill(torch.randint(0, vocab, (1, 16), generator=gen))[1]
        long = ours.prefill(torch.randint(0, vocab, (1, s.long_context), generator=gen))[1]
        pairs = [
            (_ours_decode(ours, short, s.decode_steps), _ours_decode(ours, long, s.decode_steps))
            for _ in range(s.repeats)
        ]
        short_ms, long_ms = (1000 * statistics.median(p[i] for p in pairs) for i in (0, 1))
        report["context"] = {
            "short_context": 16,
            "long_context": s.long_context,
            "short_ms": round(short_ms, 2),
            "long_ms": round(long_ms, 2),
            "long_over_short": round(long_ms / short_ms, 3),
        }
        progress.update()
    progress.close()
    return report


def kernels_taken(backend: Backend) -> dict:
    """Which kernels the measured model took: the backend's choice, the instruction set the C++
    CPU kernels were built for, the path each weight type's products take and the path of a
    Mamba-2 prompt's scan (None where none of them runs), so a figure names its path."""
    uses_cpp = backend.device == "cpu" and (backend.sequence_kernels or backend.matvec_kernel)
    return {
        "backend": str(backend),
        "cpu_isa": build.load() if uses_cpp else None,
        "matvec_paths": torch.ops.mambastep.cpu_matvec_paths() if uses_cpp and backend.matvec_kernel else None,
        "ssd_scan_path": torch.ops.mambastep.cpu_ssd_scan_path() if uses_cpp and backend.sequence_kernels else None,
    }


def markdown(report: dict) -> str:
    """The report as a Markdown section for BENCHMARKS.md."""
    s = report["settings"]
    engine = report["engine"]
    title = (
        f"{s['model']}, {s['dtype']}{', int8 weights' if s['quantize'] else ''}, {report['threads']} threads, "
        f"decode {engine['decode']}, matvec {engine['matvec']}, prompt matmul {engine['prompt_matmul']}"
        f"{'' if engine['huge_pages'] else ', 4 KiB pages'}"
        f"{', ' + report['kernels']['cpu_isa'] + ' kernels' if report['kernels']['cpu_isa'] else ''}"
        f"{' (products: ' + report['kernels']['matvec_paths'] + ')' if report['kernels'].get('matvec_paths') else ''}"
    )
    lines = [
        f"### {title}",
        "",
        f"Machine: {report['machine']}; weights {report['weight_bytes'] / 2**20:.0f} MiB; "
        f"state {report['state_bytes_per_sequence'] / 2**20:.2f} MiB per sequence.",
        "",
        "| batch | ms/step | tokens/s | roofline ms | bound by | of roofline | transformers ms | speedup |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["decode"]:
        bound_by = "compute" if r["compute_ms"] > r["memory_ms"] else "memory"
        lines.append(
            f"| {r['batch']} | {r['ms_per_step']} | {r['tokens_per_s']} | {r['roofline_ms']} | {bound_by} | "
            f"{r['roofline_fraction']:.0%} | {r.get('transformers_ms_per_step', '-')} | {r.get('speedup', '-')} |"
        )
    lines += [
        "",
        "| prompt | tokens/s | compute bound | of bound | peak RSS added MB | transformers tokens/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["prefill"]:
        lines.append(
            f"| {r['tokens']} | {r['tokens_per_s']} | {r['compute_bound_tokens_per_s']} "
            f"| {r['compute_fraction']:.0%} | "
            f"{r['peak_rss_added_mb']} | {r.get('transformers_tokens_per_s', '-')} | {r.get('speedup', '-')} |"
        )
    if "context" in report:
        c = report["context"]
        lines += [
            "",
            f"Decode after {c['long_context']} tokens of context: {c['long_ms']} ms against {c['short_ms']} ms "
            f"after {c['short_context']} ({c['long_over_short']}x).",
        ]
    return "\n".join(lines) + "\n"
