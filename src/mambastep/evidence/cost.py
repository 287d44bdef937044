"""Analytic cost of a decode step and of a prefill, by primitive, and its time on a roofline.

A call (one decode step, or a prefill of ``context`` tokens) is a list of ``Term``s, each one
primitive operation of the model as mambastep runs it, summed over the batch and the layers.
Each family says what its layers do (``Family.layer_terms``; the counting rules are in
``families.accounting``). A prefill runs in pieces of ``EngineSettings.prefill_piece``
tokens, each attending to the cache so far; Mamba-2 scans each piece in chunks of
``EngineSettings.scan_chunk``, exactly as the models do, so the matrix-product FLOPs equal
what ``torch.utils.flop_counter.FlopCounterMode`` counts.

The roofline time of a term is max(FLOPs / peak of its class, bytes / bandwidth); a call's
time is the sum over its terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mambastep.evidence.hardware import Hardware
from mambastep.families import family_of, parameter_count
from mambastep.families.accounting import PRIMITIVES, Term, Terms
from mambastep.models.config import ModelConfig
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings

Phase = Literal["decode", "prefill"]


def pieces(phase: Phase, context: int, piece: int) -> list[tuple[int, int]]:
    """(start, length) of each model call: one token after ``context`` for a decode step,
    else the prompt of ``context`` tokens cut as ``LanguageModel.prefill`` cuts it."""
    if phase == "decode":
        return [(context, 1)]
    return [(start, min(piece, context - start)) for start in range(0, context, piece)]


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
    family = family_of(config)
    size = torch.empty(0, dtype=dtype).element_size()
    out: list[Term] = []
    calls = pieces(phase, context, settings.prefill_piece)
    for i, (start, q) in enumerate(calls):
        rows = batch * q
        layer = Terms(size, size)
        family.layer_terms(layer, config, batch, start, q, settings)
        edges = Terms(size, size)
        edges.add(
            "embedding lookup",
            "copy",
            weight_bytes=rows * config.d_model * size,
            act_bytes=rows * config.d_model * size,
        )
        family.edge_terms(edges, config, rows, q)
        if i == len(calls) - 1:  # logits of the last position only
            edges.linear("lm head", batch, config.d_model, config.vocab_size, False)
        out += [term.times(config.n_layer) for term in layer.items] + edges.items
    return out


def state_bytes(config: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the state after ``context`` tokens: what ``ModelState.nbytes`` reports."""
    return family_of(config).state_bytes(config, context, batch, dtype)


def kv_reads_exceed_weights_at(config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> int | None:
    """The first context at which a decode step reads more KV-cache bytes than weight bytes
    (None for a family whose state does not grow)."""
    grows = family_of(config).kv_bytes_per_token
    if grows is None:
        return None
    weights = sum(t.weight_bytes for t in terms(config, "decode", 0, batch, dtype))
    # A step after `context` cached tokens reads context + 1 of them.
    return max(0, math.floor(weights / (batch * grows(config, dtype))))


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
            "predicted": sum(
                t.flops for t in items if not t.weight_matmul and t.primitive in ("matmul", "matvec", "dot")
            ),
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
            {
                "name": t.name,
                "primitive": t.primitive,
                "flops": t.flops,
                "bytes": t.bytes(on_chip),
                "seconds": t.seconds(hardware, on_chip),
            }
            for t in _merged(items)
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
                if hardware.memory_bytes
                else None,
                "kv_reads_exceed_weight_reads_at": kv_reads_exceed_weights_at(config, batch, dtype),
                "decode": account(config, "decode", context, batch, hardware, dtype, settings, with_terms),
                "prefill": account(config, "prefill", context, batch, hardware, dtype, settings, with_terms),
            }
            for batch in batches
            for context in contexts
        ]
        models.append(
            {
                "model": name,
                "family": config.family,
                "config": asdict(config),
                "parameters": params,
                "weight_bytes": params * size,
                "points": points,
            }
        )
    return {
        "schema": SCHEMA,
        "hardware": hardware.to_dict(),
        "dtype": hardware.dtype,
        "settings": {"prefill_piece": settings.prefill_piece, "scan_chunk": settings.scan_chunk},
        "models": models,
    }
