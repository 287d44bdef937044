"""Analytic cost of a decode step and of a prefill, by primitive, and its time on a roofline.

A call (one decode step, or a prefill of ``context`` tokens) is a list of
``Term``s, each one primitive operation of the model as mambastep runs it,
summed over the batch and the layers. Counting rules:

- a multiply-add is 2 FLOPs; a nonlinearity (exp, softplus, SiLU, gelu, cos)
  counts 1 per value; RMSNorm 4 and LayerNorm 7 FLOPs per element;
- a product with a weight matrix is a *matmul* when several token rows share the
  weight, a *matvec* for one row; attention over a cache is a matvec per head for
  one query; the Mamba step's read-out C·h and the causal conv are *dot* products;
- bytes: weights read, recurrent state read and written (conv window, SSM state,
  KV cache) and activations read and written at the edges of each operation;
  the insides of the scan and of attention (Δ-sized (e, n) tensors, attention
  scores) are assumed to stay on chip, as in fused kernels;
- a prefill runs in pieces of ``EngineSettings.prefill_piece`` tokens, each
  attending to the cache so far; Mamba-2 scans each piece in chunks of
  ``EngineSettings.scan_chunk``, exactly as the models do, so the matrix-product
  FLOPs equal what ``torch.utils.flop_counter.FlopCounterMode`` counts.

The roofline time of a term is max(FLOPs / peak of its class, bytes / bandwidth);
a call's time is the sum over its terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mambastep.config import GPTNeoXConfig, Mamba2Config, MambaConfig, ModelConfig
from mambastep.hardware import PRIMITIVES, Hardware
from mambastep.models import LanguageModel, model_class
from mambastep.settings import EngineSettings

Phase = Literal["decode", "prefill"]
RMSNORM_FLOPS, LAYERNORM_FLOPS = 4, 7  # per element
SOFTMAX_ELEMENTWISE_FLOPS = 4  # per score: scale, subtract the max, sum, divide (plus one exp)
SSM_STATE_BYTES = 4  # the SSM state is float32 whatever the weights


_COUNTS = ("flops", "weight_bytes", "state_read", "state_written", "act_bytes")


@dataclass(frozen=True)
class Term:
    """One primitive operation of a call, summed over the batch (and layers).

    weight_matmul: a product with a weight matrix (projections, LM head); the other
    matmul/matvec/dot terms are the mixer's own contractions (conv, scan, attention).
    """

    name: str
    primitive: str
    flops: int = 0
    weight_bytes: int = 0
    state_read: int = 0
    state_written: int = 0
    act_bytes: int = 0
    weight_matmul: bool = False

    def __post_init__(self):
        assert self.primitive in PRIMITIVES, self.primitive

    def times(self, n: int) -> "Term":
        return replace(self, **{name: getattr(self, name) * n for name in _COUNTS})

    def plus(self, other: "Term") -> "Term":
        return replace(self, **{name: getattr(self, name) + getattr(other, name) for name in _COUNTS})

    def bytes(self, state_on_chip: bool = False) -> int:
        """Main-memory bytes moved."""
        state = 0 if state_on_chip else self.state_read + self.state_written
        return self.weight_bytes + self.act_bytes + state

    def seconds(self, hardware: Hardware, state_on_chip: bool = False) -> float:
        compute = self.flops / hardware.peak[self.primitive] if self.primitive != "copy" else 0.0
        return max(compute, self.bytes(state_on_chip) / hardware.bandwidth)


class _Terms:
    """Collects the terms of one layer (or of the parts outside the layers)."""

    def __init__(self, weight_bytes: int, act_bytes: int):
        self.w, self.a = weight_bytes, act_bytes
        self.items: list[Term] = []

    def add(self, name: str, primitive: str, flops: int = 0, **counts: int) -> None:
        self.items.append(Term(name, primitive, flops, **counts))

    def vector_op(self, name: str, primitive: str, n: int, flops_per_value: int = 1, inputs: int = 1) -> None:
        """An op over n activation values: reads ``inputs`` of them per value, writes one."""
        self.add(name, primitive, flops_per_value * n, act_bytes=(inputs + 1) * n * self.a)

    def linear(self, name: str, rows: int, d_in: int, d_out: int, bias: bool) -> None:
        primitive = "matmul" if rows > 1 else "matvec"
        self.items.append(Term(name, primitive, 2 * rows * d_in * d_out, weight_bytes=d_in * d_out * self.w,
                               act_bytes=rows * (d_in + d_out) * self.a, weight_matmul=True))
        if bias:
            self.add(f"{name} bias", "elementwise", rows * d_out, weight_bytes=d_out * self.w,
                     act_bytes=2 * rows * d_out * self.a)

    def norm(self, name: str, rows: int, width: int, flops_per_element: int, params: int) -> None:
        self.add(name, "norm", flops_per_element * rows * width, weight_bytes=params * width * self.w,
                 act_bytes=2 * rows * width * self.a)

    def conv(self, batch: int, rows: int, channels: int, k: int, bias: bool) -> None:
        """The causal depthwise conv: a dot product of length k per channel, and its (k-1)-input window."""
        window = batch * (k - 1) * channels * self.a
        self.add("conv", "dot", 2 * rows * channels * k, weight_bytes=channels * k * self.w, state_read=window,
                 state_written=window, act_bytes=2 * rows * channels * self.a)
        if bias:
            self.add("conv bias", "elementwise", rows * channels, weight_bytes=channels * self.w,
                     act_bytes=2 * rows * channels * self.a)


def pieces(phase: Phase, context: int, piece: int) -> list[tuple[int, int]]:
    """(start, length) of each model call: one token after ``context`` for a decode step,
    else the prompt of ``context`` tokens cut as ``LanguageModel.prefill`` cuts it."""
    if phase == "decode":
        return [(context, 1)]
    return [(start, min(piece, context - start)) for start in range(0, context, piece)]


def _mamba_layer(t: _Terms, c: MambaConfig, batch: int, q: int) -> None:
    """One Mamba-1 layer over a call of q tokens per sequence (the step and the scan do the same work)."""
    d, e, n, r, rows = c.d_model, c.d_inner, c.d_state, c.dt_rank, batch * q
    t.norm("norm", rows, d, RMSNORM_FLOPS, 1)
    t.linear("in_proj", rows, d, 2 * e, c.bias)
    t.conv(batch, rows, e, c.d_conv, c.conv_bias)
    t.vector_op("silu(x)", "nonlinear", rows * e)
    t.linear("x_proj", rows, e, r + 2 * n, False)
    t.linear("dt_proj", rows, r, e, True)
    t.vector_op("softplus(dt)", "nonlinear", rows * e)
    t.add("decay dt*A", "elementwise", rows * e * n, weight_bytes=e * n * SSM_STATE_BYTES)
    t.add("exp(dt*A)", "nonlinear", rows * e * n)
    t.add("input dt*x ⊗ B", "elementwise", rows * e + rows * e * n)
    state = batch * e * n * SSM_STATE_BYTES
    t.add("state update h = dA*h + dBx", "elementwise", 2 * rows * e * n, state_read=state, state_written=state)
    t.add("read-out C·h", "dot", 2 * rows * e * n)
    t.add("skip D*x", "elementwise", 2 * rows * e, weight_bytes=e * t.w)
    t.vector_op("gate silu(z)", "nonlinear", rows * e)
    t.vector_op("gate multiply", "elementwise", rows * e, inputs=2)
    t.linear("out_proj", rows, e, d, c.bias)
    t.vector_op("residual add", "elementwise", rows * d, inputs=2)


def _ssd_chunk(t: _Terms, c: Mamba2Config, batch: int, q: int) -> None:
    """One chunk of q tokens of the chunked SSD scan (ops/ssd.py), per layer."""
    h, p, n, g, b = c.n_heads, c.head_dim, c.d_state, c.n_groups, batch
    # Sums over the chunk's tokens are matrix products; over a 1-token chunk they are plain products.
    over_tokens, per_product = ("matmul", 2) if q > 1 else ("elementwise", 1)
    t.add("ssd scores C·B", "matmul", 2 * b * g * q * q * n)
    t.add("ssd segment sums", "elementwise", b * h * (q * q + 2 * q))  # masked cumsums, dt*A, decay to each t
    t.add("ssd decays exp", "nonlinear", b * h * (q * q + q))
    t.add("ssd scores × decay, dt*x", "elementwise", b * h * q * (q + p))
    t.add("ssd diagonal blocks", over_tokens, per_product * b * h * q * q * p)
    t.add("ssd state in, read out", "matmul", 2 * b * h * q * p * n)
    t.add("ssd decay × read-out, add", "elementwise", 2 * b * h * q * p)
    t.add("ssd decay to chunk end × dt*x", "elementwise", b * h * q * p)
    t.add("ssd chunk's own state", over_tokens, per_product * b * h * q * p * n)
    t.add("ssd state update", "elementwise", 2 * b * h * p * n)


def _mamba2_layer(t: _Terms, c: Mamba2Config, batch: int, q: int, chunk: int) -> None:
    """One Mamba-2 layer over a call of q tokens per sequence: the step for q = 1, else chunked SSD."""
    d, e, n, h, p, rows = c.d_model, c.d_inner, c.d_state, c.n_heads, c.head_dim, batch * q
    t.norm("norm", rows, d, RMSNORM_FLOPS, 1)
    t.linear("in_proj", rows, d, e + c.conv_dim + h, c.bias)
    t.conv(batch, rows, c.conv_dim, c.d_conv, c.conv_bias)
    t.vector_op("silu(xBC)", "nonlinear", rows * c.conv_dim)
    t.add("dt + bias, clamp", "elementwise", 2 * rows * h, weight_bytes=h * t.w)
    t.add("softplus(dt)", "nonlinear", rows * h)
    state = batch * h * p * n * SSM_STATE_BYTES
    if q == 1:
        t.add("decay dt*A", "elementwise", rows * h, weight_bytes=h * t.w)
        t.add("exp(dt*A)", "nonlinear", rows * h)
        t.add("input dt*x ⊗ B", "elementwise", rows * e + rows * e * n)
        t.add("state update h = dA*h + dBx", "elementwise", 2 * rows * e * n, state_read=state, state_written=state)
        t.add("read-out h·C", "dot", 2 * rows * e * n)
    else:
        t.add("ssd state in/out", "copy", state_read=state, state_written=state)
        for size in _chunks(q, chunk):
            _ssd_chunk(t, c, batch, size)
    t.add("skip D*x", "elementwise", 2 * rows * e, weight_bytes=(e if c.D_has_hdim else h) * t.w)
    t.vector_op("gate silu(z)", "nonlinear", rows * e)
    t.vector_op("gate multiply", "elementwise", rows * e, inputs=2)
    t.norm("gated norm", rows, e, RMSNORM_FLOPS, 1)
    t.linear("out_proj", rows, e, d, c.bias)
    t.vector_op("residual add", "elementwise", rows * d, inputs=2)


def _chunks(length: int, size: int) -> list[int]:
    return [min(size, length - start) for start in range(0, length, size)]


def _transformer_layer(t: _Terms, c: GPTNeoXConfig, batch: int, start: int, q: int) -> None:
    """One GPT-NeoX layer over q new tokens per sequence, after ``start`` cached ones."""
    d, h, p, f, rows, keys = c.d_model, c.n_heads, c.head_dim, c.d_ff, batch * q, start + q
    t.norm("input layernorm", rows, d, LAYERNORM_FLOPS, 2)
    t.linear("query_key_value", rows, d, 3 * d, c.attention_bias)
    t.vector_op("rotary q, k", "elementwise", 2 * rows * h * c.rotary_dim, flops_per_value=3, inputs=2)
    t.add("kv cache append", "copy", state_written=2 * rows * d * t.a)
    contraction = "matvec" if q == 1 else "matmul"
    cache = batch * keys * d * t.a  # all keys (or all values) of the batch
    t.add("attention scores q·K", contraction, 2 * batch * h * q * keys * p, state_read=cache)
    t.add("softmax", "elementwise", SOFTMAX_ELEMENTWISE_FLOPS * batch * h * q * keys)
    t.add("softmax exp", "nonlinear", batch * h * q * keys)
    t.add("attention values p·V", contraction, 2 * batch * h * q * keys * p, state_read=cache)
    t.linear("dense", rows, d, d, c.attention_bias)
    t.norm("post-attention layernorm", rows, d, LAYERNORM_FLOPS, 2)
    t.linear("mlp up", rows, d, f, True)
    t.vector_op("gelu", "nonlinear", rows * f)
    t.linear("mlp down", rows, f, d, True)
    t.vector_op("residual adds", "elementwise", 2 * rows * d, inputs=2)


def terms(
    config: ModelConfig,
    phase: Phase,
    context: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    settings: EngineSettings = EngineSettings(),
) -> list[Term]:
    """Every primitive operation of one call, summed over the batch and the layers.

    Args:
        phase: "decode" (one token after ``context`` cached ones) or "prefill" (a prompt
            of ``context`` tokens from an empty state, returning the last logits).
        dtype: of the weights, activations, conv window and KV cache.
        settings: the prefill piece and scan chunk the models use.
    """
    if context < (0 if phase == "decode" else 1) or batch < 1:
        raise ValueError(f"need batch >= 1 and a context >= {0 if phase == 'decode' else 1}, got {batch}, {context}")
    size = torch.empty(0, dtype=dtype).element_size()
    out: list[Term] = []
    calls = pieces(phase, context, settings.prefill_piece)
    for i, (start, q) in enumerate(calls):
        rows = batch * q
        layer = _Terms(size, size)
        if isinstance(config, MambaConfig):
            _mamba_layer(layer, config, batch, q)
        elif isinstance(config, Mamba2Config):
            _mamba2_layer(layer, config, batch, q, settings.scan_chunk)
        else:
            _transformer_layer(layer, config, batch, start, q)
        edges = _Terms(size, size)
        edges.add("embedding lookup", "copy", weight_bytes=rows * config.d_model * size, act_bytes=rows * config.d_model * size)
        if isinstance(config, GPTNeoXConfig):
            r = config.rotary_dim
            edges.add("rotary angles", "elementwise", q * r // 2)
            edges.add("rotary cos, sin", "nonlinear", 2 * q * r)
            edges.norm("final layernorm", rows, config.d_model, LAYERNORM_FLOPS, 2)
        else:
            edges.norm("final norm", rows, config.d_model, RMSNORM_FLOPS, 1)
        if i == len(calls) - 1:  # logits of the last position only
            edges.linear("lm head", batch, config.d_model, config.vocab_size, False)
        out += [term.times(config.n_layer) for term in layer.items] + edges.items
    return out


def state_bytes(config: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the state after ``context`` tokens: what ``ModelState.nbytes`` reports."""
    a = torch.empty(0, dtype=dtype).element_size()
    if isinstance(config, GPTNeoXConfig):
        return batch * config.n_layer * 2 * context * config.d_model * a
    conv = config.d_inner if isinstance(config, MambaConfig) else config.conv_dim
    ssm = config.d_inner * config.d_state  # h * p * n for Mamba-2 too
    return batch * config.n_layer * ((config.d_conv - 1) * conv * a + ssm * SSM_STATE_BYTES)


def parameter_count(config: ModelConfig) -> int:
    """Distinct parameters of the model (a tied head counted once), from the model built on the meta device."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kv_reads_exceed_weights_at(config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> int | None:
    """The first context at which a decode step reads more KV-cache bytes than weight bytes (None for SSMs)."""
    if not isinstance(config, GPTNeoXConfig):
        return None
    step = terms(config, "decode", 0, batch, dtype)
    weights = sum(t.weight_bytes for t in step)
    per_token = batch * config.n_layer * 2 * config.d_model * torch.empty(0, dtype=dtype).element_size()
    # A step after `context` cached tokens reads context + 1 of them.
    return max(0, math.floor(weights / per_token))


def validate_flops(model: LanguageModel, phase: Phase, context: int, batch: int = 1) -> dict[str, dict[str, int]]:
    """Matrix-product FLOPs that ``FlopCounterMode`` counts in a real call, next to this model's terms.

    "weight_matmuls" are the products with weight matrices (aten mm/addmm, and the fused
    matvec kernel of decode steps); "contractions"
    the mixers' own (bmm, convolution): conv, scan read-out, SSD blocks, attention. Attention
    runs through SDPA's math backend here, whose matmuls the counter sees. The counter cannot
    see inside the fused scan or the fused Mamba and Mamba-2 decode steps: configure the model with
    ``EngineSettings(scan="torch", matvec="torch")``.
    """
    tokens = torch.zeros(batch, max(context, 1), dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        if phase == "prefill":
            with counter:
                model.prefill(tokens)
        else:
            state = model.prefill(tokens)[1] if context else model.new_state(batch)
            with counter:
                model.step(tokens[:, 0], state)
    counted = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    items = terms(model.config, phase, context, batch, model.dtype, model.settings)
    return {
        "weight_matmuls": {
            "counted": counted.get("mm", 0) + counted.get("addmm", 0) + counted.get("mambastep.matvec", 0),
            "predicted": sum(t.flops for t in items if t.weight_matmul),
        },
        "contractions": {
            "counted": counted.get("bmm", 0) + counted.get("convolution", 0),
            "predicted": sum(t.flops for t in items if not t.weight_matmul and t.primitive in ("matmul", "matvec", "dot")),
        },
    }


def by_primitive(items: list[Term], value) -> dict[str, float]:
    """Sum ``value(term)`` per primitive class, in the order of PRIMITIVES."""
    sums = {p: 0 for p in PRIMITIVES}
    for term in items:
        sums[term.primitive] += value(term)
    return sums


def account(
    config: ModelConfig,
    phase: Phase,
    context: int,
    batch: int,
    hardware: Hardware,
    dtype: torch.dtype | None = None,
    settings: EngineSettings = EngineSettings(),
    with_terms: bool = False,
) -> dict:
    """The JSON account of one call: per-token FLOPs and bytes by primitive, intensity, roofline time."""
    dtype = dtype or hardware.torch_dtype
    items = terms(config, phase, context, batch, dtype, settings)
    tokens = batch * (1 if phase == "decode" else context)
    on_chip = state_bytes(config, context, batch, dtype) <= hardware.on_chip_bytes
    flops = sum(t.flops for t in items)
    moved = sum(t.bytes(on_chip) for t in items)
    seconds = sum(t.seconds(hardware, on_chip) for t in items)
    out = {
        "tokens": tokens,
        "flops_per_token": {k: v / tokens for k, v in by_primitive(items, lambda t: t.flops).items()},
        "bytes_per_token": {k: v / tokens for k, v in by_primitive(items, lambda t: t.bytes(on_chip)).items()},
        "weight_bytes_per_token": sum(t.weight_bytes for t in items) / tokens,
        "state_read_bytes_per_token": sum(t.state_read for t in items) / tokens,
        "state_written_bytes_per_token": sum(t.state_written for t in items) / tokens,
        "activation_bytes_per_token": sum(t.act_bytes for t in items) / tokens,
        "total_flops_per_token": flops / tokens,
        "total_bytes_per_token": moved / tokens,
        "arithmetic_intensity": flops / moved,
        "seconds_by_primitive": by_primitive(items, lambda t: t.seconds(hardware, on_chip)),
        "predicted_s": seconds,
        "predicted_s_per_token": seconds / tokens,
        "state_on_chip": on_chip,
    }
    if with_terms:
        out["terms"] = [
            {"name": t.name, "primitive": t.primitive, "flops": t.flops, "bytes": t.bytes(on_chip),
             "seconds": t.seconds(hardware, on_chip)} for t in _merged(items)
        ]
    return out


def _merged(items: list[Term]) -> Iterator[Term]:
    """Terms of the same name summed (a prefill's pieces, Mamba-2's chunks), in first-seen order."""
    merged: dict[tuple[str, str], Term] = {}
    for t in items:
        key = (t.name, t.primitive)
        merged[key] = merged[key].plus(t) if key in merged else t
    return iter(merged.values())


SCHEMA = "mambastep.cost/1"


def cost_report(
    configs: dict[str, ModelConfig],
    contexts: list[int],
    batches: list[int],
    hardware: Hardware,
    settings: EngineSettings = EngineSettings(),
    with_terms: bool = False,
) -> dict:
    """The JSON of ``mambastep cost``: every model at every (batch, context), decode step and prefill."""
    dtype = hardware.torch_dtype
    size = torch.empty(0, dtype=dtype).element_size()
    models = []
    for name, config in configs.items():
        params = parameter_count(config)
        points = [
            {
                "batch": batch,
                "context": context,
                "state_bytes": state_bytes(config, context, batch, dtype),
                # weights + state within the part's memory; None where the profile does not say
                "fits_in_memory": params * size + state_bytes(config, context, batch, dtype) <= hardware.memory_bytes
                if hardware.memory_bytes else None,
                "kv_reads_exceed_weight_reads_at": kv_reads_exceed_weights_at(config, batch, dtype),
                "decode": account(config, "decode", context, batch, hardware, dtype, settings, with_terms),
                "prefill": account(config, "prefill", context, batch, hardware, dtype, settings, with_terms),
            }
            for batch in batches for context in contexts
        ]
        models.append({
            "model": name, "family": config.family, "config": asdict(config), "parameters": params,
            "weight_bytes": params * size, "points": points,
        })
    return {
        "schema": SCHEMA,
        "hardware": hardware.to_dict(),
        "dtype": hardware.dtype,
        "settings": {"prefill_piece": settings.prefill_piece, "scan_chunk": settings.scan_chunk},
        "models": models,
    }
