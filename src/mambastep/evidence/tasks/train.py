"""Train a small model on a synthetic task: fresh data every step, accuracy on a fixed validation set.

The loop is the one of ``mambastep train`` in miniature (its AdamW groups,
warm-up + cosine schedule, gradient clipping and model writer), with a loss
on the scored positions only. It writes out/model (loadable with
``mambastep.load``), out/task.json (what was trained, how, and the result) and
out/curve.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mambastep.evidence.tasks import task as make_task
from mambastep.evidence.tasks.base import IGNORE, Task, TaskBatch
from mambastep.evidence.tasks.layers import LAYERS, layer_config
from mambastep.families import family_of
from mambastep.files.checkpoints import load, save
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings
from mambastep.training.init import init_for_training
from mambastep.training.optim import build_optimizer, build_scheduler
from mambastep.training.settings import OptimSettings

TASK_FILE = "task.json"
MODEL_DIR = "model"
CURVE_FILE = "curve.png"
SHIPPED_RUNS = Path(__file__).resolve().parents[2] / "assets" / "tasks"  # <task>-<layer>/, as train_task writes


@dataclass(frozen=True)
class TaskTrainSettings:
    """What to train and how. ``task_settings`` configure the task (``train_length``, ``n_memorize``...)."""

    task: str
    layer: str
    out: str
    task_settings: dict[str, int] = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 16
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-3, weight_decay=0.0))
    d_model: int = 64
    n_layer: int = 2
    seed: int = 0
    eval_every: int = 100
    eval_count: int = 256
    stop_at: float | None = None  # stop once validation accuracy reaches this
    init: str | None = None  # a run directory to continue from (its weights; a fresh optimiser and schedule)
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"unknown layer {self.layer!r}; choose one of {', '.join(LAYERS)}")
        for name in ("steps", "batch_size", "eval_every", "eval_count", "d_model", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise ValueError(f"stop_at must lie in (0, 1], got {self.stop_at}")


def scored_loss(logits: Tensor, batch: TaskBatch) -> Tensor:
    """Cross-entropy over the scored positions: logits (b, l, vocab), targets (b, l) with IGNORE elsewhere."""
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE)


def correct(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(right, scored) over the positions whose target is not IGNORE; logits (..., vocab), targets (...)."""
    scored = targets != IGNORE
    right = (logits.argmax(-1) == targets) & scored
    return int(right.sum()), int(scored.sum())


@torch.no_grad()
def validation_accuracy(model: LanguageModel, batch: TaskBatch, rows: int = 64) -> float:
    """Share of scored positions predicted right, one forward pass per ``rows`` sequences."""
    right = total = 0
    for start in range(0, batch.tokens.shape[0], rows):
        logits, _ = model(batch.tokens[start : start + rows])  # (rows, l, vocab)
        r, t = correct(logits, batch.targets[start : start + rows])
        right, total = right + r, total + t
    return right / total


def train_task(settings: TaskTrainSettings) -> dict[str, Any]:
    """Train ``settings.layer`` on ``settings.task``; returns what out/task.json holds.

    Raises:
        ValueError: bad settings, or an out directory that already holds a trained model.
    """
    s = settings
    task: Task = make_task(s.task, **s.task_settings)
    length = task.train_length
    out = Path(s.out).expanduser()
    if (out / TASK_FILE).exists():
        raise ValueError(f"{out} already holds a trained task model ({out / TASK_FILE}); choose another --out")
    validation = task.validation_set(length, s.eval_count)  # checks the length before anything is built
    torch.manual_seed(s.seed)
    if s.init is None:
        config = layer_config(s.layer, task.vocab_size, s.d_model, s.n_layer)
        model = family_of(config).model(config)
        init_for_training(model)
        steps_before = 0
    else:
        model, steps_before = _continued_model(Path(s.init).expanduser(), s, task)
    model.configure(EngineSettings(threads=s.threads)).train()  # the fused CPU scan, forward and backward
    optim = replace(s.optim, warmup_steps=min(s.optim.warmup_steps, s.steps))
    optimizer, data = build_optimizer(model, optim), torch.Generator().manual_seed(s.seed)
    scheduler = build_scheduler(optimizer, optim, s.steps)
    curve: list[dict[str, float]] = []
    started, losses, step = time.perf_counter(), [], 0
    bar = tqdm(total=s.steps, unit="step", disable=not s.progress, dynamic_ncols=True, desc=f"{s.task} {s.layer}")
    accuracy = 0.0
    while step < s.steps:
        batch = task.sample(s.batch_size, length, data)
        logits, _ = model(batch.tokens)  # (b, l, vocab)
        loss = scored_loss(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % s.eval_every == 0 or step == s.steps:
            accuracy = validation_accuracy(model.eval(), validation)
            model.train()
            curve.append(
                {
                    "step": steps_before + step,
                    "loss": sum(losses) / len(losses),
                    "accuracy": accuracy,
                    "elapsed_s": time.perf_counter() - started,
                }
            )
            losses = []
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", accuracy=f"{accuracy:.3f}")
            if s.stop_at is not None and accuracy >= s.stop_at:
                break
    bar.close()
    record = {
        "task": s.task,
        "task_settings": task.settings(),
        "layer": s.layer,
        "train_length": length,
        "steps": steps_before + step,
        "tokens_seen": (steps_before + step) * s.batch_size * length,
        "wall_s": round(time.perf_counter() - started, 1),
        "validation_accuracy": accuracy,
        "validation_count": s.eval_count,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(s),
        "curve": curve,
    }
    save(model.eval(), out / MODEL_DIR)
    (out / TASK_FILE).write_text(json.dumps(record, indent=1) + "\n")
    plot_curve(record, out / CURVE_FILE)
    return record


def _continued_model(run: Path, s: TaskTrainSettings, task: Task) -> tuple[LanguageModel, int]:
    """The weights of a previous run of the same task, layer and length, and its step count.

    Raises:
        ValueError: the run was trained on another task, layer or task setting.
    """
    record = read_task_record(run)
    theirs = (record["task"], record["layer"], record["task_settings"])
    ours = (s.task, s.layer, task.settings())
    if theirs != ours:
        raise ValueError(f"cannot continue {run}: it trained {theirs}, these settings ask for {ours}")
    return load(run / MODEL_DIR, dtype=torch.float32), record["steps"]


def read_task_record(directory: Path) -> dict[str, Any]:
    """out/task.json of a trained task model.

    Raises:
        FileNotFoundError: ``directory`` holds no task.json.
    """
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a trained task model: no {TASK_FILE}")
    return json.loads(path.read_text())


def shipped_runs(task_name: str) -> list[Path]:
    """The trained runs that ship with mambastep for ``task_name``, in the order of ``LAYERS``."""
    return [
        SHIPPED_RUNS / f"{task_name}-{layer}"
        for layer in LAYERS
        if (SHIPPED_RUNS / f"{task_name}-{layer}" / TASK_FILE).is_file()
    ]


def run_model(task_name: str, run_or_model: str | Path | None) -> Path:
    """The model directory that shows ``task_name``: the shipped S6 run's model where
    ``run_or_model`` is None, the model of a run of ``train_task``, or a model directory itself.

    Raises:
        FileNotFoundError: no run of ``task_name`` ships with mambastep (and none was given).
    """
    if run_or_model is None:
        runs = shipped_runs(task_name)
        if not runs:
            raise FileNotFoundError(f"no trained model of {task_name!r} ships with mambastep: pass --model")
        return runs[0] / MODEL_DIR
    run = Path(run_or_model)
    return run / MODEL_DIR if (run / TASK_FILE).is_file() else run


def validation_sequence(model_dir: Path, task_name: str, length: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A validation sequence of ``task_name`` for the model of a run in ``model_dir`` (the
    task's settings from the run's task.json): its tokens (l,) and its key positions (l,) bool;
    ``length`` None: the run's training length.

    Raises:
        FileNotFoundError: ``model_dir`` is not the model of a task run.
        ValueError: the run trained another task.
    """
    record = read_task_record(Path(model_dir).parent)
    if record["task"] != task_name:
        raise ValueError(f"{model_dir} was trained on {record['task']!r}, not {task_name!r}")
    task = make_task(task_name, **record["task_settings"])
    tokens = task.validation_set(length or task.train_length, 1, seed=seed).tokens[0]  # (l,)
    return tokens, task.key_positions(tokens)


def plot_curve(record: dict[str, Any], path: Path) -> Path:
    """curve.png: training loss and validation accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in record["curve"]]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(steps, [e["loss"] for e in record["curve"]], color="C0", label="training loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (scored positions)", color="C0")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(steps, [e["accuracy"] for e in record["curve"]], "o-", color="C1", ms=3, label="validation accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("validation accuracy", color="C1")
    loss_ax.set_title(f"{record['task']}, {record['layer']}, length {record['train_length']}")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
