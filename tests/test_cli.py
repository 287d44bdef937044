"""The command line end to end: output, JSON, and one-line errors with a non-zero status."""

import argparse
import json
import subprocess
import sys

import pytest

from mambastep.cli import main
from mambastep.cli.common import DEFAULT_MODEL, add_sampling_args, flag_names, in_flags
from mambastep.evidence import cost
from mambastep.families import parameter_count
from mambastep.families.presets import BUILTIN_CONFIGS
from mambastep.files.checkpoints import model_for, resolve_config

from conftest import make_hf_checkpoint

TASK_MODEL = DEFAULT_MODEL.parent / "tasks" / "selective_copying-s6" / "model"


def run(*args):
    return subprocess.run([sys.executable, "-m", "mambastep.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_on_the_bundled_model():
    result = run("generate", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1


def test_generate_json_is_deterministic_with_a_seed(capsys):
    args = ["generate", "--prompt", "hello", "--max-new-tokens", "12", "--seed", "3", "--json"]
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["completion"] == outputs[1]["completion"]
    assert outputs[0]["params"]["max_new_tokens"] == 12 and outputs[0]["prompt"] == "hello"


def test_greedy_generate_with_a_transformers_checkpoint_and_byte_tokenizer(tmp_path, capsys):
    path = make_hf_checkpoint(tmp_path / "m", vocab_size=256)
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
                "5",
                "--ignore-eos",
                "--json",
            ]
        )
        == 0
    )
    assert "completion" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_info_reports_sizes(tmp_path, capsys, family):
    path = make_hf_checkpoint(tmp_path / family, family=family)
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family
    assert info["parameters"] > 0 and info["weight_bytes"] == 4 * info["parameters"]
    assert info["state_bytes_per_sequence"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "/nonexistent/dir"], "no checkpoint directory at /nonexistent/dir"),
        (["generate", "--prompt", "", "--max-new-tokens", "3"], "empty prompt"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "x", "--top-p", "0"], "error: --top-p must be a finite number > 0"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be an integer >= 1"),
        (["info", "--threads", "0"], "error: --threads must be a positive integer"),
        (["bench", "--decode-steps", "0"], "error: --decode-steps must be >= 1, got 0"),
        (["generate", "--model", str(TASK_MODEL), "--prompt", "x"], "vocabulary of 16 tokens is too small for a text"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, message):
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_errors_name_flags_only_where_a_field_is_meant():
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    flags = flag_names(parser)
    assert flags["max_new_tokens"] == "--max-new-tokens" and flags["top_k"] == "--top-k"
    assert in_flags("top_k must be >= 0; max_new_tokens too", flags) == "--top-k must be >= 0; --max-new-tokens too"
    untouched = "no file at /tmp/max_new_tokens.json, got 'top_k'; the prompt must not be empty"
    assert in_flags(untouched, flags) == untouched


def test_corrupt_checkpoint_through_the_cli(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    result = run("info", "--model", str(path))
    assert result.returncode == 1 and "corrupt or truncated" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["mamba-130m", "mamba2-130m", "pythia-160m"])
def test_info_of_a_builtin_configuration(capsys, name):
    config = BUILTIN_CONFIGS[name]
    assert main(["info", "--model", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["random_weights"] is True and info["family"] == config.family
    assert info["parameters"] == parameter_count(config) and info["weight_bytes"] == 4 * info["parameters"]
    assert info["state_bytes_per_sequence"] == cost.state_bytes(config, 0)
    assert info["state_bytes_per_token"] == cost.state_bytes(config, 1) - cost.state_bytes(config, 0)
    assert (info["state_bytes_per_token"] > 0) == (config.family == "gpt_neox")
    assert main(["info", "--model", name]) == 0
    assert capsys.readouterr().out.startswith(f"{name}: a built-in configuration, the published shape with random")


def test_info_of_a_builtin_configuration_in_int8(capsys):
    sizes = []
    for quantize in ([], ["--quantize", "int8"]):
        assert main(["info", "--model", "mamba-130m", *quantize, "--json"]) == 0
        sizes.append(json.loads(capsys.readouterr().out)["weight_bytes"])
    assert sizes[1] < sizes[0]


def test_a_local_directory_wins_over_a_builtin_name(tmp_path, monkeypatch, capsys):
    make_hf_checkpoint(tmp_path / "mamba-130m")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--model", "mamba-130m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["random_weights"] is False and info["config"]["d_model"] == 16
    assert resolve_config("mamba-130m").d_model == 16 and model_for("mamba-130m").config.d_model == 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "mamba-9b"], "nor is it a built-in configuration (mamba-130m, "),
        (["generate", "--model", "mamba-130m", "--prompt", "x"], "mamba-130m is a built-in configuration with random"),
        (["serve", "--model", "pythia-160m", "--port", "0"], "pythia-160m is a built-in configuration with random"),
    ],
)
def test_builtin_names_where_they_do_not_fit(args, message):
    result = run(*args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_generate_lists_no_builtin_names_it_would_refuse():
    result = run("generate", "--model", "mamba-9b", "--prompt", "x")
    assert result.returncode == 1 and result.stderr == "mambastep: error: no checkpoint directory at mamba-9b\n"
