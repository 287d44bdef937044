"""Mamba-1 and Mamba-2 models against `transformers`, and the model-level invariants."""

import json
import weakref

import pytest
import torch

import mambastep
from mambastep.settings import EngineSettings

from conftest import (
    assert_greedy_equals_transformers,
    assert_prefill_then_steps_equal_forward,
    hf_reference,
    make_hf_checkpoint,
    make_hf_model,
    original_checkpoint,
    random_tokens,
    to_original_format,
)

MAMBA_CONFIGS = [
    dict(),
    dict(use_bias=True, use_conv_bias=False),
    dict(tie_word_embeddings=False, hidden_size=13, state_size=3, time_step_rank=5, expand=3),
    dict(conv_kernel=2, num_hidden_layers=3, vocab_size=61),
    dict(residual_in_fp32=False, conv_kernel=5, time_step_rank=2),
]
MAMBA2_CONFIGS = [
    dict(),
    dict(n_groups=2, use_bias=True, use_conv_bias=False),
    dict(num_heads=3, head_dim=10, hidden_size=15, n_groups=3, tie_word_embeddings=False),
    dict(time_step_limit=(0.01, 0.2), conv_kernel=3, state_size=5, num_heads=6, head_dim=6, hidden_size=18),
]
FAMILIES = [("mamba", c) for c in MAMBA_CONFIGS] + [("mamba2", c) for c in MAMBA2_CONFIGS]
IDS = [f"{f}-{i}" for f, c in FAMILIES for i in [FAMILIES.index((f, c))]]


@pytest.fixture(params=FAMILIES, ids=IDS)
def checkpoint(request, tmp_path):
    family, config = request.param
    return make_hf_checkpoint(tmp_path / "ckpt", family=family, seed=len(config), **config)


def _tokens(model, b, l, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


def test_forward_equals_transformers(checkpoint):
    model, ref = mambastep.load(checkpoint), hf_reference(checkpoint)
    for b, l in [(1, 1), (2, 3), (3, 41)]:
        tokens = _tokens(model, b, l)
        logits, _ = model(tokens)
        with torch.no_grad():
            expected = ref(tokens).logits
        assert logits.shape == (b, l, model.config.vocab_size)
        assert (logits - expected).abs().max() <= 1e-4


def test_greedy_generation_equals_transformers(checkpoint):
    assert_greedy_equals_transformers(mambastep.load(checkpoint), hf_reference(checkpoint), new_tokens=12)


def test_prefill_then_steps_equals_forward(checkpoint):
    assert_prefill_then_steps_equal_forward(mambastep.load(checkpoint), 30, (1, 2, 17))


def test_prefill_in_pieces_equals_one_prefill(checkpoint):
    model = mambastep.load(checkpoint)
    tokens = _tokens(model, 2, 45)
    last, state = model.prefill(tokens)
    s = None
    for a, b in [(0, 1), (1, 3), (3, 20), (20, 45)]:
        piece_last, s = model.prefill(tokens[:, a:b], s)
    torch.testing.assert_close(piece_last, last, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(s.layers, state.layers):
        torch.testing.assert_close(ours.ssm, ref.ssm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.conv, ref.conv)
    # The internal walk over long prompts in pieces gives the same as one pass.
    model.configure(EngineSettings(prefill_piece=4))
    walked, _ = model.prefill(tokens)
    torch.testing.assert_close(walked, last, atol=1e-5, rtol=1e-5)


def test_prefill_frees_each_layers_old_state_as_its_next_is_made(checkpoint):
    model = mambastep.load(checkpoint).configure(EngineSettings(prefill_piece=4))
    blocks = model.backbone.layers
    seen, alive_at_last_layer = [], []
    first = blocks[0].register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[1].ssm)))
    last = blocks[-1].register_forward_pre_hook(lambda module, args: alive_at_last_layer.append(seen[-1]() is not None))
    tokens = _tokens(model, 1, 10)
    try:
        model.prefill(tokens)  # a fresh state, then the state between pieces: nobody else holds them
        assert alive_at_last_layer == [False] * 3  # three pieces; layer 0's old state gone each time
        held = model.new_state(1)
        before = [s.ssm.clone() for s in held.layers]
        seen.clear()
        alive_at_last_layer.clear()
        model.prefill(tokens, held)
        assert alive_at_last_layer == [True, False, False]  # the caller's state stays, untouched
        assert all(torch.equal(s.ssm, b) for s, b in zip(held.layers, before))
    finally:
        first.remove()
        last.remove()


def test_batch_invariance(checkpoint):
    model = mambastep.load(checkpoint)
    tokens = _tokens(model, 3, 25)
    batched, state = model(tokens)
    for i in range(3):
        alone, alone_state = model(tokens[i : i + 1])
        torch.testing.assert_close(alone, batched[i : i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone_state.layers[0].ssm, state.select([i]).layers[0].ssm, atol=1e-5, rtol=1e-5)


def test_original_format_equals_hf_format(checkpoint, tmp_path):
    original = to_original_format(checkpoint, tmp_path / "original")
    hf_model, orig_model = mambastep.load(checkpoint), mambastep.load(original)
    assert orig_model.config == hf_model.config
    tokens = _tokens(hf_model, 2, 9)
    torch.testing.assert_close(orig_model(tokens)[0], hf_model(tokens)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "family, config",
    [("mamba", {}), ("mamba2", dict(n_groups=2)), ("mamba2", dict(tie_word_embeddings=False))],
    ids=["mamba", "mamba2", "mamba2-untied"],
)
def test_original_checkpoint_with_a_padded_vocabulary_equals_transformers(family, config, tmp_path):
    """The published state-spaces checkpoints pad their vocabulary: config.json says vocab_size 50277
    and pad_vocab_size_multiple 8, the embedding (and an untied head) have 50280 rows. Here 99 -> 104,
    written from the `transformers` model itself, which has the 104 rows."""
    ref = make_hf_model(family, seed=3, vocab_size=104, **config)
    original = original_checkpoint(ref, tmp_path / "original", vocab_size=99)
    written = json.loads((original / "config.json").read_text())
    assert written["vocab_size"] == 99 and written["pad_vocab_size_multiple"] == 8
    tensors = torch.load(original / "pytorch_model.bin", weights_only=True)
    assert tensors["backbone.embedding.weight"].shape[0] == tensors["lm_head.weight"].shape[0] == 104
    model = mambastep.load(original)
    assert model.config.vocab_size == 104
    tokens = random_tokens(99, 2, 23)  # ids of the unpadded vocabulary
    logits, _ = model(tokens)
    with torch.no_grad():
        expected = ref(tokens).logits
    assert logits.shape == expected.shape == (2, 23, 104)
    assert (logits - expected).abs().max() <= 1e-4  # the tolerance of test_forward_equals_transformers
    last, _ = model.prefill(tokens[:, :7])
    assert (last - expected[:, 6]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_bf16_weights_keep_an_fp32_state(family, tmp_path):
    path = make_hf_checkpoint(tmp_path / family, family=family)
    fp32, bf16 = mambastep.load(path), mambastep.load(path, dtype=torch.bfloat16)
    tokens = _tokens(fp32, 2, 20)
    logits, state = bf16(tokens)
    assert all(layer.ssm.dtype == torch.float32 for layer in state.layers)
    assert logits.dtype == torch.float32
    # bf16 weights round every matmul to 8 bits of mantissa: logits agree to a few percent of their range.
    expected, _ = fp32(tokens)
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max() + 0.05
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
