"""The analytic cost model against what the models really run: FLOPs, state bytes, weight reads."""

import argparse
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mambastep.cli import common, main
from mambastep.evidence import cost
from mambastep.evidence.hardware import (
    BUILTIN_HARDWARE,
    VECTOR_FLAGS,
    Hardware,
    HardwareError,
    cpu_description,
    get_hardware,
)
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.models.config import GPTNeoXConfig, Mamba2Config, MambaConfig, MambaLTIConfig
from mambastep.settings import EngineSettings

from conftest import make_hf_checkpoint

# Small pieces and chunks so that a short prompt has uneven pieces, partial chunks, 1-token chunks and
# a 1-token piece. The PyTorch scan: FlopCounterMode does not see inside the fused CPU kernel.
SETTINGS = EngineSettings(scan="torch", matvec="torch", prefill_piece=7, scan_chunk=4)
CONFIGS = [
    MambaConfig(d_model=16, n_layer=2, vocab_size=97, d_state=4),
    MambaConfig(
        d_model=12,
        n_layer=3,
        vocab_size=50,
        d_state=3,
        expand=3,
        dt_rank=5,
        bias=True,
        conv_bias=False,
        tie_embeddings=False,
    ),
    MambaLTIConfig(d_model=16, n_layer=2, vocab_size=97, d_state=4),
    Mamba2Config(d_model=16, n_layer=2, vocab_size=97, d_state=4, head_dim=8),
    Mamba2Config(
        d_model=24, n_layer=2, vocab_size=61, d_state=5, head_dim=6, n_groups=2, d_conv=3, bias=True, D_has_hdim=True
    ),
    GPTNeoXConfig(d_model=32, n_layer=2, n_heads=4, vocab_size=97),
    GPTNeoXConfig(
        d_model=24, n_layer=3, n_heads=2, vocab_size=61, parallel_residual=False, attention_bias=False, rotary_pct=1.0
    ),
]
IDS = [f"{c.family}-{i}" for i, c in enumerate(CONFIGS)]
# The time-invariant ablation reads its states out by elementwise products over one-state
# channels, which the counter sees as a matrix product in a step and not at all in a prompt.
COUNTED = [(c, i) for c, i in zip(CONFIGS, IDS) if c.family != "mamba_lti"]


@pytest.mark.parametrize("config", [c for c, _ in COUNTED], ids=[i for _, i in COUNTED])
@pytest.mark.parametrize("batch, length", [(1, 15), (3, 13), (2, 5), (2, 0)])
def test_matmul_flops_equal_flop_counter(config, batch, length):
    model = random_model(config, settings=SETTINGS)
    for phase in ("prefill", "decode") if length else ("decode",):
        for kind, flops in cost.validate_flops(model, phase, length, batch).items():
            assert flops["counted"] == flops["predicted"] > 0, (phase, kind)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matvec_kernel_flops_are_counted(config):
    """Products through the fused matvec kernel count too (its FLOP formula). A Mamba or Mamba-2
    eager decode step is one fused call for all layers, which the counter cannot see into, so
    only their prompts are checked."""
    model = random_model(config, settings=replace(SETTINGS, matvec="cpp"))
    fused_decode = type(config) in (MambaConfig, Mamba2Config)  # the families with a whole-stack step
    for phase in ("prefill",) if fused_decode else ("prefill", "decode"):  # 5 rows: both take the kernel
        flops = cost.validate_flops(model, phase, 5, 1)["weight_matmuls"]
        assert flops["counted"] == flops["predicted"] > 0, phase


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_real_tensors(config, dtype):
    model = random_model(config, dtype=dtype, settings=SETTINGS)
    for batch, length in [(1, 1), (2, 9)]:
        _, state = model.prefill(torch.zeros(batch, length, dtype=torch.long))
        assert cost.state_bytes(config, length, batch, dtype) == state.nbytes
        _, state = model.step(torch.zeros(batch, dtype=torch.long), state)
        assert cost.state_bytes(config, length + 1, batch, dtype) == state.nbytes


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_decode_step_reads_every_weight_once(config):
    model = random_model(config)
    params = {id(p): p for p in model.parameters()}.values()
    assert cost.parameter_count(config) == sum(p.numel() for p in params)
    read = sum(t.weight_bytes for t in cost.terms(config, "decode", 5, batch=2))
    table = 0 if config.tie_embeddings else config.vocab_size * config.d_model  # read as the head when tied
    assert read == 4 * (cost.parameter_count(config) - table + 2 * config.d_model)  # + the 2 embedding rows


PUBLISHED_SIZES = {
    "mamba-130m": 130e6,
    "mamba-370m": 370e6,
    "mamba-790m": 790e6,
    "mamba-1.4b": 1.4e9,
    "mamba-2.8b": 2.8e9,
    "mamba2-130m": 130e6,
    "mamba2-370m": 370e6,
    "mamba2-780m": 780e6,
    "mamba2-1.3b": 1.3e9,
    "mamba2-2.7b": 2.7e9,
    "pythia-160m": 160e6,
    "pythia-410m": 410e6,
    "pythia-1b": 1.0e9,
    "pythia-1.4b": 1.4e9,
    "pythia-2.8b": 2.8e9,
    "mamba2-bytes": 690_064,  # a byte-level start for `mambastep train`
    "mamba2-bpe8k": 5_553_600,  # the bundled default model's shape (docs/default-model.md)
}


def test_builtin_configurations_have_their_published_sizes():
    assert set(BUILTIN_CONFIGS) == set(PUBLISHED_SIZES)
    for name, size in PUBLISHED_SIZES.items():
        assert abs(cost.parameter_count(BUILTIN_CONFIGS[name]) / size - 1) < 0.06, name
    assert BUILTIN_CONFIGS["pythia-1b"].head_dim == 256 and BUILTIN_CONFIGS["mamba2-2.7b"].n_heads == 80


def test_kv_reads_exceed_weight_reads_at_the_reported_context():
    config, dtype = BUILTIN_CONFIGS["pythia-160m"], torch.bfloat16
    for batch in (1, 16):
        at = cost.kv_reads_exceed_weights_at(config, batch, dtype)

        def kv_and_weights(context):
            terms = cost.terms(config, "decode", context, batch, dtype)
            kv = sum(t.state_read for t in terms if t.name.startswith("attention"))
            return kv, sum(t.weight_bytes for t in terms)

        kv, weights = kv_and_weights(at)
        assert kv > weights
        kv, weights = kv_and_weights(at - 1)
        assert kv <= weights
    assert cost.kv_reads_exceed_weights_at(BUILTIN_CONFIGS["mamba-130m"]) is None


def test_a_state_that_fits_on_chip_costs_no_memory_traffic():
    config = BUILTIN_CONFIGS["mamba-130m"]
    h100 = BUILTIN_HARDWARE["h100"]
    asic = Hardware(**{**h100.to_dict(), "name": "asic", "on_chip_bytes": 2**30})
    off, on = (cost.account(config, "decode", 100, 4, hw) for hw in (h100, asic))
    saved = off["state_read_bytes_per_token"] + off["state_written_bytes_per_token"]
    assert not off["state_on_chip"] and on["state_on_chip"]
    assert math.isclose(off["total_bytes_per_token"] - on["total_bytes_per_token"], saved)
    assert on["predicted_s"] < off["predicted_s"]


def test_hardware_profiles_from_files_are_checked(tmp_path):
    path = tmp_path / "asic.json"
    path.write_text(json.dumps({**BUILTIN_HARDWARE["cpu"].to_dict(), "name": "asic"}))
    assert get_hardware(str(path)).name == "asic"
    path.write_text(json.dumps({**BUILTIN_HARDWARE["cpu"].to_dict(), "sram": 1}))
    with pytest.raises(HardwareError, match=r"unknown key\(s\) \['sram'\]"):
        get_hardware(str(path))
    raw = BUILTIN_HARDWARE["cpu"].to_dict()
    path.write_text(json.dumps({**raw, "peak": {**raw["peak"], "dot": 0}}))
    with pytest.raises(HardwareError, match="peak.dot must be a positive number, got 0"):
        get_hardware(str(path))
    with pytest.raises(HardwareError, match="no hardware 'tpu9'"):
        get_hardware("tpu9")


COST_KEYS = {"schema", "hardware", "dtype", "settings", "models"}
MODEL_KEYS = {"model", "family", "config", "parameters", "weight_bytes", "points"}
POINT_KEYS = {
    "batch",
    "context",
    "state_bytes",
    "fits_in_memory",
    "kv_reads_exceed_weight_reads_at",
    "decode",
    "prefill",
}
ACCOUNT_KEYS = {
    "tokens",
    "flops_per_token",
    "bytes_per_token",
    "weight_bytes_per_token",
    "state_read_bytes_per_token",
    "state_written_bytes_per_token",
    "activation_bytes_per_token",
    "total_flops_per_token",
    "total_bytes_per_token",
    "arithmetic_intensity",
    "seconds_by_primitive",
    "predicted_s",
    "predicted_s_per_token",
    "state_on_chip",
}


def test_cost_command_json_schema(tmp_path, capsys):
    paths = [make_hf_checkpoint(tmp_path / f, family=f) for f in ("mamba", "gpt_neox")]
    profile = tmp_path / "hw.json"
    args = ["cost", "--model", *map(str, paths), "mamba2-130m", "--context", "16", "1000", "--batch", "1", "4"]
    assert main([*args, "--hardware", "a100", "--save-hardware", str(profile), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == COST_KEYS and report["schema"] == "mambastep.cost/1"
    assert [m["family"] for m in report["models"]] == ["mamba", "gpt_neox", "mamba2"]
    for m in report["models"]:
        assert set(m) == MODEL_KEYS and len(m["points"]) == 4
        for p in m["points"]:
            assert set(p) == POINT_KEYS and set(p["decode"]) == ACCOUNT_KEYS == set(p["prefill"])
    assert main([*args, "--hardware", str(profile)]) == 0  # the saved profile reads back; a table this time
    text = capsys.readouterr().out
    assert "hardware a100 (bfloat16)" in text and "decode roofline time by primitive" in text


def test_calibrate_wins_over_hardware_as_the_help_says(monkeypatch, capsys):
    measured = BUILTIN_HARDWARE["cpu"]
    monkeypatch.setattr(common, "calibrate", lambda: measured)
    args = argparse.Namespace(hardware="h100", calibrate=True, save_hardware=None)
    assert common.hardware(args) is measured
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ignored when --calibrate is given" in text and "wins over --hardware when both are given" in text


def test_cost_command_errors_are_one_line(tmp_path, capsys):
    assert main(["cost", "--model", "mamba-7b"]) == 1
    assert (
        "no checkpoint directory at mamba-7b; nor is it a built-in configuration (mamba-130m" in capsys.readouterr().err
    )
    assert main(["cost", "--model", "mamba-130m", "--hardware", "tpu9"]) == 1
    assert "no hardware 'tpu9': give one of" in capsys.readouterr().err
    for missing in (tmp_path / "missing.json", tmp_path / "missing"):
        assert main(["cost", "--model", "mamba-130m", "--hardware", str(missing)]) == 1
        assert (
            capsys.readouterr().err == f"mambastep: error: no hardware profile file at {missing}: it does not exist\n"
        )
    assert main(["cost", "--model", "mamba-130m", "--context", "0"]) == 1


def test_cpu_description_names_the_cpu_and_only_known_flags():
    described = cpu_description()
    assert described["cpu"] and described["cores"] == os.cpu_count()
    assert set(described["isa"]) <= set(VECTOR_FLAGS)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), None)
    if flags is not None:  # x86 Linux
        assert described["isa"] == [f for f in VECTOR_FLAGS if f in flags]
