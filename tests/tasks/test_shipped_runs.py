"""The shipped task runs reach the accuracies docs/tasks.md reports, on the same fixed validation sets.

Each case is one figure of docs/tasks.md: Selective Copying over 256 validation sequences of seed 0
(16 answers each, 4,096 in all), Induction Heads over 16 sequences of seed 0 per length (the table of
`mambastep tasks eval`). The validation sets are fixed by a SHA-256 of (task, length, seed, row), so
the shipped weights give these figures to the bit on the machine that wrote the docs; the margins
only absorb argmax flips at near-ties under other kernels or thread counts. A model that lost what it
learnt answers near chance (1/14 = 7.1%): a random model of the same config fails every case.
"""

from __future__ import annotations

import json

import pytest
import torch

import mambastep
from mambastep.evidence.tasks import task as make_task
from mambastep.evidence.tasks.train import correct, shipped_runs

# Selective Copying: 4,096 scored answers; the docs round to 0.1 point. 1 point is 41 answers,
# far more than rounding can flip, and 40 times less than the gap to chance.
MARGIN_4096_ANSWERS = 0.01
# Induction Heads: 16 scored answers (the last position of 16 sequences); one sequence is 6.25 points,
# so the margin allows one sequence to flip and no more.
MARGIN_16_ANSWERS = 1 / 16

# (run, length, sequences, accuracy docs/tasks.md reports, margin)
DOCUMENTED = [
    ("selective_copying-s6", 128, 256, 0.920, MARGIN_4096_ANSWERS),  # "92.0%" at the training length
    ("selective_copying-s6", 512, 256, 0.255, MARGIN_4096_ANSWERS),  # "S6 25.5%" at 4x the training length
    ("selective_copying-s4d", 128, 256, 0.502, MARGIN_4096_ANSWERS),  # "50.2%"
    ("induction_heads-s6", 256, 16, 1.0, MARGIN_16_ANSWERS),  # "100" at 2^8
    ("induction_heads-s6", 4096, 16, 1.0, MARGIN_16_ANSWERS),  # "100" at 2^12
    ("induction_heads-attention", 64, 16, 1.0, MARGIN_16_ANSWERS),  # "100" at 2^6
    ("induction_heads-attention", 256, 16, 0.875, MARGIN_16_ANSWERS),  # "87.5%" at 2^8
]
IDS = [f"{run}-{length}" for run, length, *_ in DOCUMENTED]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: intra-op threads only wait on each other."""


def shipped_run(name: str):
    """(task, model) of the shipped run ``<task>-<layer>``."""
    task_name = name.rsplit("-", 1)[0]
    runs = {run.name: run for run in shipped_runs(task_name)}
    assert name in runs, f"{name} does not ship (shipped: {sorted(runs)})"
    record = json.loads((runs[name] / "task.json").read_text())
    return make_task(task_name, **record["task_settings"]), mambastep.load(runs[name] / "model")


@torch.no_grad()
def accuracy(model, task, length: int, count: int, rows: int = 64) -> float:
    """Share of scored positions answered right over rows 0..count-1 of the validation set (length, seed 0)."""
    batch = task.validation_set(length, count, seed=0)
    right = total = 0
    for start in range(0, count, rows):
        logits, _ = model(batch.tokens[start : start + rows])  # (rows, length, vocab)
        r, n = correct(logits, batch.targets[start : start + rows])
        right, total = right + r, total + n
    return right / total


def check_documented_accuracy(model, task, length: int, count: int, documented: float, margin: float) -> None:
    measured = accuracy(model, task, length, count)
    assert abs(measured - documented) <= margin, (
        f"accuracy {measured:.4f} at length {length} over {count} sequences; "
        f"docs/tasks.md reports {documented} (margin {margin:.4f})"
    )


def test_every_documented_run_ships():
    assert {run.name for name in ("selective_copying", "induction_heads") for run in shipped_runs(name)} == {
        "selective_copying-s6",
        "selective_copying-s4d",
        "induction_heads-s6",
        "induction_heads-attention",
    }


@pytest.mark.parametrize("name, length, count, documented, margin", DOCUMENTED, ids=IDS)
def test_shipped_run_reaches_the_documented_accuracy(name, length, count, documented, margin):
    task, model = shipped_run(name)
    check_documented_accuracy(model, task, length, count, documented, margin)


@pytest.mark.parametrize("name, length, count, documented, margin", DOCUMENTED, ids=IDS)
def test_a_random_model_of_the_same_config_fails_the_check(name, length, count, documented, margin, tmp_path):
    task, shipped = shipped_run(name)
    torch.manual_seed(0)
    random = mambastep.load(
        mambastep.save(type(shipped)(shipped.config), tmp_path / "random")
    )  # loaded as the shipped one
    with pytest.raises(AssertionError, match="docs/tasks.md reports"):
        check_documented_accuracy(random, task, length, count, documented, margin)
