"""The scheduler's queue, without a model: tasks that never decode."""

from __future__ import annotations

import threading
import time

import pytest

from mambastep.serve.scheduler import Busy, Scheduler


def test_a_running_task_holds_its_place_in_the_queue():
    """A task is out of the scheduler's list of jobs while one of its units runs (here a
    unit of 5 ms); a submit meanwhile must still count it."""
    release = threading.Event()

    def spin():
        while not release.is_set():
            time.sleep(0.005)  # a unit of work
            yield

    def quick():
        return "done"
        yield

    scheduler = Scheduler(model=None, max_batch=1, queue_limit=1)
    scheduler.start()
    try:
        running = scheduler.submit(spin)
        for _ in range(200):
            with pytest.raises(Busy):
                scheduler.submit(quick)
            time.sleep(0.001)
        assert scheduler.depth == 1
        release.set()
        running.result(timeout=30)
        assert scheduler.submit(quick).result(timeout=30) == "done" and scheduler.depth == 0
    finally:
        release.set()
        scheduler.close()
