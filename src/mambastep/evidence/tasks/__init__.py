"""Synthetic tasks of the Mamba paper (arXiv 2312.00752, section 3.1 / 4.1.1, appendix E.1).

This package holds the data generators of the paper's two synthetic tasks,
behind one interface (a `Task` makes `TaskBatch` objects; see `mambastep.evidence.tasks.base`):

    selective_copying  `SelectiveCopying`: recall data tokens scattered among noise, in order
    induction_heads    `InductionHeads`: after a trigger, recall the token that followed its first occurrence

    task = mambastep.evidence.tasks.task("induction_heads")
    batch = task.sample(8, task.train_length, torch.Generator().manual_seed(0))  # fresh training data
    val = task.validation_set(length=2**10, count=16, seed=0)                    # fixed evaluation data
    # batch.tokens (b, l) int64 in; batch.targets (b, l) int64, IGNORE (-100) where not scored

Each task's module docstring documents its exact layout (token ids, scored
positions) and where it departs from, or chooses among, the paper and its
reference code. Other modules of this package (training, evaluation) build
on this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mambastep.evidence.tasks.base import IGNORE, Task, TaskBatch
from mambastep.evidence.tasks.induction_heads import InductionHeads
from mambastep.evidence.tasks.selective_copying import SelectiveCopying

TASKS: dict[str, Callable[..., Task]] = {
    SelectiveCopying.name: SelectiveCopying,
    InductionHeads.name: InductionHeads,
}
"""Task name -> constructor (the class; its keyword arguments configure the task)."""


def task(name: str, **kwargs: Any) -> Task:
    """The task registered as ``name``, built with ``kwargs`` (e.g. ``vocab_size=16``).

    Raises ValueError naming the known tasks if ``name`` is unknown.
    """
    try:
        factory = TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return factory(**kwargs)


__all__ = ["IGNORE", "TASKS", "InductionHeads", "SelectiveCopying", "Task", "TaskBatch", "task"]
