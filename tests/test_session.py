"""Session: chunked feeding, rollback, fork, generation, save/load across processes, crash-safe files."""

import copy
import gc
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import mambastep
from mambastep import SamplingParams, Session, StateError, generate
from mambastep.files.tokenizer import ByteTokenizer
from mambastep.memory import rss_bytes
from mambastep.settings import EngineSettings

# A stream read in other chunks runs the same maths in another order: fp32 rounding differs.
TOL = dict(atol=1e-4, rtol=1e-4)
SMALL = dict(max_rollback=300, checkpoint_every=64)  # several snapshots within a short stream


pytestmark = pytest.mark.usefixtures("one_thread")


def _spread(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Move the random weights apart, so that outputs depend on the input (and greedy text varies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval().configure(EngineSettings())


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def model(request):
    torch.manual_seed(0)
    if request.param == "mamba":
        config = mambastep.MambaConfig(d_model=16, n_layer=2, vocab_size=300, d_state=4)
    else:
        config = mambastep.Mamba2Config(d_model=16, n_layer=2, vocab_size=300, d_state=8, head_dim=8)
    return _spread(mambastep.families.family_of(config).model(config), 0, 0.2)


@pytest.fixture(scope="module")
def byte_model():
    """A tiny byte-level Mamba whose tied embedding is shrunk, so that sampling gives varied bytes."""
    torch.manual_seed(0)
    model = mambastep.MambaLM(mambastep.MambaConfig(d_model=16, n_layer=2, vocab_size=256, d_state=4))
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(0.3)
    return model.eval().configure(EngineSettings())


def ids(n: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def fed(model, tokens, **settings) -> Session:
    session = Session(model, **settings)
    session.feed(tokens)
    return session


def assert_same_point(a: Session, b: Session, exact: bool = False) -> None:
    """Same position, same recent tokens, same logits and state; all bitwise if ``exact``
    (else a rollback may have left one session with a shorter history)."""
    assert a.position == b.position
    kept = min(len(a.history), len(b.history))
    assert torch.equal(a.history[len(a.history) - kept :], b.history[len(b.history) - kept :])
    assert not exact or len(a.history) == len(b.history)
    tol = dict(atol=0, rtol=0) if exact else TOL
    torch.testing.assert_close(a.logits, b.logits, **tol)
    for la, lb in zip(a.state.layers, b.state.layers):
        torch.testing.assert_close(la.conv, lb.conv, **tol)
        torch.testing.assert_close(la.ssm, lb.ssm, **tol)


# feed


def test_random_chunks_equal_feeding_at_once(model):
    tokens = ids(5000)
    whole = fed(model, tokens)
    last, _ = model.prefill(tokens[None])
    torch.testing.assert_close(whole.logits, last, **TOL)
    gen, sizes = torch.Generator().manual_seed(1), [1, 2, 3, 7, 255, 256, 257, 2047, 2049]
    chunked, at, kinds = Session(model), 0, [torch.Tensor, np.ndarray, list]
    while at < len(tokens):
        size = sizes[int(torch.randint(len(sizes), (), generator=gen))]
        chunk = tokens[at : at + size]
        kind = kinds[at % 3]
        chunked.feed(chunk if kind is torch.Tensor else chunk.numpy() if kind is np.ndarray else chunk.tolist())
        at += size
    assert_same_point(chunked, whole)
    assert chunked.position == 5000 and torch.equal(chunked.history, tokens[-len(chunked.history) :])


def test_one_token_at_a_time_equals_the_decode_step(model):
    tokens = ids(40, seed=2)
    session = Session(model)
    state = model.new_state(1)
    for token in tokens:
        session.feed([int(token)])
        last, state = model.step(token[None], state)
    torch.testing.assert_close(session.logits, last, **TOL)


def test_a_long_list_is_fed_in_pieces(model, monkeypatch):
    monkeypatch.setattr(mambastep.runtime.session, "FEED_PIECE", 1000)
    tokens = ids(4321, seed=3)
    assert_same_point(fed(model, tokens.tolist()), fed(model, tokens), exact=True)


def test_text_and_bytes_are_byte_ids(byte_model):
    text = "Mamba reads é and 🐍 as bytes"
    as_text = Session(byte_model, ByteTokenizer())
    as_text.feed(text)
    assert_same_point(as_text, fed(byte_model, text.encode()), exact=True)
    assert_same_point(as_text, fed(byte_model, list(text.encode())), exact=True)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, 2, 300], "token id 300 at offset 2"),
        ([-1], "token id -1 at offset 0"),
        ([1.0, 2.0], "integers"),
        (torch.zeros(2, 3, dtype=torch.long), "1-D"),
        (torch.tensor([True]), "integers"),
        ("text", "no tokenizer"),
    ],
)
def test_bad_chunks_are_refused_and_change_nothing(model, bad, message):
    session = fed(model, ids(10))
    before = session.logits
    with pytest.raises(ValueError, match=message):
        session.feed(bad)
    assert session.position == 10 and torch.equal(session.logits, before)


def test_a_bad_id_late_in_a_long_chunk_changes_nothing(model, monkeypatch):
    monkeypatch.setattr(mambastep.runtime.session, "FEED_PIECE", 100)
    session = Session(model)
    with pytest.raises(ValueError, match="offset 999"):
        session.feed(ids(999).tolist() + [300])
    assert session.position == 0 and session.logits is None
    session.feed([])
    assert session.position == 0


def test_settings_are_checked(model):
    with pytest.raises(ValueError, match="max_rollback must be an integer >= 0, got -1"):
        Session(model, max_rollback=-1)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        Session(model, checkpoint_every=0)


# rollback, checkpoints, fork


def test_rollback_then_refeed_equals_never_having_fed(model):
    x, y, z = ids(1000, 1), ids(250, 2), ids(100, 3)
    session = fed(model, x, **SMALL)
    for chunk in y.split(37):
        session.feed(chunk)
    session.rollback_tokens(250)
    assert_same_point(session, fed(model, x, **SMALL))
    session.feed(z)
    assert_same_point(session, fed(model, torch.cat([x, z]), **SMALL))


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200, 300])
def test_rollback_tokens_is_exact_for_any_n_within_max_rollback(model, n):
    tokens = ids(1000, 4)
    session = fed(model, tokens, **SMALL)
    assert session.rollback_limit >= SMALL["max_rollback"]
    session.rollback_tokens(n)
    assert_same_point(session, fed(model, tokens[: 1000 - n], **SMALL))


def test_rolling_back_too_far_is_an_error_that_changes_nothing(model):
    session = fed(model, ids(1000), **SMALL)
    before, limit = session.logits, session.rollback_limit
    for n, message in [(limit + 1, f"can undo at most {limit}"), (-1, "n must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            session.rollback_tokens(n)
        assert session.position == 1000 and torch.equal(session.logits, before)
    short = fed(model, ids(3))
    with pytest.raises(ValueError, match="can undo at most 3"):
        short.rollback_tokens(4)
    short.rollback_tokens(3)
    assert short.position == 0 and short.logits is None


def test_rollback_uses_up_the_reach_and_reading_gives_it_back(model):
    session = fed(model, ids(1000), **SMALL)
    session.rollback_tokens(250)
    assert 50 <= session.rollback_limit < 300
    session.feed(ids(400, 5))
    assert session.rollback_limit >= 300


def test_checkpoint_and_rollback_to_it_are_exact(model):
    x = ids(700)
    session = fed(model, x, **SMALL)
    mark = session.checkpoint()
    reference = session.fork()
    session.feed(ids(500, 1))
    session.rollback(mark)
    assert_same_point(session, reference, exact=True)
    session.feed(ids(20, 2))
    session.rollback(mark)  # a checkpoint can be returned to again
    assert_same_point(session, reference, exact=True)
    session.rollback_tokens(300)  # the snapshots came back with it
    assert_same_point(session, fed(model, x[:400], **SMALL))
    with pytest.raises(ValueError, match=r"no checkpoint 7 in this session; known: \[0\]"):
        session.rollback(7)


def test_a_fork_is_independent(model):
    x, y, z = ids(600, 1), ids(300, 2), ids(200, 3)
    original = fed(model, x, **SMALL)
    mark = original.checkpoint()
    copy = original.fork()
    unchanged = original.fork()
    copy.feed(y)
    assert_same_point(original, unchanged, exact=True)
    original.feed(z)
    assert_same_point(copy, fed(model, torch.cat([x, y]), **SMALL))
    copy.rollback_tokens(100)
    copy_mark = copy.checkpoint()
    assert_same_point(original, fed(model, torch.cat([x, z]), **SMALL))
    copy.rollback(mark)  # checkpoints made before the fork are shared
    assert_same_point(copy, unchanged, exact=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        original.rollback(copy_mark + 1)


# generate


def test_generate_continues_the_stream_and_reads_what_it_generates(byte_model):
    tok = ByteTokenizer()
    prompt, params = "Mamba is", SamplingParams(seed=3, max_new_tokens=30)
    session = Session(byte_model, tok)
    session.feed(prompt)
    expected = "".join(generate(byte_model, tok, prompt, params))
    explored = session.fork()
    assert "".join(explored.generate(params)) == expected
    assert session.position == len(prompt)  # the fork generated, not the session
    assert explored.position == len(prompt) + 30
    generated = explored.history[len(prompt) :]
    assert tok.decode(generated.tolist()) == expected
    assert_same_point(explored, fed(byte_model, torch.cat([torch.tensor(list(prompt.encode())), generated])))
    assert "".join(session.generate(params, max_new_tokens=10)) == expected[:10]


def test_generate_stops_at_a_stop_string_and_reads_it(byte_model):
    tok = ByteTokenizer()
    session = Session(byte_model, tok)
    session.feed("Hello")
    full = "".join(session.fork().generate(seed=5, max_new_tokens=40))
    stop = next(full[k : k + 2] for k in range(5, 38) if full[k : k + 2].isascii() and full[k : k + 2].isprintable())
    text = "".join(session.generate(seed=5, max_new_tokens=40, stop=(stop,)))
    assert text == full[: full.find(stop)]
    assert tok.decode(session.history[5:].tolist()) == text + stop  # the model read the stop string


def test_a_generation_in_progress_blocks_changes(byte_model):
    session = Session(byte_model, ByteTokenizer())
    with pytest.raises(ValueError, match="feed at least one token"):
        session.generate()
    session.feed("abc")
    pieces = session.generate(seed=1, max_new_tokens=20)
    next(pieces)
    for change in (lambda: session.feed("x"), lambda: session.rollback_tokens(1), lambda: session.generate()):
        with pytest.raises(ValueError, match="still running"):
            change()
    pieces.close()  # an abandoned generation still counts what it generated
    assert 3 < session.position <= 23
    session.feed("x")
    with pytest.raises(ValueError, match="no tokenizer"):
        fed(byte_model, [1]).generate()


# files


def test_save_and_load_round_trip(model, tmp_path):
    session = fed(model, ids(1000), **SMALL)
    session.rollback_tokens(10)
    path = tmp_path / "s.session"
    session.save(path)
    loaded = Session.load(path, model)
    assert_same_point(loaded, session, exact=True)
    assert (loaded.max_rollback, loaded.checkpoint_every, loaded.rollback_limit) == (300, 64, session.rollback_limit)
    session.rollback_tokens(session.rollback_limit)
    loaded.rollback_tokens(loaded.rollback_limit)
    assert_same_point(loaded, session, exact=True)
    Session(model).save(path)
    empty = Session.load(path, model)
    assert empty.position == 0 and empty.logits is None
    assert not list(tmp_path.glob(".*.tmp"))


CHILD_CONTINUE = """
import json, sys
import mambastep
from mambastep import Session
model = mambastep.load(sys.argv[1])
session = Session.load(sys.argv[2], model, mambastep.load_tokenizer(sys.argv[1]))
session.feed(" and then")
out = {}
for name, params in [("greedy", dict(temperature=0)), ("sampled", dict(seed=11, top_p=0.9))]:
    branch = session.fork()
    out[name] = "".join(branch.generate(max_new_tokens=40, **params))
    out[name + "_ids"] = branch.history[-40:].tolist()
print(json.dumps(out))
"""


def test_save_in_one_process_continue_in_another(byte_model, tmp_path):
    model_dir = mambastep.save(byte_model, tmp_path / "model", extra_config={"tokenizer": "bytes"})
    session = Session(byte_model, ByteTokenizer())
    session.feed("The stream so far, long enough to matter. " * 20)
    session.save(tmp_path / "s.session")
    result = subprocess.run(
        [sys.executable, "-c", CHILD_CONTINUE, str(model_dir), str(tmp_path / "s.session")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout)
    session.feed(" and then")  # the uninterrupted run
    for name, params in [("greedy", dict(temperature=0)), ("sampled", dict(seed=11, top_p=0.9))]:
        branch = session.fork()
        assert "".join(branch.generate(max_new_tokens=40, **params)) == child[name]
        assert branch.history[-40:].tolist() == child[name + "_ids"]
    assert len(set(child["sampled_ids"])) > 3


CHILD_KILLED_IN_SAVE = """
import os, sys, time
import mambastep
from mambastep import Session
session = Session(mambastep.load(sys.argv[1]))
session.feed(list(range(200)))
session.save(sys.argv[2])

def stall(fd):  # the new file is written but not yet synced nor renamed
    print("writing", flush=True)
    time.sleep(60)

os.fsync = stall
session.feed(list(range(50)))
session.save(sys.argv[2])
"""


def test_a_writer_killed_during_save_leaves_the_previous_file(byte_model, tmp_path):
    model_dir = mambastep.save(byte_model, tmp_path / "model", extra_config={"tokenizer": "bytes"})
    path = tmp_path / "s.session"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_KILLED_IN_SAVE, str(model_dir), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "writing\n"
        assert list(tmp_path.glob(".s.session.*.tmp"))  # the half-done save
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert Session.load(path, byte_model).position == 200


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(model, tmp_path, monkeypatch):
    path = tmp_path / "s.session"
    fed(model, ids(50)).save(path)
    before = path.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        fed(model, ids(80)).save(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_corrupt_truncated_and_foreign_files_are_clear_errors(model, tmp_path):
    path = tmp_path / "s.session"
    with pytest.raises(FileNotFoundError, match="no session file at"):
        Session.load(path, model)
    fed(model, ids(500)).save(path)
    data = path.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "not a readable session file"),
        "garbage": (b"\x00" * 64, "not a readable session file"),
        "flipped": (data[:-10] + bytes([data[-10] ^ 1]) + data[-9:], "checksum mismatch"),
    }
    for name, (content, message) in cases.items():
        path.write_bytes(content)
        with pytest.raises(StateError, match=message) as err:
            Session.load(path, model)
        assert str(path) in str(err.value), name
    model.new_state(1).save(path)  # a plain state file
    with pytest.raises(
        StateError, match=r"a mambastep state file, not a session file: read it with mambastep\.load_state"
    ):
        Session.load(path, model)
    other = mambastep.MambaLM(mambastep.MambaConfig(d_model=8, n_layer=1, vocab_size=300, d_state=4)).eval()
    fed(other, ids(20)).save(path)
    with pytest.raises(StateError, match="not of this model"):
        Session.load(path, model)


# memory


def test_a_long_stream_keeps_rss_flat(byte_model):
    """200k tokens in chunks of random sizes: after warm-up, resident memory stays within a few MiB."""
    tokens = ids(200_000, seed=9, vocab=256)
    sizes = torch.randint(1, 4000, (400,), generator=torch.Generator().manual_seed(9)).tolist()
    session, at, warm, peak = Session(byte_model), 0, None, 0
    for i, size in enumerate(sizes):
        if at >= len(tokens):
            break
        chunk = tokens[at : at + size]
        session.feed(chunk if i % 2 else chunk.tolist())
        at += size
        if at >= 20_000 and warm is None:
            gc.collect()
            warm = rss_bytes()
        peak = max(peak, rss_bytes()) if warm is not None else 0
    assert at >= len(tokens) and session.position == len(tokens)
    assert torch.isfinite(session.logits).all()
    assert session.nbytes < 64 * 1024
    assert peak - warm < 8 * 2**20, f"RSS grew by {(peak - warm) / 2**20:.1f} MiB after warm-up"


def test_a_session_saved_with_other_weights_is_refused_unless_asked_for(model, tmp_path):
    session = Session(model)
    session.feed(ids(40))
    session.save(tmp_path / "a.session")
    variant = copy.deepcopy(model)
    with torch.no_grad():
        variant.backbone.layers[0].mixer.D.add_(0.1)
    with pytest.raises(StateError, match="saved with weights .* other_weights=True"):
        Session.load(tmp_path / "a.session", variant)
    resumed = Session.load(tmp_path / "a.session", variant, other_weights=True)
    assert resumed.position == 40 and torch.equal(resumed.history, session.history)
