"""The server as a Ray Serve application: a local Ray cluster, two replicas behind one address,
sessions in a shared store; a replica killed in the middle of a session loses nothing."""

import importlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from mambastep import SamplingParams, Session
from mambastep.serve.cluster import REPLICA_HEADER, app_builder, creates_session, session_of
from mambastep.serve.process import free_port

from conftest import BYTE_MODEL

GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(postgres):
    """The application on a local Ray cluster (2 CPUs): two replicas of the byte-level test model,
    one thread each, their sessions in PostgreSQL (made by ``app_builder``, as ``serve run`` and config files do)."""
    port = free_port()
    store = postgres.create_database()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"model": str(BYTE_MODEL), "replicas": 2, "threads": 1, "store": store})
        serve.run(app, name="mambastep", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            yield http
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sessions_are_spread_over_the_replicas(cluster):
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: cluster.post("/v1/sessions", json={"prompt": f"x = {i}\n"}), range(16)))
    assert all(r.status_code == 201 for r in made)
    assert len({r.headers[REPLICA_HEADER] for r in made}) == 2


def test_a_killed_replica_loses_nothing(cluster, local):
    model, tok = local
    prompt = "def f(x):"
    made = cluster.post("/v1/sessions", json={"prompt": prompt})
    session = made.json()["id"]
    first = cluster.post(f"/v1/sessions/{session}/generate", json=GREEDY)
    assert first.status_code == 200
    holder = first.headers[REPLICA_HEADER]
    ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
    second = cluster.post(f"/v1/sessions/{session}/generate", json=GREEDY)
    assert second.status_code == 200, second.text
    assert second.headers[REPLICA_HEADER] != holder
    direct, params = Session(model, tok), SamplingParams(max_new_tokens=8, temperature=0)
    direct.feed(prompt)
    expected = ["".join(direct.generate(params)) for _ in range(2)]  # uninterrupted, in one process
    assert [first.json()["text"], second.json()["text"]] == expected
    assert second.json()["session"]["position"] == direct.position


def test_the_same_routes_and_errors_as_one_process(cluster):
    assert cluster.get("/health").json()["status"] == "ok"
    missing = cluster.post("/v1/sessions/sess_000000000000000000000000/feed", json={"text": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    with cluster.stream("POST", "/v1/completions", json={"prompt": "def ", "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and len(lines) == 4 + 2  # a chunk a token, the finish, [DONE]


def test_the_gateway_reads_which_session_a_request_is_about():
    assert session_of("POST", "/v1/sessions/sess_0123abcd/generate", b"") == "sess_0123abcd"
    assert session_of("GET", "/v1/sessions/sess_0123abcd", b"") == "sess_0123abcd"
    assert session_of("POST", "/v1/completions", b'{"prompt": "a", "session": "sess_42"}') == "sess_42"
    assert session_of("POST", "/v1/completions", b'{"prompt": "a"}') == ""
    assert session_of("POST", "/v1/completions", b"not json") == ""
    assert session_of("POST", "/v1/completions", b"[1, 2]") == ""
    assert session_of("POST", "/v1/sessions", b"{}") == ""
    assert creates_session("POST", "/v1/sessions") and creates_session("POST", "/v1/sessions/sess_1/fork")
    assert creates_session("POST", "/v1/sessions/import") and not creates_session("GET", "/v1/sessions")


def test_the_documented_config_file_builds(tmp_path):
    doc = (Path(__file__).parents[2] / "docs" / "scale-out.md").read_text()
    config = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of config files
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is app_builder
    keys = tmp_path / "keys"
    keys.write_text("a-key-of-enough-length\n")
    built = app_builder({**app["args"], "model": str(BYTE_MODEL), "api_keys_file": str(keys)})
    assert isinstance(built, serve.Application)
    with pytest.raises(SystemExit):  # a key that is not a flag is refused as the command line refuses it
        app_builder({"no_such_flag": 2})
