"""What a run writes to disk: the model (for every command), and the training state (for resume).

out/model/            config.json + model.safetensors (+ tokenizer.json): ``mambastep.load`` reads it
out/train_state.pt    weights, optimiser, schedule, step, RNG: exact resume

Both are replaced atomically (a temporary sibling, then a rename), so a run
killed while writing leaves the previous checkpoint whole. The training state
holds its own copy of the weights, so it never disagrees with itself. It holds
only tensors and plain containers, and is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mambastep.files.checkpoints import save
from mambastep.files.formats import write_atomically
from mambastep.files.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from mambastep.models import LanguageModel
from mambastep.training.settings import TrainingError

TRAIN_STATE_FORMAT = "mambastep-train-state"
TRAIN_STATE_VERSION = 1


def write_model(model: LanguageModel, tokenizer: Tokenizer, directory: Path) -> None:
    """Save ``model`` and its tokenizer where ``mambastep.load`` and ``load_tokenizer`` find them,
    replacing what was there."""
    tmp = directory.with_name(f".{directory.name}.tmp")  # only the main process writes here
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing
    tmp.mkdir()
    try:
        extra = {"tokenizer": "bytes"} if isinstance(tokenizer, ByteTokenizer) else None
        save(model, tmp, extra_config=extra)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_train_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save``, all of it or nothing (``write_atomically``), with the usual file mode."""
    state = {"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, **state}
    write_atomically(path, lambda tmp: torch.save(state, tmp), private=False)


def read_train_state(path: Path) -> dict[str, Any]:
    """The training state written by ``write_train_state``.

    Raises:
        TrainingError: no file, an unreadable one, or one of another format or version.
    """
    if not path.is_file():
        raise TrainingError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise TrainingError(f"{path}: not a readable training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise TrainingError(f"{path}: not a mambastep training state")
    if state.get("version") != TRAIN_STATE_VERSION:
        raise TrainingError(
            f"{path}: training state version {state.get('version')}, this mambastep reads {TRAIN_STATE_VERSION}"
        )
    return state
