"""The server on Ray Serve: replicas of the same application behind one HTTP address, their
sessions in a shared store, so any replica can take over any session exactly.

Two deployments. ``Engine`` is the single-process server, unchanged (``create_app``: the same
routes, keys, limits and errors), one per replica, each with its model and its hot sessions.
``Gateway`` is the ingress: it reads which session a request is about (the path's session id,
or a completion's ``"session"``) and hands the request to an engine with Ray Serve's model
multiplexing keyed by that id, so a session's requests go to the replica that holds it hot.
When that replica is gone (it died, or autoscaling removed it), Ray routes the next request to
another one, which reads the session from the store. An engine never uses a hot copy that the
store has moved past (``Service`` checks the version), and a write on top of an old version is
refused (409), so two replicas can never both apply a change to the same state.

Build it with ``build(args)`` (the parsed ``mambastep serve`` flags) or, for ``serve run`` and
Serve config files, ``app_builder({"model": ..., "store": ..., "replicas": 2})``: the keys are
``mambastep serve``'s flags without their dashes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import threading
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn

from mambastep.serve.app import create_app, error_response
from mambastep.serve.settings import ServeError, ServeSettings
from mambastep.serve.store import StoreUnavailable, open_store

UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
SESSION_PATH = re.compile(r"^/v1/sessions/(sess_[0-9a-f]+)")
REPLICA_HEADER = "x-mambastep-replica"
AUTOSCALING = {  # one replica's worth of work is a full decode batch; add replicas past it
    "min_replicas": 1,
    "max_replicas": 4,
    "upscale_delay_s": 10,
    "downscale_delay_s": 120,
}


def session_of(method: str, path: str, body: bytes) -> str:
    """The session a request is about ("" for none): the id in a session route's path, or the
    ``"session"`` of a completion request."""
    found = SESSION_PATH.match(path)
    if found:
        return found.group(1)
    if method == "POST" and path == "/v1/completions":
        try:
            session = json.loads(body).get("session")
        except (ValueError, AttributeError):
            return ""  # the engine answers the malformed body
        return session if isinstance(session, str) else ""
    return ""


def creates_session(method: str, path: str) -> bool:
    """Whether a request makes a new session (its id is in the response)."""
    return method == "POST" and (path in ("/v1/sessions", "/v1/sessions/import") or path.endswith("/fork"))


@serve.deployment
class Engine:
    """One replica: the single-process application and its model, called with whole requests."""

    async def __init__(self, args: argparse.Namespace):
        from mambastep.cli.serve import load_model_and_tokenizer, serve_settings

        loaded = load_model_and_tokenizer(args)  # before the replica counts as started
        self.app = create_app(serve_settings(args), lambda: loaded, announce=False)
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
        await self.lifespan.startup()
        while self.app.state.service is None and self.app.state.load_error is None:
            await asyncio.sleep(0.02)  # the store opening and the scheduler starting
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()  # its actor's name

    async def __del__(self):
        await self.lifespan.shutdown()  # the scheduler stopped, the store closed

    @serve.multiplexed(max_num_models_per_replica=ServeSettings.sessions_in_memory)  # the default hot set
    async def hold(self, session_id: str) -> str:
        """Marks ``session_id`` as this replica's, for routing; the session itself is read
        from the store by the service when a request needs it."""
        return session_id

    async def respond(self, request: dict) -> AsyncIterator[dict | bytes]:
        """Run one HTTP request through the application: yields the response's start
        (``{"status", "headers"}``), then its body in the pieces the application sends."""
        if session := serve.get_multiplexed_model_id():
            await self.hold(session)
        messages: asyncio.Queue[dict] = asyncio.Queue()
        gone = asyncio.Event()
        pending = [{"type": "http.request", "body": request["body"], "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "http",
            "method": request["method"],
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query"],
            "headers": request["headers"],
            "client": request["client"],
            "server": None,
        }
        task = asyncio.create_task(self.app(scope, receive, messages.put))
        created = bytearray() if creates_session(request["method"], request["path"]) else None
        try:
            while True:
                message = await messages.get()
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica.encode())]
                    yield {"status": status, "headers": headers}
                elif message["type"] == "http.response.body":
                    if created is not None:
                        created += message.get("body", b"")
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
            await task
            if created is not None and status in (200, 201):
                await self.hold(json.loads(created)["id"])  # the new session is hot here: route it here
        finally:
            gone.set()  # the client left: the application cancels what it was doing for it
            if not task.done():
                await asyncio.wait([task], timeout=10)


def gateway_app(engine: DeploymentHandle, max_body: int) -> FastAPI:
    """The ingress: every route of the application, handed to the engine holding the session."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(request: Request) -> Response:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > max_body:
                return error_response(
                    413, f"the request body exceeds {max_body} bytes", "invalid_request_error", "body_too_large"
                )
        session = session_of(request.method, request.url.path, bytes(body))
        call = engine.options(stream=True, multiplexed_model_id=session).respond.remote(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query.encode(),
                "headers": request.headers.raw,
                "body": bytes(body),
                "client": (request.client.host, request.client.port) if request.client else None,
            }
        )
        try:
            start = await call.__anext__()
            headers = list(start["headers"])
            if not dict(headers).get(b"content-type", b"").startswith(b"text/event-stream"):
                # the whole answer, or none: a replica lost before its end is a 503, not a cut response
                content = b"".join([piece async for piece in call])
                response = Response(content, status_code=start["status"])
                response.raw_headers = headers
                return response
        except UNAVAILABLE as err:
            return error_response(
                503,
                f"no replica could finish the request ({type(err).__name__}); retry shortly",
                "server_error",
                "unavailable",
                {"Retry-After": "1"},
            )
        response = StreamingResponse(_rest(call), status_code=start["status"])  # events as they come
        response.raw_headers = headers
        return response

    return app


async def _rest(call) -> AsyncIterator[bytes]:
    """The body's pieces; a client that leaves cancels the engine's request."""
    finished = False
    try:
        async for piece in call:
            yield piece
        finished = True
    finally:
        if not finished:
            call.cancel()


@serve.deployment
@serve.ingress()
class Gateway:
    """The application's ingress (no model): routes each request to an engine."""

    def __init__(self, engine: DeploymentHandle, max_body: int):
        self.engine, self.max_body = engine, max_body

    def __serve_build_asgi_app__(self) -> FastAPI:
        return gateway_app(self.engine, self.max_body)


def build(args: argparse.Namespace) -> serve.Application:
    """The Ray Serve application for ``mambastep serve`` flags ``args`` (``--replicas N``, or
    ``auto`` for Ray Serve's autoscaling with ``AUTOSCALING``'s bounds)."""
    from mambastep.cli.serve import serve_settings

    settings = serve_settings(args)
    scale = (
        {"autoscaling_config": {**AUTOSCALING, "target_ongoing_requests": settings.max_batch}}
        if args.replicas == "auto"
        else {"num_replicas": int(args.replicas)}
    )
    engine = Engine.options(
        **scale,
        max_ongoing_requests=settings.limits.queue,  # the engine's own queue answers 429 beyond
        health_check_period_s=1,  # a replica gone is dropped from routing within about a second
        ray_actor_options={"num_cpus": args.threads or 1},
    ).bind(args)
    largest = max(settings.limits.body_bytes, settings.limits.import_bytes)
    return Gateway.options(max_ongoing_requests=4 * settings.limits.queue, ray_actor_options={"num_cpus": 0}).bind(
        engine, largest
    )


def app_builder(options: dict) -> serve.Application:
    """The application from ``mambastep serve`` options given as a dict (``serve run
    mambastep.serve.cluster:app_builder model=... store=...`` or a Serve config file's ``args``)."""
    from mambastep.cli import build_parser

    argv = ["serve", "--ray"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return build(build_parser().parse_args(argv))


def run(args: argparse.Namespace, settings: ServeSettings) -> int:
    """``mambastep serve --ray``: the application on a Ray cluster (``--ray-address``, or one
    started on this machine) behind Ray Serve's HTTP proxy at ``--host``:``--port``, until
    SIGINT or SIGTERM; then the application is deleted (and a cluster started here stopped)."""
    try:  # reached from here first: an unreachable database is one line, not every replica's failure
        open_store(settings.store_url).close()
    except (StoreUnavailable, ModuleNotFoundError) as err:
        raise ServeError(str(err)) from None
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets handlers of its own
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(args), name="mambastep", route_prefix="/")
        print(f"mambastep serve: ready on http://{settings.host}:{settings.port} (Ray Serve)", flush=True)
        stop.wait()
        serve.delete("mambastep")
        if args.ray_address is None:
            serve.shutdown()
    finally:
        ray.shutdown()
    print("mambastep serve: stopped; every session is in the store", flush=True)
    return 0
