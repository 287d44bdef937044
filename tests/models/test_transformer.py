"""The GPT-NeoX baseline against `transformers`, its KV cache, and its loading checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mambastep
from mambastep.cli import main
from mambastep.models.state import KVLayerState, ModelState, StateError
from mambastep.settings import EngineSettings

from conftest import (
    assert_greedy_equals_transformers,
    assert_prefill_then_steps_equal_forward,
    hf_reference,
    make_hf_checkpoint,
)

CONFIGS = [
    dict(),
    dict(use_parallel_residual=False, attention_bias=False, rotary_pct=1.0),
    dict(tie_word_embeddings=True, num_attention_heads=2, rotary_pct=0.25, rotary_emb_base=500, vocab_size=61),
    dict(num_hidden_layers=3, hidden_size=24, num_attention_heads=3, intermediate_size=40, layer_norm_eps=1e-3),
]


@pytest.fixture(params=CONFIGS, ids=[f"neox-{i}" for i in range(len(CONFIGS))])
def checkpoint(request, tmp_path):
    return make_hf_checkpoint(tmp_path / "neox", family="gpt_neox", seed=len(request.param), **request.param)


@pytest.fixture
def model(tmp_path):
    return mambastep.load(make_hf_checkpoint(tmp_path / "neox", family="gpt_neox"))


def _tokens(model, b, l, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


def test_forward_equals_transformers(checkpoint):
    model, ref = mambastep.load(checkpoint), hf_reference(checkpoint)
    assert isinstance(model, mambastep.TransformerLM)
    for b, l in [(1, 1), (2, 3), (3, 41)]:
        tokens = _tokens(model, b, l)
        logits, state = model(tokens)
        with torch.no_grad():
            expected = ref(tokens).logits
        assert logits.shape == (b, l, model.config.vocab_size)
        assert (logits - expected).abs().max() <= 1e-4
        assert state.layers[0].length == l


def test_greedy_generation_equals_transformers(checkpoint):
    assert_greedy_equals_transformers(mambastep.load(checkpoint), hf_reference(checkpoint), new_tokens=10)


def test_prefill_then_steps_equals_forward(checkpoint):
    assert_prefill_then_steps_equal_forward(mambastep.load(checkpoint), 20, (1, 13))


def test_prefill_in_pieces_and_continued_forward(model):
    tokens = _tokens(model, 2, 23)
    full, _ = model(tokens)
    model.configure(EngineSettings(prefill_piece=5))  # pieces after the first attend to a cache
    last, _ = model.prefill(tokens)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)
    _, state = model(tokens[:, :9])
    rest, _ = model(tokens[:, 9:], state)
    torch.testing.assert_close(rest, full[:, 9:], atol=1e-5, rtol=1e-5)


def test_batch_of_two_equals_two_of_one(model):
    tokens = _tokens(model, 2, 12)
    both, state = model.prefill(tokens)
    for i in range(2):
        one, one_state = model.prefill(tokens[i : i + 1])
        torch.testing.assert_close(one[0], both[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_state.layers[1].k[0], state.layers[1].k[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_grows_by_two_x_layers_x_heads_x_head_dim_x_dtype_bytes_per_token(tmp_path, dtype):
    model = mambastep.load(make_hf_checkpoint(tmp_path / "neox", family="gpt_neox", num_hidden_layers=3), dtype=dtype)
    c, b = model.config, 2
    per_token = 2 * c.n_layer * c.n_heads * c.head_dim * torch.empty(0, dtype=dtype).element_size()
    state = model.new_state(b)
    assert state.nbytes == 0
    sizes = []
    for l in [1, 5]:
        _, state = model.prefill(_tokens(model, b, l), state)
        sizes.append(state.nbytes)
    _, state = model.step(torch.tensor([1, 2]), state)
    assert sizes == [b * per_token, 6 * b * per_token] and state.nbytes == 7 * b * per_token


def test_forks_of_one_state_do_not_disturb_each_other(model):
    _, state = model.prefill(_tokens(model, 2, 6))
    before = state.clone()
    a_logits, a = model.step(torch.tensor([1, 2]), state)  # writes into spare room after the cache
    _, b = model.step(torch.tensor([3, 4]), state)  # must not write over a's token
    again, _ = model.step(torch.tensor([5, 6]), a)
    expected_a, a_ref = model.step(torch.tensor([1, 2]), before.clone())
    expected_again, _ = model.step(torch.tensor([5, 6]), a_ref)
    assert torch.equal(a_logits, expected_a) and torch.equal(again, expected_again)
    for x, y in zip(state.layers, before.layers):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v)
    assert not torch.equal(a.layers[0].k[:, -1], b.layers[0].k[:, -1])


def test_empty_cache_and_append():
    empty = KVLayerState.zeros(2, 3, 4, torch.float32)
    assert empty.length == 0 and empty.nbytes == 0
    k = torch.randn(2, 5, 3, 4)
    grown = empty.append(k, -k).append(k[:, :1], k[:, :1])
    assert grown.length == 6 and torch.equal(grown.k[:, :5], k) and torch.equal(grown.v[:, :5], -k)
    assert empty.length == 0


def test_save_load_round_trip(model, tmp_path):
    _, state = model.prefill(_tokens(model, 2, 9))
    token = torch.tensor([3, 5])
    expected, _ = model.step(token, state)
    state.save(tmp_path / "kv.state")
    loaded = mambastep.load_state(tmp_path / "kv.state", model)
    assert loaded.nbytes == state.nbytes and loaded.layers[0].length == 9
    got, _ = model.step(token, loaded)
    assert torch.equal(got, expected)


def test_load_refuses_caches_of_different_lengths(model, tmp_path):
    _, state = model.prefill(_tokens(model, 1, 4))
    _, longer = model.prefill(_tokens(model, 1, 6))
    ModelState((state.layers[0], longer.layers[1]), state.fingerprint).save(tmp_path / "bad.state")
    with pytest.raises(StateError, match=r"different lengths \[4, 6\]"):
        mambastep.load_state(tmp_path / "bad.state", model)


def test_select_and_cat(model):
    _, state = model.prefill(_tokens(model, 3, 5))
    joined = ModelState.cat([state.select([i]) for i in range(3)])
    assert torch.equal(joined.layers[0].k, state.layers[0].k)
    _, other = model.prefill(_tokens(model, 1, 2))
    with pytest.raises(StateError, match=r"different lengths \[2, 5\]"):
        ModelState.cat([state.select([0]), other])


def test_old_checkpoint_buffers_are_dropped_and_old_config_keys_read(tmp_path):
    path = make_hf_checkpoint(tmp_path / "neox", family="gpt_neox")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, str(path / "model.safetensors"))
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"], rope_scaling=None)
    (path / "config.json").write_text(json.dumps(raw))
    model = mambastep.load(path)
    assert model.config.rotary_dim == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rotary_pct=0.3), "rotary_pct = 0.3 and rope_parameters.partial_rotary_factor = 0.5 disagree"),
        (dict(sliding_window=16), "unknown config key(s) ['sliding_window']"),
        (dict(hidden_act="relu"), "hidden_act = 'relu' is not supported"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling is not supported"),
        (
            dict(intermediate_size=48),
            "gpt_neox.layers.0.mlp.dense_h_to_4h.weight has shape (64, 32), the config implies (48, 32)",
        ),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, change, message):
    path = make_hf_checkpoint(tmp_path / "neox", family="gpt_neox")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(mambastep.CheckpointError) as err:
        mambastep.load(path)
    assert message in str(err.value)


def test_save_then_load_and_transformers_reads_it(model, tmp_path):
    mambastep.save(model, tmp_path / "copy")
    tokens = _tokens(model, 1, 6)
    ours, _ = model(tokens)
    again, _ = mambastep.load(tmp_path / "copy")(tokens)
    with torch.no_grad():
        theirs = hf_reference(tmp_path / "copy")(tokens).logits
    assert torch.equal(ours, again) and (ours - theirs).abs().max() <= 1e-4


def test_generate_and_info_commands_run_on_the_transformer(tmp_path, capsys):
    path = make_hf_checkpoint(tmp_path / "neox", family="gpt_neox", vocab_size=256)
    assert (
        main(
            [
                "generate",
                "--model",
                str(path),
                "--tokenizer",
                "bytes",
                "--prompt",
                "ab",
                "--temperature",
                "0",
                "--max-new-tokens",
                "4",
                "--ignore-eos",
                "--json",
            ]
        )
        == 0
    )
    assert "completion" in json.loads(capsys.readouterr().out)
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "gpt_neox" and info["state_bytes_per_sequence"] == 0
    _, state = mambastep.load(path).prefill(torch.tensor([[1, 2, 3]]))
    assert info["state_bytes_per_token"] == state.nbytes / 3 == 2 * 2 * 32 * 4  # k and v, 2 layers, d 32, float32
