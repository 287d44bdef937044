"""Two servers on one store, as replicas are: neither uses a copy the other has moved past, and
no write is lost when both change a session at once."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mambastep import SamplingParams, Session

from servers import KEYS, client, start_server

GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def two_servers(request, tmp_path_factory):
    """Two servers on one store: a SQLite file both open, or a PostgreSQL database."""
    data = tmp_path_factory.mktemp("shared")
    store = request.getfixturevalue("postgres").create_database() if request.param == "postgresql" else None
    first = start_server(data / "first" if store else data, "--api-key", KEYS[0], store=store)
    try:
        second = start_server(data / "second" if store else data, "--api-key", KEYS[0], store=store)
    except BaseException:
        first.stop()
        raise
    yield client(first), client(second)
    for server in (first, second):
        server.stop()


def test_a_server_never_uses_a_copy_another_has_moved_past(two_servers, local):
    a, b = two_servers
    model, tok = local
    session = a.post("/v1/sessions", json={"prompt": "def f(x):"}).json()["id"]
    a.post(f"/v1/sessions/{session}/feed", json={"text": "\n    "}).raise_for_status()  # hot in a
    b.post(f"/v1/sessions/{session}/feed", json={"text": "return"}).raise_for_status()  # a's copy is now old
    answer = a.post(f"/v1/sessions/{session}/generate", json={**GREEDY, "commit": False})
    position = len(tok.encode("def f(x):\n    return"))
    assert answer.status_code == 200 and answer.json()["session"]["position"] == position
    direct = Session(model, tok)
    direct.feed("def f(x):\n    return")
    assert answer.json()["text"] == "".join(direct.generate(SamplingParams(max_new_tokens=6, temperature=0)))


def test_no_write_is_lost_when_two_servers_feed_one_session(two_servers, local):
    a, b = two_servers
    model, tok = local
    session = a.post("/v1/sessions", json={"prompt": "x = 1\n"}).json()["id"]
    for server in (a, b):  # both hold it hot at the same version
        server.post(f"/v1/sessions/{session}/generate", json={**GREEDY, "commit": False}).raise_for_status()
    piece = tok.encode("y = x + 1\n")

    def feed(server):
        return server.post(f"/v1/sessions/{session}/feed", json={"tokens": piece}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(feed, [a, b] * 4))
    assert set(statuses) <= {200, 409} and 200 in statuses
    applied = statuses.count(200)  # every acknowledged feed is in the session, once; refused ones are not
    final = a.get(f"/v1/sessions/{session}/file")
    restored = Session.from_bytes(final.content, model, tok)
    assert restored.position == len(tok.encode("x = 1\n")) + applied * len(piece)
    direct = Session(model, tok)
    direct.feed("x = 1\n")
    for _ in range(applied):
        direct.feed(piece)
    assert torch.equal(restored.history, direct.history)
