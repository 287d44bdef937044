"""What a call acknowledged survives ``kill -9`` of the server; a clean stop loses nothing either;
the server while its model loads. The stores themselves: test_store.py."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx

import mambastep
from mambastep import Session
from mambastep.serve.sqlite_store import SQLiteStore

from conftest import BYTE_MODEL
from servers import start_server

FEEDS = [f"values.append({i} * {i})\n" for i in range(400)]


def test_acknowledged_feeds_survive_kill_9(tmp_path, local):
    data = tmp_path / "data"
    first = start_server(data)
    with httpx.Client(base_url=first.url, timeout=60) as http:
        sid = http.post("/v1/sessions", json={"prompt": "values = []\n"}).json()["id"]
    acknowledged: list[int] = []  # the position after each feed whose response came back

    def feed_until_killed():
        with httpx.Client(base_url=first.url, timeout=60) as http:
            for text in FEEDS:
                try:
                    response = http.post(f"/v1/sessions/{sid}/feed", json={"text": text})
                except httpx.TransportError:
                    return
                acknowledged.append(response.json()["position"])

    feeder = threading.Thread(target=feed_until_killed)
    feeder.start()
    while len(acknowledged) < 20:  # in the middle of the run
        time.sleep(0.01)
    first.stop(signal.SIGKILL)
    feeder.join()
    assert 20 <= len(acknowledged) < len(FEEDS)

    second = start_server(data)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as http:
            position = http.get(f"/v1/sessions/{sid}").json()["position"]
            # every acknowledged feed is there; at most the one in flight besides, whole
            expected = [len("values = []\n") + sum(len(t) for t in FEEDS[: k + 1]) for k in range(len(FEEDS))]
            assert position in (acknowledged[-1], expected[len(acknowledged)])
            reply = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 24, "temperature": 0}).json()
        model, tokenizer = local
        here = Session(model, tokenizer)
        here.feed("values = []\n" + "".join(FEEDS)[: position - len("values = []\n")])
        assert here.position == position
        assert reply["text"] == "".join(here.generate(max_new_tokens=24, temperature=0))
    finally:
        second.stop()
    with sqlite3.connect(data / SQLiteStore.FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_clean_stop_keeps_every_session(tmp_path):
    data = tmp_path / "data"
    first = start_server(data)
    with httpx.Client(base_url=first.url, timeout=60) as http:
        ids = [http.post("/v1/sessions", json={"prompt": f"s{i}"}).json()["id"] for i in range(3)]
        http.post(f"/v1/sessions/{ids[0]}/feed", json={"text": "more"})
    # uvicorn stops gracefully, then ends by the signal it caught, as a signalled process should
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "stopped; every session is in the store" in first.log.read_text()
    second = start_server(data)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as http:
            assert [http.get(f"/v1/sessions/{sid}").json()["position"] for sid in ids] == [6, 2, 2]
    finally:
        second.stop()


def test_servers_on_one_postgresql_database_share_sessions_and_outlive_its_outage(tmp_path, own_postgres):
    """A second server resumes what the first stored; with the database down, a session call is
    a 503 that changes nothing, and once it is back the next call works."""
    url = own_postgres.create_database()
    greedy = {"max_tokens": 24, "temperature": 0, "commit": False}
    first = start_server(tmp_path / "first", store=url)
    try:
        with httpx.Client(base_url=first.url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"prompt": "def parse(text):\n"}).json()["id"]
            fed = http.post(f"/v1/sessions/{sid}/feed", json={"text": "    words = "}).json()
            tokens = http.post(f"/v1/sessions/{sid}/generate", json=greedy).json()["tokens"]
    finally:
        first.stop()
    second = start_server(tmp_path / "second", store=url)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as http:
            assert http.get(f"/v1/sessions/{sid}").json() == fed
            assert http.post(f"/v1/sessions/{sid}/generate", json=greedy).json()["tokens"] == tokens

            own_postgres.stop()
            down = http.post(f"/v1/sessions/{sid}/feed", json={"text": "text.split()"})
            error = down.json()["error"]
            assert down.status_code == 503 and down.headers["Retry-After"] and error["code"] == "store_unavailable"
            assert error["message"].startswith("cannot reach PostgreSQL at 127.0.0.1:")
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "store_unavailable"
            assert http.get(f"/v1/sessions/{sid}").status_code == 503

            own_postgres.start()
            assert http.get("/health").json() == {"status": "ok", "model": BYTE_MODEL.name}
            after = http.post(f"/v1/sessions/{sid}/feed", json={"text": "text.split()"}).json()
            assert (after["position"], after["version"]) == (fed["position"] + len("text.split()"), fed["version"] + 1)
    finally:
        second.stop()


def test_health_is_503_while_the_model_loads(tmp_path):
    """The server answers at once; every route says it is loading until the model is ready."""
    from fastapi.testclient import TestClient

    from mambastep.serve.app import create_app
    from mambastep.serve.settings import ServeSettings

    loaded = threading.Event()

    def load():
        loaded.wait(60)
        return mambastep.load(BYTE_MODEL), mambastep.load_tokenizer(BYTE_MODEL)

    app = create_app(ServeSettings(data_dir=tmp_path / "data"), load)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json() == {"status": "loading"}
        busy = http.post("/v1/sessions", json={})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading" and busy.headers["Retry-After"]
        loaded.set()
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json() == {"status": "ok", "model": "mambastep"}
        assert http.post("/v1/sessions", json={"prompt": "hi"}).json()["position"] == 2


def test_idle_sessions_hold_no_lock(tmp_path):
    """A session's lock lives while calls use it: many sessions touched once leave none."""
    from fastapi.testclient import TestClient

    from mambastep.serve.app import create_app
    from mambastep.serve.settings import ServeSettings

    app = create_app(
        ServeSettings(data_dir=tmp_path / "data", sessions_in_memory=2),
        lambda: (mambastep.load(BYTE_MODEL), mambastep.load_tokenizer(BYTE_MODEL)),
    )
    with TestClient(app) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ids = [http.post("/v1/sessions", json={"prompt": f"s{i}"}).json()["id"] for i in range(6)]
        for i, sid in enumerate(ids):
            assert http.post(f"/v1/sessions/{sid}/feed", json={"text": "x"}).json()["position"] == len(f"s{i}x")
        assert http.post(f"/v1/sessions/{ids[0]}/fork").status_code == 201
        service = app.state.service
        assert service._locks == {} and service.hot_sessions == 2
