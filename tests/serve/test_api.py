"""The server over HTTP against the library in process: completions through the official
`openai` client, sessions, keys, batching, and bad input."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import pytest
import torch

import mambastep
from mambastep import SamplingParams, Session
from mambastep.cli import main
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.serve.process import ServeProcess
from mambastep.settings import EngineSettings

from servers import KEYS, client, start_server

pytestmark = pytest.mark.usefixtures("one_thread")  # as the server runs: --threads 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of the bundled model with two API keys, for this module."""
    root = tmp_path_factory.mktemp("serve")
    process = start_server(root / "data", "--api-key", KEYS[0], "--api-key", KEYS[1])
    yield process
    process.stop()


def _metadata(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def _local_text(local, prompt: str, **params) -> str:
    model, tokenizer = local
    return "".join(mambastep.generate(model, tokenizer, prompt, SamplingParams(**params)))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=11)])
def test_the_openai_client_gets_what_generate_gives(server, local, stream, params):
    from openai import OpenAI

    api = OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[0])
    request = dict(model="mambastep-default", prompt="def parse(", max_tokens=40, **params)
    if stream:
        chunks = list(api.completions.create(stream=True, **request))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    else:
        reply = api.completions.create(**request)
        text = reply.choices[0].text
        assert reply.usage.prompt_tokens == len("def parse(") and reply.usage.completion_tokens > 0
    local_params = {k: v for k, v in params.items()}
    assert text == _local_text(local, "def parse(", max_new_tokens=40, **local_params)


def test_several_prompts_n_choices_echo_and_logprobs(server, local):
    with client(server) as http:
        reply = http.post(
            "/v1/completions",
            json=dict(
                prompt=["import ", "class "],
                n=2,
                max_tokens=12,
                temperature=0.7,
                seed=3,
                echo=True,
                logprobs=2,
            ),
        ).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    for c in reply["choices"]:
        prompt = ["import ", "class "][c["index"] // 2]
        seed = 3 + c["index"] % 2
        assert c["text"] == prompt + _local_text(local, prompt, max_new_tokens=12, temperature=0.7, seed=seed)
        lp = c["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(prompt) + 12
        assert all(v <= 0 for v in lp["token_logprobs"][1:])
        assert all(len(top) == 2 for top in lp["top_logprobs"][len(prompt) :])
    assert reply["usage"]["prompt_tokens"] == len("import ") + len("class ")


def test_text_prompts_are_healed_as_generate_heals_them(tmp_path, one_thread):
    """The bundled BPE model reads "def " as "def" and a lone space; the server, as `generate`,
    takes the space back out and starts the completion with a token that begins with it. Token
    prompts are read as they are. Echoed with log-probabilities, a healed prompt is listed as read,
    so the listed tokens join to the choice's text. Both sides run in float32: the server steps
    the four choices as one batch, whose products add in another order than one sequence's; in
    bfloat16 the logits then differ by about 5e-5, enough to flip a draw between two near-equal
    tokens (4e-6 in float32)."""
    model = mambastep.load(DEFAULT_MODEL, dtype=torch.float32, settings=EngineSettings(threads=1))
    tokenizer = mambastep.load_tokenizer(DEFAULT_MODEL)
    process = ServeProcess(DEFAULT_MODEL, tmp_path / "data", "--threads", "1", "--dtype", "float32", timeout=120)
    try:
        with httpx.Client(base_url=process.url, timeout=120) as http:
            for stream in (False, True):
                request = dict(prompt=["def ", "    if "], n=2, max_tokens=16, temperature=0.8, seed=5, echo=True)
                reply = http.post("/v1/completions", json={**request, "stream": stream})
                if stream:
                    texts = {}
                    for line in reply.text.splitlines():
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    texts = [texts[i] for i in range(4)]
                else:
                    texts = [c["text"] for c in reply.json()["choices"]]
                for i, text in enumerate(texts):
                    prompt, params = request["prompt"][i // 2], SamplingParams(max_new_tokens=16, temperature=0.8)
                    local = "".join(mambastep.generate(model, tokenizer, prompt, params, seed=5 + i % 2))
                    assert text == prompt + local
            listed = http.post("/v1/completions", json=dict(prompt="def ", max_tokens=8, echo=True, logprobs=1))
            choice = listed.json()["choices"][0]
            tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
            assert tokens[0] == "def" and tokens[1].startswith(" ")  # the prompt as read, then the healed token
            assert "".join(tokens) == choice["text"]
            assert all(choice["text"].startswith(t, o) for t, o in zip(tokens, offsets))
            ids = tokenizer.encode("def ")
            whole = http.post("/v1/completions", json=dict(prompt=ids, max_tokens=8, temperature=0)).json()
            params = SamplingParams(max_new_tokens=8, temperature=0, eos_token_id=tokenizer.eos_token_id)
            read_whole = [t for _, t in mambastep.generate_tokens(model, [ids], params) if t != tokenizer.eos_token_id]
            assert len(ids) == 2 and whole["usage"]["prompt_tokens"] == 2
            assert whole["choices"][0]["text"] == tokenizer.decode(read_whole)
    finally:
        process.stop()


def test_sixteen_concurrent_requests_get_what_each_gets_alone(server):
    """Greedy: the batch changes a row's logits in the last bits at most, so its tokens only
    where two nearly tie; this model and these prompts have no such tie."""
    prompts = [f"def f{i}(x" for i in range(16)]
    with client(server) as http:
        alone = [
            http.post("/v1/completions", json=dict(prompt=p, max_tokens=24, temperature=0)).json() for p in prompts
        ]
    together: list = [None] * 16

    def ask(i):
        with client(server) as http:
            together[i] = http.post(
                "/v1/completions", json=dict(prompt=prompts[i], max_tokens=24, temperature=0)
            ).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]


def test_a_session_over_http_equals_a_session_in_process(server, local):
    model, tokenizer = local
    here = Session(model, tokenizer)
    with client(server) as http:
        created = http.post("/v1/sessions", json={"prompt": "import sys\n"})
        assert created.status_code == 201
        sid = created.json()["id"]
        here.feed("import sys\n")
        for text in ("def main(argv):\n", "    for arg in argv:\n"):
            fed = http.post(f"/v1/sessions/{sid}/feed", json={"text": text}).json()
            here.feed(text)
            assert fed["position"] == here.position
            reply = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 20, "temperature": 0}).json()
            expected = "".join(here.generate(max_new_tokens=20, temperature=0))
            assert reply["text"] == expected and reply["session"]["position"] == here.position
        # The same file: its checksum covers every tensor and the metadata (whose order in the
        # header safetensors does not fix).
        served = _metadata(http.get(f"/v1/sessions/{sid}/file").content)
        assert served == _metadata(here.to_bytes()) and served["checksum"]


def test_a_fork_is_independent_and_a_rollback_is_exact(server):
    with client(server) as http:
        sid = http.post("/v1/sessions", json={"prompt": "x = [1, 2, 3]\n"}).json()["id"]
        fork = http.post(f"/v1/sessions/{sid}/fork")
        assert fork.status_code == 201
        fid = fork.json()["id"]
        greedy = {"max_tokens": 16, "temperature": 0}
        in_fork = http.post(f"/v1/sessions/{fid}/generate", json=greedy).json()
        assert http.get(f"/v1/sessions/{sid}").json()["position"] == 14  # the fork moved, not the original
        in_original = http.post(f"/v1/sessions/{sid}/generate", json=greedy).json()
        assert in_original["text"] == in_fork["text"]

        # rollback then feed equals never having fed: to a checkpoint, and by a count of tokens
        other = http.post("/v1/sessions", json={"prompt": "y = 2\n"}).json()["id"]
        mark = http.post(f"/v1/sessions/{other}/checkpoints").json()["id"]
        http.post(f"/v1/sessions/{other}/feed", json={"text": "z = y ** 2\n"})
        back = http.post(f"/v1/sessions/{other}/rollback", json={"checkpoint": mark}).json()
        assert back["position"] == 6
        http.post(f"/v1/sessions/{other}/feed", json={"text": "w = 7\n"})
        http.post(f"/v1/sessions/{other}/feed", json={"text": "abc"})
        assert http.post(f"/v1/sessions/{other}/rollback", json={"tokens": 3}).json()["position"] == 12
        never = http.post("/v1/sessions", json={"prompt": "y = 2\nw = 7\n"}).json()["id"]
        a = http.post(f"/v1/sessions/{other}/generate", json=greedy).json()
        b = http.post(f"/v1/sessions/{never}/generate", json=greedy).json()
        assert a["text"] == b["text"] and a["session"]["position"] == b["session"]["position"]
        too_far = http.post(f"/v1/sessions/{never}/rollback", json={"tokens": 10**6})
        assert too_far.status_code == 400 and "cannot roll back" in too_far.json()["error"]["message"]
        assert http.get(f"/v1/sessions/{never}").json()["position"] == b["session"]["position"]  # unchanged


def test_a_downloaded_session_continues_identically_on_another_server(server, tmp_path):
    with client(server) as http:
        sid = http.post("/v1/sessions", json={"tokens": list(b"for i in range(10):\n")}).json()["id"]
        data = http.get(f"/v1/sessions/{sid}/file").content
        here = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 24, "temperature": 0}).json()
    second = start_server(tmp_path / "second")
    try:
        with httpx.Client(base_url=second.url, timeout=120) as other:
            imported = other.post(
                "/v1/sessions/import", content=data, headers={"Content-Type": "application/octet-stream"}
            )
            assert imported.status_code == 201 and imported.json()["position"] == 20
            there = other.post(
                f"/v1/sessions/{imported.json()['id']}/generate", json={"max_tokens": 24, "temperature": 0}
            )
            assert there.json()["text"] == here["text"]
    finally:
        second.stop()


def test_keys_guard_every_route_but_health(server):
    with client(server) as owner:
        sid = owner.post("/v1/sessions", json={"prompt": "a"}).json()["id"]
    for key in (None, "wrong-key-0123456789"):
        with client(server, key) as stranger:
            response = stranger.get("/v1/sessions")
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
            assert stranger.post("/v1/completions", json={"prompt": "a"}).status_code == 401
            assert stranger.get("/health").status_code == 200
    with client(server, KEYS[1]) as other:  # another key: the session does not exist for it
        for method, path, body in [
            ("GET", "", None),
            ("POST", "/feed", {"text": "b"}),
            ("POST", "/generate", {}),
            ("GET", "/file", None),
            ("POST", "/fork", None),
            ("DELETE", "", None),
        ]:
            response = other.request(method, f"/v1/sessions/{sid}{path}", json=body)
            assert response.status_code == 404, (method, path, response.text)
        assert sid not in {s["id"] for s in other.get("/v1/sessions").json()["data"]}
    with client(server) as owner:
        assert owner.get(f"/v1/sessions/{sid}").status_code == 200
        assert owner.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
        assert owner.get(f"/v1/sessions/{sid}").status_code == 404


def test_listening_beyond_loopback_needs_a_key(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err and "--api-key" in err


BAD = [
    ("/v1/completions", {"prompt": "a", "temperature": float("nan")}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**6}, 400),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "a", "surprise": True}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": [1, 2, 300]}, 400),
    ("/v1/completions", {"prompt": "a", "n": 1000}, 400),
    ("/v1/completions", {"prompt": "\ud800 lone surrogate"}, 400),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, 400),
    ("/v1/completions", {"prompt": "a", "session": "sess_none"}, 404),
    ("/v1/sessions", {"tokens": [-1]}, 400),
    ("/v1/sessions", {"prompt": "a", "tokens": [1]}, 400),
    ("/v1/sessions/sess_none/feed", {"text": "a"}, 404),
    ("/v1/sessions/sess_none/generate", {}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_input_is_a_clear_error_and_stores_nothing(server, path, body, status):
    with client(server, KEYS[1]) as http:
        before = http.get("/v1/sessions").json()["total"]
        response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert http.get("/v1/sessions").json()["total"] == before


def test_bad_session_input_changes_nothing(server):
    with client(server, KEYS[1]) as http:
        sid = http.post("/v1/sessions").json()["id"]
        assert http.post(f"/v1/sessions/{sid}/generate", json={}).status_code == 400  # nothing read yet
        before = http.get(f"/v1/sessions/{sid}/file").content
        for body in ({"tokens": [1, 2, 999]}, {"bytes": "not base64!"}, {"text": "a", "tokens": [1]}, {}):
            assert http.post(f"/v1/sessions/{sid}/feed", json=body).status_code == 400
        assert http.post(f"/v1/sessions/{sid}/rollback", json={"checkpoint": 99999}).status_code == 404
        assert http.post(f"/v1/sessions/{sid}/rollback", json={}).status_code == 400
        assert http.get(f"/v1/sessions/{sid}/file").content == before
        fed = http.post(f"/v1/sessions/{sid}/feed", json={"bytes": base64.b64encode(b"ok").decode()}).json()
        assert fed["position"] == 2


def test_a_foreign_or_corrupt_file_is_refused_on_import(server, tmp_path):
    with client(server, KEYS[1]) as http:
        before = http.get("/v1/sessions").json()["total"]
        sid = http.post("/v1/sessions", json={"prompt": "abc"}).json()["id"]
        good = http.get(f"/v1/sessions/{sid}/file").content
        for data in (b"not a session", good[: len(good) // 2], good[:-10] + b"0123456789"):
            response = http.post(
                "/v1/sessions/import", content=data, headers={"Content-Type": "application/octet-stream"}
            )
            assert response.status_code == 400, response.text
        assert http.get("/v1/sessions").json()["total"] == before + 1


def test_a_body_over_the_limit_is_refused(server):
    with client(server) as http:
        response = http.post("/v1/completions", json={"prompt": "x" * (2 << 20)})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_metrics_count_requests_tokens_and_steps(server):
    with client(server) as http:
        http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "mambastep_requests_total",
        "mambastep_tokens_in_total",
        "mambastep_tokens_out_total",
        "mambastep_step_seconds_bucket",
        "mambastep_batch_size_bucket",
        "mambastep_queue_depth",
        "mambastep_sessions_in_memory",
        "mambastep_sessions_stored",
    ):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text


def test_sessions_beyond_the_hot_set_come_back_from_the_store(tmp_path):
    """Two sessions in memory, five used in turn: each continues exactly where it was."""
    small = start_server(tmp_path / "data", "--sessions-in-memory", "2")
    try:
        with httpx.Client(base_url=small.url, timeout=120) as http:
            ids = [http.post("/v1/sessions", json={"prompt": f"n = {i}\n"}).json()["id"] for i in range(5)]
            for sid in ids:
                http.post(f"/v1/sessions/{sid}/feed", json={"text": "print(n)\n"})
            positions = [http.get(f"/v1/sessions/{sid}").json()["position"] for sid in ids]
            assert positions == [15] * 5
            metrics = http.get("/metrics").text
            hot = next(line for line in metrics.splitlines() if line.startswith("mambastep_sessions_in_memory "))
            assert float(hot.split()[1]) <= 2
            listed = http.get("/v1/sessions", params={"offset": 1, "limit": 2}).json()
            assert [s["id"] for s in listed["data"]] == ids[1:3] and listed["total"] == 5
    finally:
        small.stop()


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    busy = start_server(tmp_path / "data", "--queue", "1", "--max-tokens", "1000000")
    endless = {"prompt": "a", "max_tokens": 1000000, "ignore_eos": True, "stream": True}  # until the client leaves
    try:
        with (
            httpx.Client(base_url=busy.url, timeout=120) as http,
            http.stream("POST", "/v1/completions", json=endless) as long,
        ):
            lines = long.iter_lines()  # kept: a closed iterator closes the stream, which cancels the request
            next(lines)  # the first chunk: the long request holds the queue's one place
            response = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    finally:
        busy.stop()
