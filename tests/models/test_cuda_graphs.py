"""The decode step from CUDA graphs (``models.cuda_graphs``): its buckets, buffers and copies,
on the CPU with a capture that replays the step as a graph would (the same output memory
overwritten at every replay). The graphs themselves are tested on a GPU (tests/test_gpu.py)."""

import pytest
import torch

import mambastep
from mambastep.models.cuda_graphs import BUCKETS, GraphedStep
from mambastep.settings import EngineSettings

from conftest import make_hf_checkpoint, random_tokens


class ReplayCapture:
    """A stand-in for ``cuda_capture``: the outputs of the first run are the graph's memory,
    and each replay runs the step again on the same input buffers and writes into them."""

    def __init__(self):
        self.captures = []

    def __call__(self, fn):
        logits, layers = fn()
        outputs = [logits, *(t for layer in layers for t in layer.tensors().values())]
        self.captures.append(logits.shape[0])

        def replay():
            new_logits, new_layers = fn()
            torch._foreach_copy_(outputs, [new_logits, *(t for layer in new_layers for t in layer.tensors().values())])

        return replay, (logits, layers)


@pytest.fixture(params=["mamba", "mamba2"])
def model(request, tmp_path):
    path = make_hf_checkpoint(
        tmp_path / "m", family=request.param, **({"n_groups": 2} if request.param == "mamba2" else {})
    )
    model = mambastep.load(path, settings=EngineSettings(scan="torch", matvec="torch"))
    with torch.no_grad():  # as a decode step runs
        yield model


def _clone(state):
    return [layer.clone() for layer in state.layers]


def _assert_same_state(layers, expected, **tol):
    for got, want in zip(layers, expected):
        for name, t in got.tensors().items():
            torch.testing.assert_close(t, want.tensors()[name], **tol, msg=name)


@pytest.mark.parametrize("batch", [1, 3, 8, BUCKETS[-1] + 1])
def test_graphed_steps_equal_eager_steps_and_leave_every_state_alone(model, batch):
    capture = ReplayCapture()
    graphed = GraphedStep(model._step_logits, capture)
    tokens = random_tokens(model.config.vocab_size, batch, 6)
    _, state = model.prefill(tokens[:, :3])
    eager_layers = state.layers
    given, seen = state.layers, []
    for t in range(3, 6):
        before = [layer.clone() for layer in given]
        logits, layers = graphed(tokens[:, t], given)
        want_logits, eager_layers = model._step_logits(tokens[:, t], eager_layers)
        torch.testing.assert_close(logits, want_logits)  # a batch padded to its bucket: rows computed alike
        _assert_same_state(layers, eager_layers)
        _assert_same_state(given, before, atol=0, rtol=0)  # the given state: unchanged
        seen.append(([layer.clone() for layer in layers], layers))
        given = layers
    for kept, returned in seen:  # no later step overwrote a returned state
        _assert_same_state(returned, kept, atol=0, rtol=0)
    assert capture.captures == ([] if batch > BUCKETS[-1] else [next(s for s in BUCKETS if s >= batch)])


def test_one_graph_per_bucket_serves_every_batch_in_it(model):
    capture = ReplayCapture()
    graphed = GraphedStep(model._step_logits, capture)
    for batch in (3, 4, 2, 1, 3):  # buckets 4, 4, 2, 1, 4: stale rows of a larger batch are ignored
        tokens = random_tokens(model.config.vocab_size, batch, 2, seed=batch)
        _, state = model.prefill(tokens[:, :1])
        logits, layers = graphed(tokens[:, 1], state.layers)
        want_logits, want_layers = model._step_logits(tokens[:, 1], state.layers)
        assert logits.shape == (batch, model.config.vocab_size)
        torch.testing.assert_close(logits, want_logits)
        _assert_same_state(layers, want_layers)
    assert capture.captures == [4, 2, 1]


def test_graphs_are_chosen_only_for_a_fixed_size_state_on_a_gpu(model, tmp_path):
    assert model.settings.decode == "auto" and model._decode_step() == model._step_logits  # the CPU: eager
    with pytest.raises(ValueError, match="decode='graphs' replays CUDA graphs .* on cpu: choose 'auto' or 'eager'"):
        model.configure(EngineSettings(decode="graphs"))
    transformer = mambastep.load(make_hf_checkpoint(tmp_path / "t", family="gpt_neox"))
    assert not transformer.fixed_size_state and model.fixed_size_state
    with pytest.raises(ValueError, match="not of a gpt_neox model"):
        transformer.configure(EngineSettings(decode="graphs"))
