"""Accuracy of trained task models at lengths far beyond training, in constant memory.

Each validation sequence is read by the model's chunked prefill up to its
first scored position, then one recurrent step per remaining token, so an
SSM's memory is its constant state at any length (2^20 tokens included) and
the step path is exercised too. A transformer's KV cache grows with the
length: before each length its cache size and time are predicted (the time
from the previous length, quadratic for attention, linear otherwise), and a
length that would not fit the memory or the time budget is reported as such
instead of being run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mambastep.evidence.cost import state_bytes
from mambastep.evidence.tasks import task as make_task
from mambastep.evidence.tasks.base import IGNORE, Task, TaskBatch
from mambastep.evidence.tasks.layers import layer_name
from mambastep.evidence.tasks.train import MODEL_DIR, correct, read_task_record
from mambastep.families import family_of
from mambastep.files.checkpoints import load
from mambastep.memory import available_memory, peak_rss_bytes, reset_peak_rss, rss_bytes
from mambastep.models import LanguageModel

# Status of a length: measured, or why it was not.
MEASURED, OUT_OF_MEMORY, OUT_OF_TIME = "measured", "out of memory", "over the time budget"


@dataclass(frozen=True)
class EvalSettings:
    """Which lengths, how many sequences per length, and the budgets a length must fit."""

    lengths: tuple[int, ...]
    count: int = 16
    batch_size: int = 16
    memory_budget: int | None = None  # bytes; None: 80% of the memory available at the start
    time_budget_s: float = 600.0  # predicted seconds per length above which a length is skipped
    progress: bool = True

    def __post_init__(self):
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.count < 1 or self.batch_size < 1:
            raise ValueError("count and batch_size must be >= 1")


def parse_lengths(text: str) -> tuple[int, ...]:
    """'64..1048576' (powers of two from..to), '256,4096' or a single length.

    Raises:
        ValueError: anything else, or a range whose ends are not powers of two.
    """
    try:
        if ".." in text:
            low, high = (int(v) for v in text.split(".."))
            if low < 1 or high < low or low & (low - 1) or high & (high - 1):
                raise ValueError
            return tuple(2**k for k in range(int(math.log2(low)), int(math.log2(high)) + 1))
        lengths = tuple(int(v) for v in text.split(","))
        if any(n < 1 for n in lengths):
            raise ValueError
        return lengths
    except ValueError:
        raise ValueError(
            f"lengths {text!r}: expected 'A..B' (powers of two) or a comma-separated list of positive integers"
        ) from None


@torch.no_grad()
def score(model: LanguageModel, batch: TaskBatch) -> tuple[int, int]:
    """(right, scored) for a batch: prefill to the first scored position, then one step per token."""
    scored = (batch.targets != IGNORE).any(0).nonzero()  # positions scored in some row
    first = int(scored[0]) if len(scored) else batch.tokens.shape[1]
    state = model.prefill(batch.tokens[:, :first])[1] if first > 0 else model.new_state(batch.tokens.shape[0])
    right = total = 0
    for t in range(first, batch.tokens.shape[1]):
        logits, state = model.step(batch.tokens[:, t], state)  # (b, vocab)
        r, n = correct(logits, batch.targets[:, t])
        right, total = right + r, total + n
    return right, total


def _predicted_seconds(config, length: int, previous: tuple[int, float] | None) -> float | None:
    if previous is None:
        return None
    n, seconds = previous
    power = 1 if family_of(config).kv_bytes_per_token is None else 2  # attention's work grows with the length
    return seconds * (length / n) ** power


def evaluate_model(model: LanguageModel, task: Task, settings: EvalSettings, name: str) -> list[dict[str, Any]]:
    """One row per length: accuracy, seconds, state bytes and peak RSS added (the batch's own
    tokens and targets, ``input_bytes``, included), or why the length was skipped."""
    available = available_memory()
    budget = settings.memory_budget or (None if available is None else int(0.8 * available))  # None: no limit
    rows, previous = [], None
    for length in settings.lengths:
        row: dict[str, Any] = {"model": name, "length": length}
        cache = state_bytes(model.config, length, settings.batch_size)
        predicted = _predicted_seconds(model.config, length, previous)
        if budget is not None and cache > budget:
            rows.append({**row, "status": OUT_OF_MEMORY, "state_bytes": cache, "memory_budget": budget})
            continue
        if predicted is not None and predicted > settings.time_budget_s:
            rows.append(
                {
                    **row,
                    "status": OUT_OF_TIME,
                    "predicted_s": round(predicted, 1),
                    "time_budget_s": settings.time_budget_s,
                }
            )
            continue
        reset_peak_rss()
        before, started, right, total = rss_bytes(), time.perf_counter(), 0, 0
        for start in tqdm(
            range(0, settings.count, settings.batch_size),
            disable=not settings.progress,
            desc=f"{name} @ {length}",
            leave=False,
        ):
            batch = task.validation_set(length, min(settings.batch_size, settings.count - start), start=start)
            r, n = score(model, batch)
            right, total = right + r, total + n
        seconds = time.perf_counter() - started
        previous = (length, seconds)
        rows.append(
            {
                **row,
                "status": MEASURED,
                "accuracy": right / total,
                "scored": total,
                "seconds": round(seconds, 2),
                "state_bytes": state_bytes(model.config, length, 1),
                "peak_rss_added": peak_rss_bytes() - before,
                "input_bytes": 2 * 8 * length * min(settings.batch_size, settings.count),
            }
        )  # tokens and targets, int64
    return rows


def evaluate(task_name: str, model_dirs: list[Path], settings: EvalSettings) -> dict[str, Any]:
    """Evaluate trained task models (out directories of ``mambastep tasks train``) at every length."""
    report: dict[str, Any] = {
        "task": task_name,
        "lengths": list(settings.lengths),
        "count": settings.count,
        "models": [],
        "rows": [],
    }
    for directory in model_dirs:
        record = read_task_record(directory)
        if record["task"] != task_name:
            raise ValueError(f"{directory} was trained on {record['task']!r}, not {task_name!r}")
        task = make_task(task_name, **record["task_settings"])
        model = load(Path(directory) / MODEL_DIR)
        name = f"{layer_name(model.config)} (trained at {record['train_length']})"
        report["models"].append(
            {
                "name": name,
                "directory": str(directory),
                "layer": record["layer"],
                "train_length": record["train_length"],
                "steps": record["steps"],
            }
        )
        report["rows"] += evaluate_model(model, task, settings, name)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """Accuracy per model (rows) and length (columns); skipped lengths say why."""
    lengths = report["lengths"]
    lines = ["| model | " + " | ".join(_length_label(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for entry in report["models"]:
        cells = []
        for n in lengths:
            row = next(r for r in report["rows"] if r["model"] == entry["name"] and r["length"] == n)
            cells.append(
                f"{100 * row['accuracy']:.1f}"
                if row["status"] == MEASURED
                else ("OOM" if row["status"] == OUT_OF_MEMORY else "too slow")
            )
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _length_label(n: int) -> str:
    return f"2^{int(math.log2(n))}" if n & (n - 1) == 0 else str(n)


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Accuracy against evaluation length (log2 axis), one line per model, the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for i, entry in enumerate(report["models"]):
        points = [
            (r["length"], r["accuracy"])
            for r in report["rows"]
            if r["model"] == entry["name"] and r["status"] == MEASURED
        ]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", color=f"C{i}", label=entry["name"])
        ax.axvline(entry["train_length"], color=f"C{i}", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 102)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['task']}: accuracy by length (dotted: training length)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper")  # beside the axes: inside, it covers lines that stay at 100%
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
