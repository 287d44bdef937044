"""`mambastep stream` end to end through pipes: reports, save, resume, continuations, Ctrl-C.

Bytes go to a small byte-level model with random weights (the stream's mechanics do not need
trained ones); text lines go to the bundled default model through its tokenizer."""

import io
import json
import select
import signal
import subprocess
import sys

import pytest
import torch

import mambastep
from mambastep import SamplingParams, Session
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.runtime.stream import StreamSettings, run_stream

TEXT = ("A stream of log lines, read as it arrives: état 🐍 ok\n" * 60).encode()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A byte-level Mamba-2 of 2 layers, random weights."""
    torch.manual_seed(0)
    small = mambastep.Mamba2LM(mambastep.Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, head_dim=16))
    return mambastep.save(small, tmp_path_factory.mktemp("bytes"), extra_config={"tokenizer": "bytes"})


@pytest.fixture(scope="module")
def model(model_dir):
    return mambastep.load(model_dir)


@pytest.fixture(scope="module")
def command(model_dir) -> list[str]:
    return [sys.executable, "-m", "mambastep.cli", "stream", "--model", str(model_dir), "--threads", "1"]


@pytest.fixture(scope="module")
def stream(command):
    """Runs `mambastep stream` on the byte-level model with ``data`` on stdin."""

    def run(*args, data: bytes, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], input=data, capture_output=True, timeout=timeout)

    return run


def reports(stderr: bytes) -> list[dict]:
    """The JSON reports (other lines, such as a first-use kernel build notice, are skipped)."""
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


def test_a_pipe_is_read_saved_and_resumed(model, stream, tmp_path):
    first, second = tmp_path / "a.session", tmp_path / "b.session"
    result = stream("--save-state", str(first), "--json", "--report-every", "0", data=TEXT[:1500])
    assert result.returncode == 0, result.stderr
    events = reports(result.stderr)
    assert events[-1]["event"] == "end" and events[-1]["tokens"] == 1500 and events[-1]["saved"] == str(first)
    assert all(e["state_bytes"] == model.new_state(1).nbytes and e["rss_bytes"] > 0 for e in events)
    assert {"tokens_per_s", "chunk_ms", "chunk_ms_max", "session_bytes"} <= set(events[0])
    result = stream("--resume", str(first), "--save-state", str(second), "--json", data=TEXT[1500:])
    assert result.returncode == 0, result.stderr
    end = reports(result.stderr)[-1]
    assert end["tokens"] == len(TEXT) and end["tokens_this_run"] == len(TEXT) - 1500
    resumed, direct = Session.load(second, model), Session(model)
    direct.feed(TEXT)
    assert resumed.position == direct.position and torch.equal(resumed.history, direct.history)
    torch.testing.assert_close(resumed.logits, direct.logits, atol=1e-4, rtol=1e-4)


def test_a_session_file_is_never_replaced_unasked(model, stream, tmp_path):
    path = tmp_path / "s.session"
    assert stream("--save-state", str(path), data=TEXT[:300]).returncode == 0
    saved = path.read_bytes()
    refused = stream("--save-state", str(path), data=TEXT[300:400])
    assert refused.returncode == 1 and path.read_bytes() == saved
    assert f"{path} already holds a session: pass --resume {path} to continue it" in refused.stderr.decode()
    assert stream("--resume", str(path), data=TEXT[300:400]).returncode == 0  # saved back to the file resumed
    assert stream("--resume", str(path), data=TEXT[400:500]).returncode == 0  # a second run on the same file
    assert Session.load(path, model).position == 500
    saved = path.read_bytes()
    assert stream("--resume", str(path), "--no-save", data=TEXT[500:600]).returncode == 0
    assert path.read_bytes() == saved
    assert stream("--save-state", str(path), "--overwrite", data=TEXT[:50]).returncode == 0
    assert Session.load(path, model).position == 50


def test_saving_over_another_session_is_checked_before_reading(model, tmp_path):
    first, second = tmp_path / "a.session", tmp_path / "b.session"
    for path in (first, second):
        Session(model).save(path)
    with pytest.raises(FileExistsError, match="already holds a session"):
        StreamSettings(resume=first, save_state=second)
    StreamSettings(resume=first, save_state=first)
    StreamSettings(resume=first, save_state=tmp_path / "." / "a.session")  # the same file by another name
    StreamSettings(resume=first, save_state=second, overwrite=True)


def test_reports_continue_while_the_input_is_idle(command):
    child = subprocess.Popen(
        [*command, "--json", "--report-every", "0.2"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        child.stdin.write(TEXT[:100])
        child.stdin.flush()
        events = []
        while len([e for e in events if e["tokens"] == 100]) < 3:  # reports go on with no new input
            ready, _, _ = select.select([child.stderr], [], [], 120)
            assert ready, f"no report for 120 s while the input is open and idle; had {events}"
            events += reports(child.stderr.readline())
        assert all(e["event"] == "progress" for e in events)
        child.stdin.close()
        assert child.wait(timeout=60) == 0
        assert reports(child.stderr.read())[-1]["event"] == "end"
    finally:
        child.kill()
        child.stderr.close()


def test_continuations_come_from_a_fork(model, stream, tmp_path):
    path = tmp_path / "s.session"
    args = ["--generate-every", "64", "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]
    result = stream(*args, "--save-state", str(path), "--json", data=TEXT[:200])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [line["tokens"] for line in lines] == [64, 128, 192]
    session = Session(model, mambastep.ByteTokenizer())
    for line in lines:
        session.feed(TEXT[session.position : line["tokens"]])
        assert "".join(session.fork().generate(SamplingParams(temperature=0, max_new_tokens=8))) == line["continuation"]
    assert Session.load(path, model).position == 200  # the stream itself read only its input


def test_continuations_in_text_are_marked(model):
    tok, out = mambastep.ByteTokenizer(), io.StringIO()
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    settings = StreamSettings(input="bytes", generate_every=100, params=params)
    run_stream(settings, model, tok, io.BytesIO(TEXT[:250]), out, io.StringIO())
    headers = [line for line in out.getvalue().splitlines() if line.startswith("--- continuation")]
    assert headers == ["--- continuation after 100 tokens ---", "--- continuation after 200 tokens ---"]


def test_token_ids(model, stream, tmp_path):
    path = tmp_path / "s.session"
    result = stream("--ids", "--save-state", str(path), data=b"1 2 3\n4 5\n6")
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().splitlines()[-1].startswith("end") and "tokens            6" in result.stderr.decode()
    assert Session.load(path, model).history.tolist() == [1, 2, 3, 4, 5, 6]
    result = stream("--ids", data=b"1 2 x3")
    assert result.returncode == 1 and "'x3' is not a token id" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_ctrl_c_saves_the_state(model, command, tmp_path):
    path = tmp_path / "s.session"
    child = subprocess.Popen(
        [*command, "--save-state", str(path), "--json", "--report-every", "0"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        child.stdin.write(TEXT[:700])
        child.stdin.flush()
        tokens = 0
        while tokens < 700:  # wait until the stream has read what was sent
            line = child.stderr.readline()
            assert line, "the stream ended early"
            tokens = reports(line)[0]["tokens"] if line.startswith(b"{") else 0
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 130
        last = reports(child.stderr.read())[-1]
    finally:
        child.kill()
        child.stdin.close()
        child.stderr.close()
    assert last["event"] == "interrupted" and last["tokens"] == 700
    assert Session.load(path, model).position == 700


def run(model, tokenizer, data: bytes, **settings) -> tuple[int, str, list[dict]]:
    out, err = io.StringIO(), io.StringIO()
    status = run_stream(StreamSettings(json=True, **settings), model, tokenizer, io.BytesIO(data), out, err)
    return status, out.getvalue(), reports(err.getvalue().encode())


def test_text_lines_go_through_the_tokenizer():
    model, tok = mambastep.load(DEFAULT_MODEL), mambastep.load_tokenizer(DEFAULT_MODEL)
    status, _, events = run(model, tok, TEXT[:300], input="text")
    assert status == 0 and events[-1]["tokens"] == len(tok.encode(TEXT[:300].decode()))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        run(model, tok, b"ok\n\xff\xfe\n", input="text")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        run(model, tok, "cut é".encode()[:-1], input="text")


def test_bad_input_still_saves_what_was_read(model, tmp_path):
    path = tmp_path / "s.session"
    chunks = io.BytesIO(b"1 2 3 " + b"9" * 10)  # the second read holds an id outside the vocabulary
    settings = StreamSettings(input="ids", save_state=path, read_size=6)
    with pytest.raises(ValueError, match="token id 9999999999 at offset 0"):
        run_stream(settings, model, None, chunks, io.StringIO(), io.StringIO())
    assert Session.load(path, model).history.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(generate_every=-1), "generate-every must be an integer >= 0, got -1"),
        (dict(report_every=-1.0), "report-every must be >= 0 seconds"),
        (dict(save_state="/nonexistent/dir/s.session"), "no directory /nonexistent/dir"),
        (dict(input="ids", generate_every=5), "need a tokenizer"),
    ],
)
def test_settings_are_checked(model, settings, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(model, None, b"", **settings)


def test_bytes_need_a_byte_level_model():
    small = mambastep.MambaLM(mambastep.MambaConfig(d_model=8, n_layer=1, vocab_size=100, d_state=4)).eval()
    with pytest.raises(ValueError, match="--bytes needs a byte-level model"):
        run(small, None, b"abc", input="bytes")
    status, _, events = run(small, None, b"99 0 5", input="ids")
    assert status == 0 and events[-1]["tokens"] == 3
