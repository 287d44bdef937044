"""The FastAPI application: the routes, keys, errors in OpenAI's shape, server-sent events,
body limits, metrics and the page.

``create_app(settings, load)`` opens the store at once and returns an app that loads its model
in the background when it starts (``load`` returns the model and its tokenizer): ``/health``
answers 503 until it is ready, and every other route too; ``/health`` answers 503 as well while
the store cannot be reached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mambastep.families import family_of
from mambastep.files.tokenizer import Tokenizer
from mambastep.models.config import GPTNeoXConfig
from mambastep.models.lm import LanguageModel
from mambastep.runtime.generation import heal_prompt
from mambastep.runtime.sampling import SamplingParams
from mambastep.serve import schemas as s
from mambastep.serve.metrics import Metrics
from mambastep.serve.scheduler import TokenEvent
from mambastep.serve.service import Generation, Service, ServiceError
from mambastep.serve.settings import ServeSettings
from mambastep.serve.store import SessionStore, StoredSession, StoreUnavailable, open_store

log = logging.getLogger(__name__)
STATIC = resources.files("mambastep.serve") / "static"
ERRORS = {code: {"model": s.ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 503)}
LOCAL_OWNER = "local"  # every session's owner where no key is asked for
_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
STREAMED = {
    200: {"content": {"text/event-stream": {"schema": _EVENT}}, "description": "with stream: server-sent events"}
}


def create_app(
    settings: ServeSettings, load: Callable[[], tuple[LanguageModel, Tokenizer]], announce: bool = True
) -> FastAPI:
    """The server's application, on the store ``settings.store_url`` names, opened now; ``load``
    runs in the background when it starts. With ``announce``, its address is printed once it is
    ready, and a line when it stops.

    Raises:
        StoreUnavailable: the store's database cannot be reached.
        ModuleNotFoundError: a PostgreSQL store without psycopg installed.
    """
    store = open_store(settings.store_url)
    metrics = Metrics()
    metrics.sessions_stored.set(store.count())
    owners = {hashlib.sha256(key.encode()).hexdigest()[:16]: key for key in settings.api_keys}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ready = threading.Thread(
            target=_start, args=(app, settings, load, store, metrics, announce), name="mambastep-loader", daemon=True
        )
        ready.start()
        yield
        service: Service | None = app.state.service
        if service is not None:
            service.close()
        store.close()
        if service is not None and announce:
            print("mambastep serve: stopped; every session is in the store", flush=True)

    app = FastAPI(
        title="mambastep",
        summary="Sessions whose state is a durable, forkable, downloadable resource; OpenAI-compatible completions",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service = None
    app.state.model_card = None
    app.state.load_error = None
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    app.add_middleware(
        _BodyLimit, default=settings.limits.body_bytes, large={"/v1/sessions/import": settings.limits.import_bytes}
    )

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError):
        return error_response(err.status, err.message, err.type, err.code, err.headers, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_request_error", "invalid_value", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind, None, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "the server failed on this request; the failure is in its log", "server_error")

    def service() -> Service:
        if app.state.service is None:
            raise ServiceError(
                503, app.state.load_error or "the model is loading", "server_error", "loading", {"Retry-After": "1"}
            )
        return app.state.service

    def owner(request: Request) -> str:
        """The owner of the caller's sessions: a digest of its key (or one owner, with no keys)."""
        if not owners:
            return LOCAL_OWNER
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        found = None
        for digest, key in owners.items():  # every key compared, in constant time
            if hmac.compare_digest(given.strip().encode(), key.encode()) and scheme.lower() == "bearer":
                found = digest
        if found is None:
            raise ServiceError(
                401,
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                "authentication_error",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
        return found

    # ------------------------------------------------------------------ public

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/health", response_model=s.Health, response_model_exclude_none=True, responses={503: {"model": s.Health}})
    async def health():
        if app.state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        try:
            await asyncio.to_thread(store.check)
        except StoreUnavailable as err:
            down = s.Health(status="store_unavailable", model=settings.model_name, reason=str(err))
            return JSONResponse(down.model_dump(), status_code=503, headers={"Retry-After": "5"})
        return s.Health(status="ok", model=settings.model_name)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        if app.state.service is not None:
            metrics.queue.set(app.state.service.scheduler.depth)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ models and completions

    @app.get("/v1/models", response_model=s.ModelList)
    async def models(_: str = Depends(owner)):
        service()
        return s.ModelList(data=[app.state.model_card])

    @app.post("/v1/completions", response_model=s.CompletionResponse, responses=STREAMED)
    async def completions(body: s.CompletionRequest, request: Request, who: str = Depends(owner)):
        svc = service()
        if body.n > settings.limits.n:
            raise ServiceError(400, f"n = {body.n} exceeds the limit {settings.limits.n}", param="n")
        prompts = _prompts(svc, body.prompt)
        params = svc.sampling(_params(body))
        svc.check_prompts(prompts, body.n, body.session)
        if body.session is not None:
            await svc.info(who, body.session)  # 404 before any event is sent
        created, completion_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        prompt_texts = [svc.tokenizer.decode(p) for p in prompts]
        text_prompts = isinstance(body.prompt, str) or isinstance(body.prompt[0], str)
        echo_ids = echo_logprobs = None
        if body.echo and body.logprobs is not None:
            # A healed prompt is listed as read: its first new token holds the whitespace taken out.
            echo_ids = [heal_prompt(svc.tokenizer, p)[0] if text_prompts else p for p in prompts]
            echo_logprobs = [await svc.prompt_logprobs(p) for p in echo_ids]

        def choice(i: int, gen: Generation) -> s.CompletionChoice:
            prompt = i // body.n
            text = (prompt_texts[prompt] if body.echo else "") + gen.text
            lp = None
            if body.logprobs is not None:
                lp = _logprobs(svc, gen, body.logprobs)
                if body.echo:
                    lp = _with_prompt(svc, echo_ids[prompt], prompt_texts[prompt], echo_logprobs[prompt], lp)
            return s.CompletionChoice(text=text, index=i, logprobs=lp, finish_reason=gen.finish_reason)

        def usage(gens: list[Generation]) -> s.Usage:
            out = sum(len(g.tokens) for g in gens)
            used = sum(len(p) for p in prompts)
            return s.Usage(prompt_tokens=used, completion_tokens=out, total_tokens=used + out)

        run = lambda on_event, cancelled: svc.complete(  # noqa: E731
            who,
            prompts,
            params,
            body.n,
            body.logprobs,
            on_event,
            body.session,
            body.session_commit,
            cancelled,
            heal=text_prompts,
        )
        if not body.stream:
            gens = await run(None, None)
            return s.CompletionResponse(
                id=completion_id,
                created=created,
                model=settings.model_name,
                choices=[choice(i, g) for i, g in enumerate(gens)],
                usage=usage(gens),
            )

        def chunk(index: int, event: TokenEvent) -> dict:
            lp = None
            if body.logprobs is not None and event.token is not None:
                top = None if event.top is None else [{_token_text(svc, t): v for t, v in event.top}]
                lp = {
                    "tokens": [_token_text(svc, event.token)],
                    "token_logprobs": [event.logprob],
                    "top_logprobs": top,
                    "text_offset": [0],
                }
            echo = prompt_texts[index // body.n] if body.echo and index not in echoed else ""
            echoed.add(index)
            text = s.CompletionChoice(
                text=echo + event.text, index=index, logprobs=lp, finish_reason=event.finish_reason
            )
            return s.CompletionResponse(
                id=completion_id, created=created, model=settings.model_name, choices=[text]
            ).model_dump()

        echoed: set[int] = set()
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def last(gens: list[Generation]) -> list[dict]:
            if not include_usage:
                return []
            return [
                s.CompletionResponse(
                    id=completion_id, created=created, model=settings.model_name, choices=[], usage=usage(gens)
                ).model_dump()
            ]

        return _stream(request, run, chunk, last)

    # ------------------------------------------------------------------ sessions

    @app.post("/v1/sessions", response_model=s.SessionObject, status_code=201)
    async def create_session(body: s.SessionCreate | None = None, who: str = Depends(owner)):
        svc = service()
        body = body or s.SessionCreate()
        ids = [] if body.prompt is None and body.tokens is None else _encode(svc, text=body.prompt, tokens=body.tokens)
        return _session(await svc.create(who, ids))

    @app.get("/v1/sessions", response_model=s.SessionList)
    async def list_sessions(
        offset: int = Query(0, ge=0, le=2**31 - 1), limit: int = Query(100, ge=1, le=1000), who: str = Depends(owner)
    ):
        sessions, total = await service().list(who, offset, limit)
        return s.SessionList(data=[_session(x) for x in sessions], total=total, offset=offset, limit=limit)

    @app.get("/v1/sessions/{session_id}", response_model=s.SessionObject)
    async def get_session(session_id: str, who: str = Depends(owner)):
        return _session(await service().info(who, session_id))

    @app.delete("/v1/sessions/{session_id}", response_model=s.Deleted)
    async def delete_session(session_id: str, who: str = Depends(owner)):
        await service().delete(who, session_id)
        return s.Deleted(id=session_id)

    @app.post("/v1/sessions/{session_id}/feed", response_model=s.SessionObject)
    async def feed(session_id: str, body: s.Input, who: str = Depends(owner)):
        svc = service()
        return _session(await svc.feed(who, session_id, _encode(svc, body.text, body.tokens, body.bytes)))

    @app.post("/v1/sessions/{session_id}/generate", response_model=s.GenerateResponse, responses=STREAMED)
    async def generate(session_id: str, body: s.GenerateRequest, request: Request, who: str = Depends(owner)):
        svc = service()
        params = svc.sampling(_params(body))
        if (await svc.info(who, session_id)).position == 0:  # refused before any event is sent
            raise ServiceError(400, "nothing to continue: feed the session at least one token first")
        run = lambda on_event, cancelled: svc.generate(  # noqa: E731
            who, session_id, params, body.commit, body.logprobs, on_event, cancelled
        )

        def result(gen: Generation, stored: StoredSession) -> s.GenerateResponse:
            lp = _logprobs(svc, gen, body.logprobs) if body.logprobs is not None else None
            return s.GenerateResponse(
                session=_session(stored), text=gen.text, tokens=gen.tokens, finish_reason=gen.finish_reason, logprobs=lp
            )

        if not body.stream:
            return result(*await run(None, None))

        def chunk(index: int, event: TokenEvent) -> dict:
            return {
                "object": "session.generate.chunk",
                "session": session_id,
                "text": event.text,
                "token": event.token,
                "logprob": event.logprob,
                "finish_reason": event.finish_reason,
            }

        return _stream(
            request,
            lambda on_event, cancelled: run(lambda e: on_event(0, e), cancelled),
            chunk,
            lambda done: [result(*done).model_dump()],
        )

    @app.post("/v1/sessions/{session_id}/checkpoints", response_model=s.Checkpoint, status_code=201)
    async def checkpoint(session_id: str, who: str = Depends(owner)):
        svc = service()
        checkpoint_id = await svc.checkpoint(who, session_id)
        stored = await svc.info(who, session_id)
        return s.Checkpoint(id=checkpoint_id, session=session_id, position=stored.position)

    @app.post("/v1/sessions/{session_id}/rollback", response_model=s.SessionObject)
    async def rollback(session_id: str, body: s.RollbackRequest, who: str = Depends(owner)):
        return _session(await service().rollback(who, session_id, body.checkpoint, body.tokens))

    @app.post("/v1/sessions/{session_id}/fork", response_model=s.SessionObject, status_code=201)
    async def fork(session_id: str, who: str = Depends(owner)):
        return _session(await service().fork(who, session_id))

    @app.get(
        "/v1/sessions/{session_id}/file",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}, "description": "the session file"}},
    )
    async def download(session_id: str, who: str = Depends(owner)):
        data = await service().file(who, session_id)
        disposition = f'attachment; filename="{session_id}.session"'
        return Response(data, media_type="application/octet-stream", headers={"Content-Disposition": disposition})

    @app.post(
        "/v1/sessions/import",
        response_model=s.SessionObject,
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def import_session(request: Request, other_weights: bool = Query(False), who: str = Depends(owner)):
        svc = service()
        data = await request.body()
        if not data:
            raise ServiceError(400, "the body must be a session file (as GET /v1/sessions/{id}/file returns it)")
        return _session(await svc.import_file(who, data, other_weights))

    return app


# ---------------------------------------------------------------------------------------- helpers


def _start(app: FastAPI, settings: ServeSettings, load, store: SessionStore, metrics: Metrics, announce: bool) -> None:
    """Load the model and start the service on ``store`` (in the background); print the address once ready."""
    try:
        model, tokenizer = load()
        service = Service(model, tokenizer, store, settings, metrics)
        service.start()
        app.state.model_card = _model_card(settings, model)
        app.state.service = service
    except Exception as err:  # the server stays up and says why on every route
        log.exception("loading failed")
        app.state.load_error = f"the model failed to load: {err}"
        return
    if announce:
        print(f"mambastep serve: ready on http://{settings.host}:{settings.port}", flush=True)


def _model_card(settings: ServeSettings, model: LanguageModel) -> s.ModelCard:
    config = model.config
    transformer = GPTNeoXConfig(
        d_model=config.d_model, n_layer=config.n_layer, n_heads=1, vocab_size=config.vocab_size, rotary_pct=0.0
    )
    info = model.info()
    return s.ModelCard(
        id=settings.model_name,
        created=int(time.time()),
        family=info["family"],
        parameters=info["parameters"],
        state_bytes=info["state_bytes_per_sequence"],
        transformer_kv_bytes_per_token=family_of(transformer).kv_bytes_per_token(transformer, model.dtype),
    )


def error_response(
    status: int, message: str, type: str, code: str | None = None, headers=None, param: str | None = None
):
    body = s.ErrorResponse(error=s.ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _session(stored: StoredSession) -> s.SessionObject:
    return s.SessionObject(
        id=stored.id,
        position=stored.position,
        state_bytes=stored.state_bytes,
        file_bytes=stored.file_bytes,
        version=stored.version,
        created=stored.created,
        updated=stored.updated,
    )


def _encode(
    svc: Service, text: str | None = None, tokens: list[int] | None = None, data: str | None = None
) -> list[int]:
    raw = None
    if data is not None:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "bytes must be base64", param="bytes") from None
    try:
        return svc.encode(text, tokens, raw)
    except UnicodeError as err:
        raise ServiceError(400, f"text the tokenizer cannot read: {err}") from None


def _prompts(svc: Service, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [_encode(svc, text=prompt)]
    if prompt and isinstance(prompt[0], str):
        return [_encode(svc, text=p) for p in prompt]
    if prompt and isinstance(prompt[0], list):
        return [_encode(svc, tokens=p) for p in prompt]
    return [_encode(svc, tokens=prompt)]


def _params(body: s.Sampling) -> SamplingParams:
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    try:
        return SamplingParams(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as err:
        raise ServiceError(400, str(err)) from None


def _token_text(svc: Service, token: int) -> str:
    return svc.tokenizer.decode([token])


def _logprobs(svc: Service, gen: Generation, top: int) -> s.Logprobs:
    return s.Logprobs(
        tokens=[_token_text(svc, t) for t in gen.tokens],
        token_logprobs=list(gen.logprobs),
        top_logprobs=[{_token_text(svc, t): v for t, v in alternatives} for alternatives in gen.top] if top else None,
        text_offset=list(gen.offsets),
    )


def _with_prompt(
    svc: Service, read: list[int], prompt_text: str, prompt_lp: list[float | None], lp: s.Logprobs
) -> s.Logprobs:
    """The completion's log-probabilities behind those of the echoed prompt, listed as it was
    read: a healed prompt without its last whitespace, with which the first new token begins."""
    texts = [_token_text(svc, t) for t in read]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    after = [len(prompt_text) + o for o in lp.text_offset]  # the completion's text follows the whole prompt
    if after:
        after[0] = len(svc.tokenizer.decode(read))  # the first new token begins where reading ended
    return s.Logprobs(
        tokens=texts + lp.tokens,
        token_logprobs=prompt_lp + lp.token_logprobs,
        top_logprobs=None if lp.top_logprobs is None else [None] * len(read) + lp.top_logprobs,
        text_offset=offsets + after,
    )


def _stream(request: Request, run, chunk, last) -> StreamingResponse:
    """Server-sent events: ``chunk(index, event)`` for each token event as the rows emit them,
    then ``last(result)``, then ``data: [DONE]``. A client that goes away cancels the rows."""
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    async def body() -> AsyncIterator[str]:
        work = asyncio.create_task(run(lambda index, event: events.put_nowait((index, event)), cancelled))
        work.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while True:
                item = await events.get()
                if item is None:
                    break
                yield f"data: {json.dumps(chunk(*item))}\n\n"
            try:
                done = work.result()
            except ServiceError as err:
                error = s.ErrorResponse(error=s.ErrorDetail(message=err.message, type=err.type, code=err.code))
                yield f"data: {error.model_dump_json()}\n\n"
                return
            for extra in last(done):
                yield f"data: {json.dumps(extra)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client gone before the end: its rows stop at their next step
            if not work.done():
                await asyncio.shield(work)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _BodyLimit:
    """Refuses request bodies above a limit (413): ``default`` for every path but those in
    ``large``, whatever the body says of its own length."""

    def __init__(self, app, default: int, large: dict[str, int]):
        self.app, self.default, self.large = app, default, large

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.large.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ServiceError(413, f"the request body exceeds {limit} bytes", code="body_too_large")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int):
    return error_response(413, f"the request body exceeds {limit} bytes", "invalid_request_error", "body_too_large")
