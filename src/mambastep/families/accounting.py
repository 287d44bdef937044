"""The vocabulary of the cost model: a ``Term`` is one primitive operation of a call, with its
FLOPs and bytes; ``Terms`` collects a layer's. Each family describes its layers in these words
(``Family.layer_terms``); ``evidence.cost`` sums them and puts them on a roofline.

Counting rules:

- a multiply-add is 2 FLOPs; a nonlinearity (exp, softplus, SiLU, gelu, cos) counts 1 per
  value; RMSNorm 4 and LayerNorm 7 FLOPs per element;
- a product with a weight matrix is a *matmul* when several token rows share the weight, a
  *matvec* for one row; attention over a cache is a matvec per head for one query; the Mamba
  step's read-out C·h and the causal conv are *dot* products;
- bytes: weights read, recurrent state read and written (conv window, SSM state, KV cache) and
  activations read and written at the edges of each operation; the insides of the scan and of
  attention (Δ-sized (e, n) tensors, attention scores) are assumed to stay on chip, as in
  fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Classes of primitive operations; "copy" moves bytes and does no arithmetic.
PRIMITIVES = ("matmul", "matvec", "dot", "elementwise", "nonlinear", "norm", "copy")
RMSNORM_FLOPS, LAYERNORM_FLOPS = 4, 7  # per element
SOFTMAX_ELEMENTWISE_FLOPS = 4  # per score: scale, subtract the max, sum, divide (plus one exp)
SSM_STATE_BYTES = 4  # the SSM state is float32 whatever the weights
COUNTS = ("flops", "weight_bytes", "state_read", "state_written", "act_bytes")


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

    def times(self, n: int) -> Term:
        return replace(self, **{name: getattr(self, name) * n for name in COUNTS})

    def plus(self, other: Term) -> Term:
        return replace(self, **{name: getattr(self, name) + getattr(other, name) for name in COUNTS})

    def bytes(self, state_on_chip: bool = False) -> int:
        """Main-memory bytes moved."""
        state = 0 if state_on_chip else self.state_read + self.state_written
        return self.weight_bytes + self.act_bytes + state

    def seconds(self, hardware, state_on_chip: bool = False) -> float:
        """Roofline time on ``hardware`` (an ``evidence.hardware.Hardware``): the longer of
        its FLOPs at the peak of its class and its bytes at the bandwidth."""
        compute = self.flops / hardware.peak[self.primitive] if self.primitive != "copy" else 0.0
        return max(compute, self.bytes(state_on_chip) / hardware.bandwidth)


class Terms:
    """Collects the terms of one layer (or of the parts outside the layers), for weights of
    ``weight_bytes`` and activations of ``act_bytes`` bytes per value."""

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
        self.items.append(
            Term(
                name,
                primitive,
                2 * rows * d_in * d_out,
                weight_bytes=d_in * d_out * self.w,
                act_bytes=rows * (d_in + d_out) * self.a,
                weight_matmul=True,
            )
        )
        if bias:
            self.add(
                f"{name} bias",
                "elementwise",
                rows * d_out,
                weight_bytes=d_out * self.w,
                act_bytes=2 * rows * d_out * self.a,
            )

    def norm(self, name: str, rows: int, width: int, flops_per_element: int, params: int) -> None:
        self.add(
            name,
            "norm",
            flops_per_element * rows * width,
            weight_bytes=params * width * self.w,
            act_bytes=2 * rows * width * self.a,
        )

    def conv(self, batch: int, rows: int, channels: int, k: int, bias: bool) -> None:
        """The causal depthwise conv: a dot product of length k per channel, and its (k-1)-input window."""
        window = batch * (k - 1) * channels * self.a
        self.add(
            "conv",
            "dot",
            2 * rows * channels * k,
            weight_bytes=channels * k * self.w,
            state_read=window,
            state_written=window,
            act_bytes=2 * rows * channels * self.a,
        )
        if bias:
            self.add(
                "conv bias",
                "elementwise",
                rows * channels,
                weight_bytes=channels * self.w,
                act_bytes=2 * rows * channels * self.a,
            )


def ssm_state_bytes(config, conv_channels: int, batch: int, act_bytes: int) -> int:
    """Bytes of a batch's state of an SSM family: per layer the conv window ((k-1) inputs of
    ``conv_channels`` in the activation dtype) and the float32 SSM state (d_inner x d_state)."""
    per_layer = (config.d_conv - 1) * conv_channels * act_bytes + config.d_inner * config.d_state * SSM_STATE_BYTES
    return batch * config.n_layer * per_layer
