"""Mamba against a transformer, side by side on this machine: latency and memory against context.

For every model and context: time to first token (a prefill of the context),
decode time per step, the state's bytes, the peak resident memory the
measurement added, and the largest batch whose states fit a memory budget;
next to each time, the roofline prediction of cost.py. Models are measured
interleaved (context by context, repeat by repeat, model by model), so that
noise from other work on the machine falls on all of them alike, and the
transformer/SSM ratios are reported.

Decode timing needs only a state of the right size, not a real prompt: a step
does the same work whatever the state holds. So at contexts beyond
``prefill_max`` the state is synthetic: random SSM states, or a KV cache filled
with one random key and value repeated.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from mambastep.evidence import cost
from mambastep.evidence.hardware import DTYPES, Hardware, total_memory_bytes
from mambastep.families import family_of
from mambastep.files.checkpoints import model_for
from mambastep.memory import available_memory, peak_rss_bytes, reset_peak_rss, rss_bytes
from mambastep.models import LanguageModel
from mambastep.models.config import ModelConfig
from mambastep.models.state import KVLayerState, ModelState
from mambastep.settings import EngineSettings

SCHEMA = "mambastep.compare/1"
DEFAULT_MODELS = ("mamba-130m", "mamba2-130m", "pythia-160m")
DEFAULT_CONTEXTS = (128, 512, 2048, 8192, 32768, 131072)
# A state is measured only while 1.25 x its bytes (a KV cache keeps a quarter spare) fit in this
# share of the memory available when the run starts.
MEASURABLE_SHARE = 0.5


@dataclass(frozen=True)
class CompareSettings:
    """What ``compare`` measures.

    models: built-in names (random weights) or checkpoint directories.
    contexts: tokens in the state before the measured step.
    prefill_max: time to first token is measured up to this context (prefill is
        quadratic for the transformer); beyond it only predicted.
    memory_budget: bytes for weights + states in ``max_batch_in_budget``; 0 means this
        machine's memory.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    prefill_max: int = 2048
    decode_steps: int = 8
    repeats: int = 3
    batch: int = 1
    dtype: str = "float32"
    memory_budget: int = 0
    seed: int = 0

    def __post_init__(self):
        if not self.models:
            raise ValueError("compare needs at least one model")
        if not self.contexts or any(not isinstance(c, int) or c < 1 for c in self.contexts):
            raise ValueError(f"contexts must be positive integers, got {self.contexts!r}")
        for name in ("decode_steps", "repeats", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_max < 0 or self.memory_budget < 0:
            raise ValueError("prefill_max and memory_budget must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "contexts", tuple(sorted(set(self.contexts))))


def synthetic_state(model: LanguageModel, batch: int, context: int, generator: torch.Generator) -> ModelState:
    """A state of the size the model has after ``context`` tokens, with random contents."""
    layers = []
    for layer in model.new_state(batch).layers:
        if isinstance(layer, KVLayerState):
            one = torch.randn(batch, 1, *layer.k.shape[2:], generator=generator).to(layer.k.dtype)
            layer = layer.append(one.expand(-1, context, -1, -1), one.expand(-1, context, -1, -1))
        else:
            layer = replace(
                layer,
                **{
                    name: (0.1 * torch.randn(t.shape, generator=generator)).to(t.dtype)
                    for name, t in layer.tensors().items()
                },
            )
        layers.append(layer)
    return model.state_of(layers)


@dataclass
class _Samples:
    ttft_s: list[float]
    decode_s: list[float]
    peak_extra: list[int]


def _measure(
    model: LanguageModel, s: CompareSettings, context: int, gen: torch.Generator
) -> tuple[float | None, float, int | None]:
    """(time to first token or None, seconds per decode step, extra peak RSS or None) at one context."""
    before = rss_bytes()
    tracked = reset_peak_rss()
    ttft = None
    if context <= s.prefill_max:
        tokens = torch.randint(0, model.config.vocab_size, (s.batch, context), generator=gen)
        start = time.perf_counter()
        _, state = model.prefill(tokens)
        ttft = time.perf_counter() - start
    else:
        state = synthetic_state(model, s.batch, context, gen)
    token = torch.zeros(s.batch, dtype=torch.long)
    last, state = model.step(token, state)  # warm-up, untimed
    start = time.perf_counter()
    for _ in range(s.decode_steps):
        last, state = model.step(token, state)
    decode = (time.perf_counter() - start) / s.decode_steps
    peak = peak_rss_bytes() - before if tracked else None
    del state, last
    return ttft, decode, peak


def _budget(s: CompareSettings) -> int:
    return s.memory_budget or total_memory_bytes()


def run_compare(
    s: CompareSettings, hardware: Hardware, engine: EngineSettings | None = None, progress: bool = True
) -> dict:
    """Measure every model at every context (see the module docstring); returns the JSON report.

    ``progress``: progress bars on stderr, one while the models are built, then one over the
    measurements that names the model and context being measured.
    """
    dtype = DTYPES[s.dtype]
    engine = engine or EngineSettings()
    models: dict[str, LanguageModel] = {}
    for name in tqdm(s.models, desc="building models", leave=False, disable=not progress, dynamic_ncols=True):
        model = models[name] = model_for(name, dtype, settings=engine)
        # first calls pay one-time costs (allocator, kernels)
        model.step(torch.zeros(s.batch, dtype=torch.long), model.prefill(torch.zeros(s.batch, 8, dtype=torch.long))[1])
    gen = torch.Generator().manual_seed(s.seed)
    available = available_memory()
    room = math.inf if available is None else MEASURABLE_SHARE * available  # unknown: no limit
    samples = {(n, c): _Samples([], [], []) for n in models for c in s.contexts}
    skipped = {
        (
            n,
            c,
        ): f"state of {cost.state_bytes(m.config, c, s.batch, dtype) / 2**30:.1f} GiB exceeds half the available memory"
        for n, m in models.items()
        for c in s.contexts
        if 1.25 * cost.state_bytes(m.config, c, s.batch, dtype) > room
    }
    todo = [(c, r, n) for c in s.contexts for r in range(s.repeats) for n in models if (n, c) not in skipped]
    bar = tqdm(todo, desc="measuring", disable=not progress, dynamic_ncols=True)
    for context, _, name in bar:
        bar.set_postfix_str(f"{name}, context {context:,}", refresh=True)
        ttft, decode, peak = _measure(models[name], s, context, gen)
        got = samples[(name, context)]
        if ttft is not None:
            got.ttft_s.append(ttft)
        got.decode_s.append(decode)
        if peak is not None:
            got.peak_extra.append(peak)
    entries = [_model_entry(name, model) for name, model in models.items()]
    rows = [
        _row(
            entry,
            models[entry["model"]].config,
            context,
            s,
            hardware,
            dtype,
            samples[(entry["model"], context)],
            skipped.get((entry["model"], context)),
        )
        for entry in entries
        for context in s.contexts
    ]
    return {
        "schema": SCHEMA,
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "hardware": hardware.to_dict()},
        "settings": {**asdict(s), "memory_budget": _budget(s), "engine": asdict(engine)},
        "models": entries,
        "rows": rows,
        "crossings": crossings(rows, {n: m.config for n, m in models.items()}, s.batch, dtype),
    }


def _model_entry(name: str, model: LanguageModel) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "model": name,
        "family": model.config.family,
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def _median(values: list) -> float | None:
    return statistics.median(values) if values else None


def _row(
    entry: dict,
    config: ModelConfig,
    context: int,
    s: CompareSettings,
    hardware: Hardware,
    dtype: torch.dtype,
    got: _Samples,
    skipped: str | None,
) -> dict:
    state = cost.state_bytes(config, context, s.batch, dtype)
    per_sequence = cost.state_bytes(config, context, 1, dtype)
    decode_pred = cost.account(config, "decode", context, s.batch, hardware, dtype)["predicted_s"]
    ttft_pred = cost.account(config, "prefill", context, s.batch, hardware, dtype)["predicted_s"]
    decode = _median(got.decode_s)
    return {
        "model": entry["model"],
        "family": config.family,
        "context": context,
        "batch": s.batch,
        "ttft_s": _median(got.ttft_s),
        "ttft_predicted_s": ttft_pred,
        "decode_ms_per_token": None if decode is None else 1e3 * decode,
        "decode_ms_predicted": 1e3 * decode_pred,
        "decode_measured_over_predicted": None if decode is None else decode / decode_pred,
        "state_bytes": state,
        "peak_rss_extra_bytes": max(got.peak_extra) if got.peak_extra else None,
        "max_batch_in_budget": max(0, (_budget(s) - entry["weight_bytes"]) // per_sequence),
        "skipped": skipped,
    }


def _crossing(points: list[tuple[int, float]]) -> float | None:
    """The context where log(ratio) first turns >= 0, interpolated on log-log axes; None if it never does."""
    for (c0, r0), (c1, r1) in zip(points, points[1:]):
        if r0 < 1 <= r1:
            w = -math.log(r0) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(c0) + w * (math.log(c1) - math.log(c0)))
    return float(points[0][0]) if points and points[0][1] >= 1 else None


def crossings(rows: list[dict], configs: dict[str, ModelConfig], batch: int, dtype: torch.dtype) -> list[dict]:
    """For every transformer against every SSM, measured, predicted and state bytes: transformer/SSM
    ratios per context, where they cross 1, and the ratio at the longest context both have."""
    by = {(r["model"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    transformers = [n for n, c in configs.items() if family_of(c).kv_bytes_per_token is not None]  # states that grow
    ssms = [n for n in configs if n not in transformers]
    out = []
    for t in transformers:
        for m in ssms:
            for metric in ("ttft_s", "decode_ms_per_token", "ttft_predicted_s", "decode_ms_predicted"):
                points = [
                    (c, by[(t, c)][metric] / by[(m, c)][metric])
                    for c in contexts
                    if by[(t, c)][metric] is not None and by[(m, c)][metric] is not None
                ]
                out.append(
                    {
                        "transformer": t,
                        "ssm": m,
                        "metric": metric,
                        "ratios": {str(c): r for c, r in points},
                        "crosses_at_context": _crossing(points),
                        "longest_context": points[-1][0] if points else None,
                        "ratio_at_longest_context": points[-1][1] if points else None,
                    }
                )
            kv_per_token = cost.state_bytes(configs[t], 1, batch, dtype)
            out.append(
                {
                    "transformer": t,
                    "ssm": m,
                    "metric": "state_bytes",
                    "ratios": {str(c): by[(t, c)]["state_bytes"] / by[(m, c)]["state_bytes"] for c in contexts},
                    # the first context at which the KV cache holds more bytes than the SSM state
                    "crosses_at_context": cost.state_bytes(configs[m], 0, batch, dtype) // kv_per_token + 1,
                    "longest_context": contexts[-1],
                    "ratio_at_longest_context": by[(t, contexts[-1])]["state_bytes"]
                    / by[(m, contexts[-1])]["state_bytes"],
                }
            )
    return out
