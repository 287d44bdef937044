"""Mamba-2 behaviours that Mamba-1 does not have."""

import json

import pytest
import torch

import mambastep
from mambastep import CheckpointError

from conftest import make_hf_checkpoint, to_original_format


def test_D_per_channel_from_the_original_format(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf", family="mamba2", n_groups=2)
    original = to_original_format(hf, tmp_path / "orig")
    config = json.loads((original / "config.json").read_text())
    config["ssm_cfg"]["D_has_hdim"] = True
    (original / "config.json").write_text(json.dumps(config))
    tensors = torch.load(original / "pytorch_model.bin", weights_only=True)
    head_dim = 8
    for name in [k for k in tensors if k.endswith("mixer.D")]:
        tensors[name] = tensors[name].repeat_interleave(head_dim)  # the same D for every channel of a head
    torch.save(tensors, original / "pytorch_model.bin")
    per_channel, per_head = mambastep.load(original), mambastep.load(hf)
    assert per_channel.config.D_has_hdim
    tokens = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(per_channel(tokens)[0], per_head(tokens)[0], atol=1e-6, rtol=1e-6)
    last, state = per_channel.prefill(tokens[:, :5])
    for t in range(5, 13):
        last, state = per_channel.step(tokens[:, t], state)
    torch.testing.assert_close(last, per_channel(tokens)[0][:, -1], atol=1e-5, rtol=1e-5)


def test_dt_limit_clamps_on_both_paths(tmp_path):
    # A narrow limit that the random dt certainly crosses: the step path must clamp like the scan.
    path = make_hf_checkpoint(tmp_path / "m", family="mamba2", time_step_limit=(0.05, 0.06))
    model = mambastep.load(path)
    assert model.config.dt_limit == (0.05, 0.06)
    tokens = torch.randint(0, 97, (1, 20))
    full, _ = model(tokens)
    last, state = model.prefill(tokens[:, :1])
    for t in range(1, 20):
        last, state = model.step(tokens[:, t], state)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)
    unclamped = mambastep.load(make_hf_checkpoint(tmp_path / "u", family="mamba2"))
    assert not torch.allclose(unclamped(tokens)[0], full)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(num_heads=3), "num_heads = 3"),
        (dict(head_dim=6), "not a multiple of head_dim"),
        (dict(time_step_limit=[0.5]), "dt limit must be a pair"),
        (dict(n_groups=3), "cannot be split into n_groups = 3"),
    ],
)
def test_bad_mamba2_configs(tmp_path, edit, message):
    path = make_hf_checkpoint(tmp_path / "m", family="mamba2")
    config = json.loads((path / "config.json").read_text())
    config.update(edit)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        mambastep.load(path)


@pytest.mark.parametrize(
    "ssm_cfg, message",
    [
        (dict(norm_before_gate=True), "norm_before_gate = True is not supported"),
        (dict(d_ssm=8), "d_ssm = 8"),
        (dict(rmsnorm=False), "rmsnorm = False is not supported"),
        (dict(headdim=16, mystery=1), r"unknown config key\(s\) \['mystery'\]"),
    ],
)
def test_bad_original_mamba2_configs(tmp_path, ssm_cfg, message):
    original = to_original_format(make_hf_checkpoint(tmp_path / "m", family="mamba2"), tmp_path / "o")
    config = json.loads((original / "config.json").read_text())
    config["ssm_cfg"].update(ssm_cfg)
    (original / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        mambastep.load(original)


def test_state_size_of_mamba2_130m():
    config = mambastep.Mamba2Config(d_model=768, n_layer=24, vocab_size=50288)
    with torch.device("meta"):
        model = mambastep.Mamba2LM(config)
    layer = model.backbone.layers[0].mixer.new_state(1, torch.float32, torch.device("cpu"))
    assert layer.ssm.shape == (1, 24, 64, 128) and layer.conv.shape == (1, 3, 1792)
    assert 24 * layer.nbytes == 24 * 4 * (24 * 64 * 128 + 3 * 1792)
