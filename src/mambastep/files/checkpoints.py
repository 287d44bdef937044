"""Checkpoints: find them, read them, check them against their config.

Formats:
- Hugging Face (``transformers``' ``save_pretrained``): config.json with
  ``model_type`` "mamba", "mamba2" or "gpt_neox", and model.safetensors or a
  sharded model.safetensors.index.json.
- The original state-spaces one: config.json with ``d_model``, ``n_layer``,
  ``ssm_cfg``..., and pytorch_model.bin (read with ``weights_only=True``).

Every tensor of the model must be found once, with the right shape, and no
tensor may be left over: a partial load is an error, never a warning. The one
exception is a buffer the model derives itself (GPT-NeoX's causal mask and
rotary frequencies, in older checkpoints), which is dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from torch import Tensor

from mambastep.families import config_from_dict, config_to_dict, family_of
from mambastep.families.presets import BUILTIN_CONFIGS, random_model
from mambastep.files.formats import read_safetensors, write_atomically, write_safetensors
from mambastep.models.config import ConfigError, ModelConfig
from mambastep.models.int8 import Int8Linear, quantize_int8
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings

log = logging.getLogger(__name__)

CHECKPOINT_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
]
# The original format names the embedding "embedding"; transformers names it "embeddings".
_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


QUANTIZATIONS = (None, "int8")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to its config."""


def _check_quantize(quantize: str | None) -> None:
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")


def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub id fetched with huggingface_hub.

    Raises:
        CheckpointError: a path that is not a directory, or a hub id that cannot be fetched.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint directory at {text}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"{text} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}). Without network access, download the checkpoint elsewhere "
            "and pass its local directory."
        ) from err


def read_config(directory: Path) -> ModelConfig:
    """Parse ``directory/config.json``."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    try:
        return config_from_dict(raw, str(path))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path, CheckpointError, kind="safetensors")[0]


def read_weights(directory: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of the checkpoint, and a description of the files read."""
    single, index, pickled = (
        directory / name for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    )
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing")
            for name, t in _read_safetensors(shard_path).items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{shard_path}: tensor {name} is not listed for this shard in {index.name}")
                tensors[name] = t
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")
        return tensors, str(index)
    if pickled.is_file():
        try:
            state_dict = torch.load(pickled, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{pickled}: corrupt, truncated or unsafe PyTorch file ({err})") from None
        if not isinstance(state_dict, dict) or not all(isinstance(t, Tensor) for t in state_dict.values()):
            raise CheckpointError(f"{pickled}: expected a dict of tensors (a state dict)")
        return state_dict, str(pickled)
    raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _match(model: LanguageModel, tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename, drop derived buffers, then check names and shapes against the model's parameters."""
    tensors = {_RENAMES.get(name, name): t for name, t in tensors.items() if not name.endswith(model.derived_buffers)}
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        del expected[model.head_weight]
        head = tensors.pop(model.head_weight, None)
        embedding = tensors.get(model.embedding_weight)
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise CheckpointError(
                f"{source}: the config ties the embeddings, but {model.head_weight} differs from the embedding"
            )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "(the config does not describe these weights)"
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {got.dtype}, expected floating point")
    return tensors


def load(
    path_or_id: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    settings: EngineSettings | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """Load a Mamba, Mamba-2 or GPT-NeoX checkpoint (a local directory or a Hugging Face Hub id).

    Args:
        path_or_id: checkpoint directory, or "owner/name" on the hub.
        dtype: weight dtype; None keeps the checkpoint's (of its embedding).
        device: where the model lives.
        settings: how it runs (kernels, decode backend, threads); None takes the defaults.
        quantize: "int8" for int8 weight-only linear layers (float32 weights, CPU), or None.

    Raises:
        CheckpointError: the message names the file and the key or tensor at fault.
    """
    _check_quantize(quantize)
    directory = resolve(path_or_id)
    config = read_config(directory)
    tensors, source = read_weights(directory)
    with torch.device("meta"):
        model = family_of(config).model(config)
    tensors = _match(model, tensors, source)
    if config.tie_embeddings:
        tensors[model.head_weight] = tensors[model.embedding_weight]
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors  # the model holds them now: a copy made below frees them
    if config.tie_embeddings:
        model.tie_embeddings()
    dtype = dtype or model.dtype
    model = model.to(device=device, dtype=dtype).eval()
    if quantize == "int8":
        quantize_int8(model)
    log.info("loaded %s (%s, %s%s) from %s", config.family, dtype, device, f", {quantize}" if quantize else "", source)
    return model.configure(settings or EngineSettings())


def save(model: LanguageModel, directory: str | Path, extra_config: dict | None = None) -> Path:
    """Write ``model`` in the Hugging Face format (config.json + model.safetensors).

    ``transformers`` reads the result too. ``extra_config`` adds bookkeeping keys
    (such as ``{"tokenizer": "bytes"}``) that ``load`` knows to ignore.
    """
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("cannot save an int8-quantized model: save the float model and quantize at load time")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config_to_dict(model.config), **(extra_config or {})}
    config_from_dict(config, "extra_config")  # refuse keys that load would refuse
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del tensors[model.head_weight]
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"}, private=False)
    write_atomically(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode(), private=False)
    return directory


def builtin_name(name_or_path: str | Path) -> str | None:
    """The built-in configuration (``families.presets``) that ``name_or_path`` names, or None
    for a checkpoint. A local directory of a built-in name is a checkpoint: it wins."""
    text = str(name_or_path)
    if text in BUILTIN_CONFIGS and not Path(text).expanduser().is_dir():
        return text
    return None


def resolve_config(name_or_path: str | Path) -> ModelConfig:
    """The configuration of a built-in name (``builtin_name``), else the config.json of a
    checkpoint (directory or hub id).

    Raises:
        CheckpointError: neither; the message lists the built-in names.
    """
    name = builtin_name(name_or_path)
    return BUILTIN_CONFIGS[name] if name else read_config(_checkpoint(name_or_path))


def model_for(
    name_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    settings: EngineSettings | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """The model ``name_or_path`` names: a checkpoint (a local directory or a hub id), loaded as
    ``load`` does; or a built-in configuration (``builtin_name``) with random weights (float32
    unless ``dtype`` says otherwise), for what depends on the shape only.

    Raises:
        CheckpointError: neither; the message lists the built-in names.
    """
    name = builtin_name(name_or_path)
    if name is None:
        return load(_checkpoint(name_or_path), dtype=dtype, device=device, settings=settings, quantize=quantize)
    _check_quantize(quantize)
    model = random_model(name, dtype or torch.float32, device, settings=settings)
    return quantize_int8(model) if quantize == "int8" else model


def _checkpoint(path_or_id: str | Path) -> Path:
    try:
        return resolve(path_or_id)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; nor is it a built-in configuration ({', '.join(BUILTIN_CONFIGS)})") from None
