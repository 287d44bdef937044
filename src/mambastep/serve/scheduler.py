"""The one thread that runs the model: every request's work, interleaved.

Work comes as tasks: generator functions that run on this thread and yield after each unit
(the number of prompt tokens a unit read, or None), and may hand sequences to decode
(``Row``s) and yield them to wait for them. Each turn of the loop advances the tasks a unit
each until they have read ``prefill_budget`` tokens, then runs one decode step for every row
at once: the rows of all requests decode together in one batched ``model.step``, join
between steps and leave as they finish. A long prompt therefore delays the others by about
one piece, while many short ones start together.

A row decodes as ``mambastep.generate`` does: the same sampler, the same generator per
sequence, the same stopping. No row's values enter another's, but the batched products add up
in an order that depends on the batch's size, so a row's logits beside others may differ from
its logits alone in the last bits (greedy tokens differ only where two logits nearly tie).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from mambastep.files.tokenizer import TextStream, Tokenizer
from mambastep.models.lm import LanguageModel
from mambastep.models.state import ModelState
from mambastep.runtime.generation import SkipHealed, StopFilter
from mambastep.runtime.sampling import SamplingParams, generator, sample

log = logging.getLogger(__name__)

Task = Callable[[], Generator["int | list[Row] | None", None, object]]


class Busy(RuntimeError):
    """More requests are waiting for the model than the queue holds."""


class ShuttingDown(RuntimeError):
    """The server is stopping: the request was cancelled."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a row: the text it releases (possibly ""), its log-probability
    and the most likely alternatives (when asked for), and, on the row's last event, why it
    finished ("stop": eos or a stop string; "length": max tokens; "cancelled")."""

    token: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Row:
    """One sequence to decode: its next-token logits and state, how to sample and stop, and
    ``emit``, called (on the scheduler's thread) with each ``TokenEvent``.

    Args:
        logits: (1, vocab) float32 next-token logits; state: the state of one sequence after them.
        params: sampling and stopping (``max_new_tokens``, ``stop``, ``eos_token_id``...).
        seed: the row's generator seed (None: fresh).
        history: tokens already read, for the repetition penalty.
        logprobs: how many alternatives to report per token (None: no log-probabilities).
        cancelled: set (from any thread) to end the row at its next step, as "cancelled";
            the rows of one request share it.
        healed: text that the prompt holds and the first token begins with (``heal_prompt``);
            the row's text leaves it out.
    """

    def __init__(
        self,
        logits: Tensor,
        state: ModelState,
        params: SamplingParams,
        tokenizer: Tokenizer,
        emit: Callable[[TokenEvent], None],
        seed: int | None = None,
        history: list[int] | tuple[int, ...] = (),
        logprobs: int | None = None,
        cancelled: threading.Event | None = None,
        healed: str = "",
    ):
        self.logits, self.state, self.params, self.emit = logits, state, params, emit
        self._cancelled = cancelled or threading.Event()
        self.logprobs = logprobs
        self.generator = generator(seed)
        self.seen = set(history) if params.repetition_penalty != 1.0 else set()
        self.eos = None if params.ignore_eos else params.eos_token_id
        self.stream, self.stop, self.unsaid = TextStream(tokenizer), StopFilter(params.stop), SkipHealed(healed)
        self.tokens: list[int] = []  # every token drawn: eos and the tokens of a stop string too
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop at the next step (from any thread); the row ends as "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def take(self, token: int, logits: Tensor) -> None:
        """Take ``token``, drawn from ``logits`` (1, vocab) with this row's generator: emit it,
        and finish where it ends the row."""
        self.tokens.append(token)
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)
        logprob, top = self._logprobs(logits, token) if self.logprobs is not None else (None, None)
        if token == self.eos:
            self.emit(TokenEvent(token, "", logprob, top))
            self._finish("stop")
            return
        text = self.stop.push(self.unsaid(self.stream.push(token)))
        self.emit(TokenEvent(token, text, logprob, top))
        if self.stop.stopped:
            self._finish("stop")
        elif len(self.tokens) == self.params.max_new_tokens:
            self._finish("length")

    def _logprobs(self, logits: Tensor, token: int) -> tuple[float, list[tuple[int, float]]]:
        lp = torch.log_softmax(logits[0].float(), -1)  # (vocab,): the model's own distribution
        top = lp.topk(self.logprobs) if self.logprobs else None
        alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        return float(lp[token]), alternatives

    def abort(self, reason: str) -> None:
        """End the row now (on the scheduler's thread), as ``reason``."""
        if not self.done:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        tail = "" if self.stop.stopped else self.stop.push(self.unsaid(self.stream.flush())) + self.stop.flush()
        self.finish_reason = reason
        self.emit(TokenEvent(None, tail, finish_reason=reason))


class _Job:
    def __init__(self, task: Task, future: Future):
        self.steps, self.future = task(), future
        self.waiting: list[Row] = []


class Scheduler:
    """Owns the model: runs tasks one unit at a time and decodes every row in one batch.

    Args:
        model: the language model (nothing else may run it while the scheduler does).
        max_batch: rows decoded in one step; more wait to join.
        prefill_budget: tokens the tasks may read between two decode steps (a task yields the
            tokens each unit read); a unit that reads more still runs whole.
        queue_limit: tasks submitted and not yet finished; ``submit`` beyond it raises ``Busy``.
        on_step: called after each decode step with the batch size and its seconds.
    """

    def __init__(
        self,
        model: LanguageModel,
        max_batch: int,
        queue_limit: int,
        prefill_budget: int = 512,
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.model, self.max_batch, self.queue_limit, self.on_step = model, max_batch, queue_limit, on_step
        self.prefill_budget = prefill_budget
        self._inbox: queue.Queue[_Job] = queue.Queue()
        self._unfinished = 0  # tasks submitted whose futures are not set yet (counted under _count_lock)
        self._count_lock = threading.Lock()
        self._jobs: deque[_Job] = deque()
        self._rows: list[Row] = []  # decoding, in batch order
        self._joining: deque[Row] = deque()  # waiting for room in the batch
        self._logits: Tensor | None = None  # (b, vocab) the rows' next-token logits
        self._state: ModelState | None = None  # the rows' states, batch of b
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mambastep-scheduler", daemon=True)

    @property
    def depth(self) -> int:
        """Tasks waiting or running, and rows waiting for room in the batch."""
        return self._unfinished + len(self._joining)

    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Task) -> Future:
        """Run ``task`` (a generator function) on the scheduler's thread; the future holds
        what it returns, or what it raised.

        Raises:
            Busy: the queue is full.
            ShuttingDown: the scheduler is stopping.
        """
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        with self._count_lock:
            if self._unfinished >= self.queue_limit:
                raise Busy(f"{self.queue_limit} requests are already waiting for the model")
            self._unfinished += 1
        future: Future = Future()
        future.add_done_callback(self._finished)
        self._inbox.put(_Job(task, future))
        return future

    def _finished(self, _: Future) -> None:
        with self._count_lock:
            self._unfinished -= 1

    def admit(self, row: Row) -> None:
        """Add a row to decode (from a task, on the scheduler's thread)."""
        self._joining.append(row)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every row and task still running, then stop the thread."""
        self._stopping = True
        for row in [*self._rows, *self._joining]:
            row.cancel()
        self._inbox.put(None)  # wakes the thread if it waits for work
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                busy = bool(self._jobs or self._rows or self._joining)
                if self._stopping and not busy and self._inbox.empty():
                    return
                self._take(block=not busy and not self._stopping)
                self._advance_jobs()
                self._join_rows()
                if self._rows:
                    self._decode_step()

    def _take(self, block: bool) -> None:
        """Move the tasks waiting in the inbox to the jobs (waiting for one if ``block``). A task
        whose future was cancelled while it waited is dropped; a running one's cannot be."""
        try:
            while True:
                job = self._inbox.get(block=block)
                block = False
                if job is not None and job.future.set_running_or_notify_cancel():
                    self._jobs.append(job)
        except queue.Empty:
            return

    def _advance_jobs(self) -> None:
        """Run one unit of each job that is not waiting for its rows, in turn, until the units
        have read ``prefill_budget`` tokens: a long prompt takes one piece, many short ones
        go together, and then the rows decode."""
        budget = self.prefill_budget
        for _ in range(len(self._jobs)):
            job = self._jobs.popleft()
            if budget <= 0 or any(not row.done for row in job.waiting):
                self._jobs.append(job)
                continue
            try:
                if self._stopping:
                    job.steps.close()
                    raise ShuttingDown("the server shut down before the request finished")
                waited = next(job.steps)
            except StopIteration as done:
                job.future.set_result(done.value)
            except BaseException as err:  # the request's own failure: its future carries it
                for row in job.waiting:
                    row.cancel()
                job.future.set_exception(err)
            else:
                if isinstance(waited, int):  # tokens read: the unit's share of the budget
                    budget -= waited
                    job.waiting = []
                else:
                    job.waiting = list(waited or [])
                self._jobs.append(job)
            budget -= 1  # every unit costs something, even one that reads nothing

    def _join_rows(self) -> None:
        joining = []
        while self._joining and len(self._rows) + len(joining) < self.max_batch:
            joining.append(self._joining.popleft())
        if not joining:
            return
        states = ([self._state] if self._state is not None else []) + [row.state for row in joining]
        logits = ([self._logits] if self._logits is not None else []) + [row.logits for row in joining]
        self._state, self._logits = ModelState.cat(states), torch.cat(logits)
        self._rows += joining
        for row in joining:
            row.state = row.logits = None  # the batch holds them now

    def _draw(self) -> list[int | None]:
        """The next token of every row (None for a cancelled one), each drawn as
        ``mambastep.generate`` draws it: rows that share their parameters in one call of the
        sampler, which treats every row on its own (its generator, its history)."""
        tokens: list[int | None] = [None] * len(self._rows)
        groups: dict[SamplingParams, list[int]] = {}
        for i, row in enumerate(self._rows):
            if row.cancelled:
                row.abort("cancelled")
            else:
                groups.setdefault(row.params, []).append(i)
        for params, rows in groups.items():
            drawn = sample(
                self._logits[rows], params, [self._rows[i].generator for i in rows], [self._rows[i].seen for i in rows]
            )
            for i, token in zip(rows, drawn.tolist()):
                tokens[i] = token
                self._rows[i].take(token, self._logits[i : i + 1])
        return tokens

    def _decode_step(self) -> None:
        start = time.perf_counter()
        try:
            tokens = self._draw()
            keep = [i for i, row in enumerate(self._rows) if not row.done]
            if len(keep) < len(self._rows):
                self._rows = [self._rows[i] for i in keep]
                self._state = self._state.select(keep) if keep else None
                self._logits = self._logits[keep] if keep else None
            if keep:
                step = torch.tensor([tokens[i] for i in keep], device=self.model.device)
                self._logits, self._state = self.model.step(step, self._state)
        except Exception:  # the model failed: every row in the batch ends with an error
            log.exception("a decode step failed")
            for row in self._rows:
                row.abort("error")
            self._rows, self._state, self._logits = [], None, None
            return
        if self.on_step is not None:
            self.on_step(len(keep), time.perf_counter() - start)


def pieces(start: int, end: int, piece: int, align: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most ``piece`` tokens that end on multiples of
    ``align`` where a piece can (``piece`` >= ``align``), the last one at ``end``."""
    cuts = []
    while start < end:
        stop = min(end, start + piece)
        if stop < end and stop - stop % align > start:
            stop -= stop % align
        cuts.append((start, stop))
        start = stop
    return cuts
