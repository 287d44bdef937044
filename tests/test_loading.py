"""Every bad checkpoint gives a clear error that names the file and the key or tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mambastep
from mambastep import CheckpointError

from conftest import to_original_format


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        mambastep.load(tmp_path / "absent")


def test_file_instead_of_directory(mamba_dir):
    with pytest.raises(CheckpointError, match="is a file"):
        mambastep.load(mamba_dir / "config.json")


def test_missing_config(mamba_dir):
    (mamba_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        mambastep.load(mamba_dir)


def test_config_not_json(mamba_dir):
    (mamba_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        mambastep.load(mamba_dir)


def test_unknown_model_type(mamba_dir):
    _edit_config(mamba_dir, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        mambastep.load(mamba_dir)


def test_unknown_config_key(mamba_dir):
    _edit_config(mamba_dir, n_experts=8)
    with pytest.raises(CheckpointError, match=r"unknown config key\(s\) \['n_experts'\]"):
        mambastep.load(mamba_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size="16"), "'hidden_size' has value '16' of the wrong type"),
        (dict(hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
        (dict(intermediate_size=40), "intermediate_size = 40"),
        (dict(state_size=0), "d_state must be a positive integer"),
        (dict(time_step_rank="big"), "time_step_rank must be an integer or 'auto'"),
    ],
)
def test_bad_config_values(mamba_dir, change, message):
    _edit_config(mamba_dir, **change)
    with pytest.raises(CheckpointError, match=message):
        mambastep.load(mamba_dir)


def test_config_that_contradicts_the_weights(mamba_dir):
    _edit_config(mamba_dir, state_size=5)
    with pytest.raises(
        CheckpointError, match=r"tensor backbone.layers.0.mixer.A_log has shape \(32, 4\), the config implies \(32, 5\)"
    ):
        mambastep.load(mamba_dir)


def test_missing_tensor(mamba_dir):
    _edit_weights(mamba_dir, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: missing tensor\(s\) \['backbone.layers.1.mixer.D'\]"
    ):
        mambastep.load(mamba_dir)


def test_unexpected_tensor(mamba_dir):
    _edit_weights(mamba_dir, lambda t: t.update({"backbone.layers.2.norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['backbone.layers.2.norm.weight'\]"):
        mambastep.load(mamba_dir)


def test_truncated_safetensors(mamba_dir):
    path = mamba_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match="model.safetensors: not a readable safetensors file: corrupt or truncated"
    ):
        mambastep.load(mamba_dir)


def test_no_weights(mamba_dir):
    (mamba_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        mambastep.load(mamba_dir)


def test_original_format_corrupt_bin(mamba_dir, tmp_path):
    original = to_original_format(mamba_dir, tmp_path / "original")
    path = original / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: corrupt, truncated or unsafe"):
        mambastep.load(original)


def test_original_format_refuses_pickled_code(mamba_dir, tmp_path):
    original = to_original_format(mamba_dir, tmp_path / "original")

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Payload()}, original / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unsafe"):
        mambastep.load(original)


def test_original_format_unsupported_features(mamba_dir, tmp_path):
    original = to_original_format(mamba_dir, tmp_path / "original")
    _edit_config(original, attn_layer_idx=[1])
    with pytest.raises(CheckpointError, match=r"attn_layer_idx = \[1\] is not supported"):
        mambastep.load(original)
    _edit_config(original, attn_layer_idx=[], ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(CheckpointError, match="ssm_cfg.layer 'Mamba3' is not supported"):
        mambastep.load(original)


def test_untied_head_that_differs_from_tied_config(mamba_dir, tmp_path):
    original = to_original_format(mamba_dir, tmp_path / "original")
    tensors = torch.load(original / "pytorch_model.bin", weights_only=True)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    torch.save(tensors, original / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        mambastep.load(original)


def test_sharded_safetensors(mamba_dir):
    tensors = load_file(str(mamba_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(mamba_dir / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (mamba_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = mambastep.load(mamba_dir)
    (mamba_dir / "model.safetensors").unlink()
    sharded = mambastep.load(mamba_dir)
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(sharded(tokens)[0], expected(tokens)[0])
    (mamba_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        mambastep.load(mamba_dir)


def test_offline_hub_id_says_how_to_pass_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="pass its local directory"):
        mambastep.load("state-spaces/mamba-130m-hf")


def test_dtype_and_device_options(mamba_dir):
    model = mambastep.load(mamba_dir, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.lm_head.weight is model.backbone.embeddings.weight
