"""A decode step replayed from CUDA graphs: the whole step (every layer, the final norm and the
head) launched as one graph instead of dozens of kernels per layer.

A graph runs on fixed buffers, so it serves a model whose state has a fixed size (Mamba,
Mamba-2; not a transformer's growing cache). One graph is captured per bucket of batch sizes
(1, 2, 4, ... 256) at its first step; a batch between two buckets runs in the larger one, its
spare rows ignored (every row of a step is computed on its own). Larger batches run eagerly.

Each step copies the given tokens and state into the bucket's input buffers, replays the graph,
and copies the logits and the next state out into new tensors: the given state is never
changed, and a returned state is never overwritten by a later step (a session may keep or fork
any of them). The copies are two multi-tensor copies (``torch._foreach_copy_``), where a graph
saves the launch of every kernel of the step. Sampling stays outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mambastep.models.state import LayerState

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Step = Callable[[Tensor, Sequence[LayerState]], tuple[Tensor, list[LayerState]]]
# capture(fn) -> (replay, what fn returned): after replay(), fn's outputs hold what fn would
# return now, computed from the buffers fn read.
Capture = Callable[[Callable[[], tuple[Tensor, list[LayerState]]]], tuple[Callable[[], None], tuple]]


def cuda_capture(fn: Callable[[], tuple[Tensor, list[LayerState]]]) -> tuple[Callable[[], None], tuple]:
    """Capture ``fn`` as a CUDA graph with a memory pool of its own, after two warm-up runs on a
    side stream (Triton's compilation, the allocator's first blocks); returns (replay, fn's
    outputs in the graph's memory)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _tensors(layers: Sequence[LayerState]) -> list[Tensor]:
    return [t for layer in layers for t in layer.tensors().values()]


@dataclass
class _Graph:
    """One bucket's graph and its buffers, each (bucket, ...)."""

    inputs: list[Tensor]  # the tokens, then every tensor of the state read
    replay: Callable[[], None]
    outputs: list[Tensor]  # the logits, then every tensor of the next state: written by replay
    next_layers: list[LayerState]  # the next state's layers (whose tensors are in outputs)


class GraphedStep:
    """``step(token, layers)`` of a model with a fixed-size state, from CUDA graphs.

    Args:
        step: the eager step: (b,) tokens and the layers' states -> (b, vocab) logits and the
            next layers' states; it must not change the states it reads.
        capture: how a graph is captured (``cuda_capture``; a test may pass another).
    """

    def __init__(self, step: Step, capture: Capture = cuda_capture):
        self._step = step
        self._capture = capture
        self._graphs: dict[int, _Graph] = {}

    @torch.no_grad()  # a graph records no autograd history
    def __call__(self, token: Tensor, layers: Sequence[LayerState]) -> tuple[Tensor, list[LayerState]]:
        b = token.shape[0]
        bucket = next((size for size in BUCKETS if size >= b), None)
        if bucket is None:
            return self._step(token, layers)
        graph = self._graphs.get(bucket) or self._new_graph(bucket, token, layers)
        torch._foreach_copy_([t[:b] for t in graph.inputs], [token, *_tensors(layers)])
        graph.replay()
        copies = [torch.empty_like(t[:b]) for t in graph.outputs]
        torch._foreach_copy_(copies, [t[:b] for t in graph.outputs])
        values = iter(copies[1:])
        next_layers = [
            replace(layer, **{name: next(values) for name in layer.tensors()}) for layer in graph.next_layers
        ]
        return copies[0], next_layers

    def _new_graph(self, bucket: int, token: Tensor, layers: Sequence[LayerState]) -> _Graph:
        """Capture the bucket's graph, on buffers shaped like ``token`` and ``layers`` with
        ``bucket`` rows (zeros: their first replay reads what the step copies in)."""
        static_token = token.new_zeros(bucket)
        static_layers = [
            replace(layer, **{name: _rows(t, bucket) for name, t in layer.tensors().items()}) for layer in layers
        ]
        replay, (logits, next_layers) = self._capture(lambda: self._step(static_token, static_layers))
        graph = _Graph([static_token, *_tensors(static_layers)], replay, [logits, *_tensors(next_layers)], next_layers)
        self._graphs[bucket] = graph
        return graph


def _rows(t: Tensor, rows: int) -> Tensor:
    """Zeros like ``t`` with ``rows`` rows."""
    return t.new_zeros(rows, *t.shape[1:])
