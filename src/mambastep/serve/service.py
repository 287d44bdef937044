"""What the server does, transport aside: sessions and completions, on one model.

Every operation on a session holds that session's lock (calls on one session apply in
arrival order), runs its model work as a task on the scheduler, and writes the session's new
file to the store before it returns: a call that returned is durable. A session that a call
touched stays in memory (``sessions_in_memory`` of them, least recently used leave first);
the others live in the store only, and come back from it when asked for. If a write fails,
the copy in memory is dropped, so memory never runs ahead of the store. A store that cannot
be reached is a 503 (``Retry-After``); the next call tries it again.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import torch

from mambastep.files.tokenizer import Tokenizer
from mambastep.models.lm import LanguageModel
from mambastep.models.state import StateError
from mambastep.runtime.generation import heal_prompt, limit_to_healed
from mambastep.runtime.sampling import SamplingParams
from mambastep.runtime.session import DEFAULT_CHECKPOINT_EVERY, Session
from mambastep.serve.metrics import Metrics
from mambastep.serve.scheduler import Busy, Row, Scheduler, ShuttingDown, TokenEvent, pieces
from mambastep.serve.settings import ServeSettings
from mambastep.serve.store import Conflict, SessionStore, StoredSession, StoreUnavailable


class ServiceError(Exception):
    """A request the server refuses: an HTTP status, a message for the caller, OpenAI's error
    ``type``, ``code`` and ``param`` (the field at fault), and headers (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers=None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}


class _Mailbox:
    """Calls posted from any thread, run on one event loop's thread in the order posted. A
    post wakes the loop only when none is pending, so a decode step's events for all its rows
    cost one wake-up, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._calls, self._lock, self._pending = loop, [], threading.Lock(), False

    def post(self, callback: Callable, *args) -> None:
        with self._lock:
            self._calls.append((callback, args))
            if self._pending:
                return
            self._pending = True
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls, self._pending = self._calls, [], False
        for callback, args in calls:
            callback(*args)


def not_found(session_id: str) -> ServiceError:
    return ServiceError(404, f"no session {session_id!r}", "not_found_error", "session_not_found")


@dataclass
class _Hot:
    """A session in memory, the owner it belongs to, and the store's version it matches."""

    session: Session
    owner: str
    version: int


@dataclass
class Generation:
    """What one sequence generated: every token drawn (eos and a stop string's included), the
    text, the log-probabilities where asked for, and why it ended."""

    tokens: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    offsets: list[int] | None = None  # where each token's text starts in ``text``


class _Collect:
    """Gathers a row's events (on the scheduler's thread) and passes them on to ``forward``."""

    def __init__(self, forward: Callable[[TokenEvent], None] | None, logprobs: bool):
        self.forward, self.pieces, self.logprobs, self.top, self.offsets = forward, [], [], [], []
        self.keep_logprobs, self.length = logprobs, 0

    def __call__(self, event: TokenEvent) -> None:
        if event.token is not None:
            self.offsets.append(self.length)
            if self.keep_logprobs:
                self.logprobs.append(event.logprob)
                self.top.append(event.top)
        self.pieces.append(event.text)
        self.length += len(event.text)
        if self.forward is not None:
            self.forward(event)

    def result(self, row: Row) -> Generation:
        lp = self.keep_logprobs
        return Generation(
            row.tokens,
            "".join(self.pieces),
            row.finish_reason,
            self.logprobs if lp else None,
            self.top if lp else None,
            self.offsets,
        )


def _once(fn: Callable[[], object]):
    """A task of one unit: ``fn`` on the scheduler's thread."""

    def task():
        return fn()
        yield  # a generator function: the scheduler runs it

    return task


class Service:
    """Sessions and completions over one model, its tokenizer and a store.

    Args:
        model, tokenizer: what it serves (nothing else may run the model).
        store: where sessions live.
        settings: limits, the hot set, the batch, the prompt piece.
        metrics: where it counts tokens and steps.
    """

    def __init__(
        self, model: LanguageModel, tokenizer: Tokenizer, store: SessionStore, settings: ServeSettings, metrics: Metrics
    ):
        self.model, self.tokenizer, self.store, self.settings, self.metrics = model, tokenizer, store, settings, metrics
        self.limits = settings.limits
        self.scheduler = Scheduler(
            model, settings.max_batch, settings.limits.queue, settings.prefill_piece, on_step=metrics.step
        )
        self._hot: OrderedDict[str, _Hot] = OrderedDict()
        self._hot_lock = threading.Lock()
        self._mailbox: _Mailbox | None = None  # the event loop's, for the scheduler's events
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # sessions in use: lock, holders and waiters
        self.model.weights_digest()  # computed once, before the first session is saved

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        """Cancel what still runs and stop the scheduler; the store is left as the last write left it."""
        self.scheduler.close()

    @property
    def hot_sessions(self) -> int:
        return len(self._hot)

    # ------------------------------------------------------------------------ input

    def encode(self, text: str | None = None, tokens: list[int] | None = None, data: bytes | None = None) -> list[int]:
        """The token ids of one input, checked against the vocabulary and the prompt limit.

        Raises:
            ServiceError: 400 for ids outside the vocabulary, too long an input, or none.
        """
        given = [x is not None for x in (text, tokens, data)]
        if sum(given) != 1:
            raise ServiceError(400, "give exactly one of text, tokens and bytes")
        ids = self.tokenizer.encode(text) if text is not None else list(tokens) if tokens is not None else list(data)
        vocab = self.model.config.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ServiceError(400, f"token id {ids[bad]} at offset {bad} lies outside the vocabulary [0, {vocab})")
        if len(ids) > self.limits.prompt_tokens:
            raise ServiceError(
                400,
                f"{len(ids)} tokens in one request; the limit is {self.limits.prompt_tokens}: "
                "feed longer input to a session in several calls",
                code="prompt_too_long",
            )
        self.metrics.tokens_in.inc(len(ids))
        return ids

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the tokenizer's eos where none is given, as ``mambastep.generate`` does.

        Raises:
            ServiceError: 400 for an eos id outside the vocabulary or too many tokens asked for.
        """
        if params.max_new_tokens > self.limits.max_tokens:
            raise ServiceError(400, f"max_tokens {params.max_new_tokens} exceeds the limit {self.limits.max_tokens}")
        if params.eos_token_id is None and self.tokenizer.eos_token_id is not None:
            params = replace(params, eos_token_id=self.tokenizer.eos_token_id)
        if params.eos_token_id is not None and params.eos_token_id >= self.model.config.vocab_size:
            raise ServiceError(400, f"eos_token_id {params.eos_token_id} lies outside the vocabulary")
        return params

    # ------------------------------------------------------------------------ running work

    async def _run(self, task):
        try:
            future = self.scheduler.submit(task)
        except Busy as err:
            raise ServiceError(429, str(err), "rate_limit_error", "queue_full", {"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise ServiceError(503, str(err), "server_error", "shutting_down") from None
        try:
            return await asyncio.wrap_future(future)
        except ShuttingDown as err:
            raise ServiceError(503, str(err), "server_error", "shutting_down") from None
        except (ValueError, StateError) as err:  # the request's own input, refused by the engine
            raise ServiceError(400, str(err)) from None

    def _decode(self, rows: list[Row], commit_to: Session | None = None):
        """Decode ``rows`` in the scheduler's batch until each ends (a task's steps); then read
        the one row's tokens into ``commit_to`` where given."""
        for row in rows:
            self.scheduler.admit(row)
        yield rows
        if any(row.finish_reason == "error" for row in rows):
            raise RuntimeError("the model failed while generating")
        if commit_to is not None and rows[0].tokens:
            yield from self._feed_steps(commit_to, rows[0].tokens)

    def _feed_steps(self, session: Session, ids: list[int]):
        """Task steps: ``ids`` read into ``session`` a piece at a time, cut where the session would
        cut them read at once (so the result is the same)."""
        start = session.position
        for a, b in pieces(start, start + len(ids), self.settings.prefill_piece, session.checkpoint_every):
            session.feed(ids[a - start : b - start])
            yield b - a

    @asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session's lock: calls on one session run one at a time, in arrival order.
        A lock lives while a call holds or waits for it, so idle sessions cost no memory."""
        lock, users = self._locks.get(session_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def _store(self, method: Callable, *args):
        """``method`` of the store, on a worker thread; a store out of reach is a 503."""
        try:
            return await asyncio.to_thread(method, *args)
        except StoreUnavailable as err:
            raise ServiceError(503, str(err), "server_error", "store_unavailable", {"Retry-After": "5"}) from None

    def _remember(self, session_id: str, hot: _Hot) -> None:
        with self._hot_lock:
            self._hot[session_id] = hot
            self._hot.move_to_end(session_id)
            while len(self._hot) > self.settings.sessions_in_memory:
                self._hot.popitem(last=False)  # stored already: it comes back from the store
        self.metrics.sessions_in_memory.set(len(self._hot))

    def _forget(self, session_id: str) -> None:
        with self._hot_lock:
            self._hot.pop(session_id, None)
        self.metrics.sessions_in_memory.set(len(self._hot))

    async def _hot_session(self, owner: str, session_id: str) -> _Hot:
        """The session in memory, read from the store if it is not, or if the store holds a
        newer version (another server on the same store changed it); call with its lock held."""
        with self._hot_lock:
            hot = self._hot.get(session_id)
        if hot is not None and hot.owner == owner:
            latest = await self._store(self.store.get, session_id, owner, False)
            if latest is None:
                self._forget(session_id)
                raise not_found(session_id)
            if latest.version == hot.version:
                with self._hot_lock:
                    if session_id in self._hot:
                        self._hot.move_to_end(session_id)
                return hot
        stored = await self._store(self.store.get, session_id, owner)
        if stored is None:
            raise not_found(session_id)
        where = f"stored session {session_id}"
        session = await self._run(
            _once(lambda: Session.from_bytes(stored.data, self.model, self.tokenizer, where=where))
        )
        hot = _Hot(session, owner, stored.version)
        self._remember(session_id, hot)
        return hot

    async def _save(self, session_id: str, hot: _Hot, data: bytes) -> StoredSession:
        """Write the session's new file; on failure the copy in memory is dropped."""
        try:
            stored = await self._store(
                self.store.update, session_id, hot.owner, data, hot.session.position, hot.version
            )
        except Conflict as err:
            self._forget(session_id)
            raise ServiceError(409, f"{err}; read it again and retry", code="conflict") from None
        except KeyError:
            self._forget(session_id)
            raise not_found(session_id) from None
        except BaseException:
            self._forget(session_id)
            raise
        hot.version = stored.version
        return stored

    async def _create(self, owner: str, session: Session, data: bytes) -> StoredSession:
        stored = await self._store(self.store.create, owner, data, session.position, session.state_bytes)
        self._remember(stored.id, _Hot(session, owner, stored.version))
        self.metrics.sessions_stored.set(await self._store(self.store.count))
        return stored

    async def _check_quota(self, owner: str) -> None:
        if await self._store(self.store.count, owner) >= self.limits.sessions_per_key:
            raise ServiceError(
                429,
                f"this key holds {self.limits.sessions_per_key} sessions, the limit: delete some first",
                "rate_limit_error",
                "session_limit",
            )

    # ------------------------------------------------------------------------ sessions

    async def create(self, owner: str, ids: list[int]) -> StoredSession:
        """A new session of ``owner``, having read ``ids``."""
        await self._check_quota(owner)

        def task():
            session = Session(self.model, self.tokenizer, checkpoint_every=DEFAULT_CHECKPOINT_EVERY)
            yield from self._feed_steps(session, ids)
            return session, session.to_bytes()

        session, data = await self._run(task)
        return await self._create(owner, session, data)

    async def info(self, owner: str, session_id: str) -> StoredSession:
        stored = await self._store(self.store.get, session_id, owner, False)
        if stored is None:
            raise not_found(session_id)
        return stored

    async def list(self, owner: str, offset: int, limit: int) -> tuple[list[StoredSession], int]:
        sessions = await self._store(self.store.list, owner, offset, limit)
        return sessions, await self._store(self.store.count, owner)

    async def delete(self, owner: str, session_id: str) -> None:
        async with self.lock(session_id):
            if not await self._store(self.store.delete, session_id, owner):
                raise not_found(session_id)
            self._forget(session_id)
        self.metrics.sessions_stored.set(await self._store(self.store.count))

    async def feed(self, owner: str, session_id: str, ids: list[int]) -> StoredSession:
        """Read ``ids`` into the session; durable when it returns."""
        async with self.lock(session_id):
            hot = await self._hot_session(owner, session_id)

            def task():
                yield from self._feed_steps(hot.session, ids)
                return hot.session.to_bytes()

            data = await self._run_mutation(session_id, task)
            return await self._save(session_id, hot, data)

    async def _run_mutation(self, session_id: str, task):
        """A task that changes a session in memory: if it fails halfway, the copy in memory is
        dropped (the store still holds the session as it was)."""
        try:
            return await self._run(task)
        except BaseException:
            self._forget(session_id)
            raise

    async def generate(
        self,
        owner: str,
        session_id: str,
        params: SamplingParams,
        commit: bool,
        logprobs: int | None,
        on_event: Callable[[TokenEvent], None] | None,
        cancelled: threading.Event | None = None,
    ) -> tuple[Generation, StoredSession]:
        """Continue the session; with ``commit`` it reads what it generated (as
        ``Session.generate`` does), durable when this returns."""
        params = self.sampling(params)
        async with self.lock(session_id):
            hot = await self._hot_session(owner, session_id)
            if hot.session.logits is None:
                raise ServiceError(400, "nothing to continue: feed the session at least one token first")
            collect = _Collect(self._threadsafe(on_event), logprobs is not None)

            def task():
                session = hot.session
                row = Row(
                    session.logits,
                    session.state,
                    params,
                    self.tokenizer,
                    collect,
                    params.seed,
                    session.history.tolist(),
                    logprobs,
                    cancelled,
                )
                yield from self._decode([row], session if commit else None)
                return row, session.to_bytes() if commit else None

            row, data = await self._run_mutation(session_id, task)
            self.metrics.tokens_out.inc(len(row.tokens))
            stored = await self._save(session_id, hot, data) if data is not None else await self.info(owner, session_id)
            return collect.result(row), stored

    async def checkpoint(self, owner: str, session_id: str) -> int:
        """Keep the session as it is now, in the store; returns the checkpoint's id."""
        async with self.lock(session_id):
            hot = await self._hot_session(owner, session_id)
            data = await self._run(_once(hot.session.to_bytes))
            try:
                return await self._store(self.store.add_checkpoint, session_id, owner, data, hot.session.position)
            except KeyError:
                raise not_found(session_id) from None

    async def rollback(
        self, owner: str, session_id: str, checkpoint: int | None = None, tokens: int | None = None
    ) -> StoredSession:
        """Return the session to a checkpoint of it, or undo its last ``tokens`` tokens."""
        if (checkpoint is None) == (tokens is None):
            raise ServiceError(400, "give exactly one of checkpoint and tokens")
        async with self.lock(session_id):
            hot = await self._hot_session(owner, session_id)
            if checkpoint is not None:
                data = await self._store(self.store.get_checkpoint, session_id, owner, checkpoint)
                if data is None:
                    raise ServiceError(404, f"session {session_id!r} has no checkpoint {checkpoint}", "not_found_error")
                where = f"checkpoint {checkpoint}"
                hot.session = await self._run_mutation(
                    session_id, _once(lambda: Session.from_bytes(data, self.model, self.tokenizer, where=where))
                )
            else:

                def task():
                    hot.session.rollback_tokens(tokens)
                    return hot.session.to_bytes()
                    yield

                data = await self._run(task)  # a refused rollback changes nothing
            return await self._save(session_id, hot, data)

    async def fork(self, owner: str, session_id: str) -> StoredSession:
        """A new session, a copy of this one as it is now (its checkpoints stay with it)."""
        await self._check_quota(owner)
        async with self.lock(session_id):
            hot = await self._hot_session(owner, session_id)

            def task():
                other = hot.session.fork()
                return other, other.to_bytes()
                yield

            other, data = await self._run(task)
        return await self._create(owner, other, data)

    async def file(self, owner: str, session_id: str) -> bytes:
        """The session's file, as ``Session.save`` writes it (the last durable version)."""
        stored = await self._store(self.store.get, session_id, owner)
        if stored is None:
            raise not_found(session_id)
        return stored.data

    async def import_file(self, owner: str, data: bytes, other_weights: bool = False) -> StoredSession:
        """A new session from a session file (``Session.save``'s format), checked against the model."""
        if len(data) > self.limits.import_bytes:
            raise ServiceError(413, f"a session file of {len(data)} bytes; the limit is {self.limits.import_bytes}")
        await self._check_quota(owner)

        def task():
            session = Session.from_bytes(data, self.model, self.tokenizer, other_weights, where="the uploaded file")
            return session, session.to_bytes()
            yield

        session, data = await self._run(task)
        return await self._create(owner, session, data)

    # ------------------------------------------------------------------------ completions

    async def complete(
        self,
        owner: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        logprobs: int | None,
        on_event: Callable[[int, TokenEvent], None] | None,
        session_id: str | None = None,
        commit: bool = True,
        cancelled: threading.Event | None = None,
        heal: bool = False,
    ) -> list[Generation]:
        """Complete each prompt ``n`` times, choice ``i * n + j`` the ``j``-th of prompt ``i``
        (its seed ``params.seed + j``). With ``session_id``, the one prompt is read into that
        session and continued from its state; with ``commit`` the completion is read too.
        ``heal``: the prompts were text, healed as ``mambastep.generate`` heals them (a last token
        of whitespace alone is read as the first new token's start); a session's prompt is
        read as it is, since the session keeps its tokens."""
        params = self.sampling(params)
        self.check_prompts(prompts, n, session_id)
        forward = (lambda i: self._threadsafe(lambda e: on_event(i, e))) if on_event else (lambda i: None)
        collects = [_Collect(forward(i), logprobs is not None) for i in range(len(prompts) * n)]
        seeds = [None if params.seed is None else params.seed + j for j in range(n)]

        def rows(logits, state, history, first, healed=""):
            return [
                Row(
                    logits,
                    state,
                    params,
                    self.tokenizer,
                    collects[first + j],
                    seeds[j],
                    history,
                    logprobs,
                    cancelled,
                    healed,
                )
                for j in range(n)
            ]

        if session_id is not None:
            async with self.lock(session_id):
                hot = await self._hot_session(owner, session_id)

                def task():
                    session = hot.session
                    yield from self._feed_steps(session, prompts[0])
                    admitted = rows(session.logits, session.state, session.history.tolist(), 0)
                    yield from self._decode(admitted, session if commit else None)
                    return admitted, session.to_bytes()

                done, data = await self._run_mutation(session_id, task)
                await self._save(session_id, hot, data)
        else:

            def prompt_task(i: int, ids: list[int]):
                def task():
                    read, healed = heal_prompt(self.tokenizer, ids) if heal else (ids, "")
                    state, logits, tokens = None, None, torch.tensor([read], device=self.model.device)
                    for a, b in pieces(0, len(read), self.settings.prefill_piece, self.settings.prefill_piece):
                        logits, state = self.model.prefill(tokens[:, a:b], state)
                        yield b - a
                    logits = limit_to_healed(self.tokenizer, logits, [healed])
                    admitted = rows(logits, state, ids, i * n, healed)
                    yield from self._decode(admitted)
                    return admitted

                return task

            results = await asyncio.gather(*(self._run(prompt_task(i, ids)) for i, ids in enumerate(prompts)))
            done = [row for admitted in results for row in admitted]
        self.metrics.tokens_out.inc(sum(len(row.tokens) for row in done))
        return [collect.result(row) for collect, row in zip(collects, done)]

    def check_prompts(self, prompts: list[list[int]], n: int, session_id: str | None) -> None:
        """Refuse empty prompts, and a completion in a session of more than one prompt or choice.

        Raises:
            ServiceError: 400.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ServiceError(400, "an empty prompt: the model needs at least one token to start from", param="prompt")
        if session_id is not None and (len(prompts) != 1 or n != 1):
            raise ServiceError(400, "a completion in a session takes one prompt and n = 1")

    async def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        """The log-probability of each prompt token under the model given the ones before it
        (None for the first): what ``echo`` with ``logprobs`` reports for the prompt."""

        def task():
            logits, _ = self.model(torch.tensor([ids], device=self.model.device))  # (1, l, vocab)
            lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            return [None, *lp.tolist()]
            yield

        return await self._run(task)

    def _threadsafe(self, callback: Callable | None) -> Callable | None:
        """``callback`` called on this event loop's thread, from any thread."""
        if callback is None:
            return None
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox
        return lambda *args: mailbox.post(callback, *args)
