import os
import stat

import pytest
import torch

import mambastep
from mambastep.models.state import ModelState, StateError

from conftest import make_hf_checkpoint


@pytest.fixture(params=["mamba", "mamba2"])
def model(request, tmp_path):
    return mambastep.load(make_hf_checkpoint(tmp_path / request.param, family=request.param))


def _prefilled(model, b=2, l=11, seed=0):
    tokens = torch.randint(0, model.config.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))
    return model.prefill(tokens)


def test_save_load_gives_bitwise_identical_next_logits(model, tmp_path):
    _, state = _prefilled(model)
    token = torch.tensor([3, 5])
    expected, _ = model.step(token, state)
    state.save(tmp_path / "s.state")
    loaded = mambastep.load_state(tmp_path / "s.state", model)
    got, _ = model.step(token, loaded)
    assert torch.equal(got, expected)


def test_state_passed_in_stays_valid(model):
    _, state = _prefilled(model)
    before = state.clone()
    model.step(torch.tensor([1, 2]), state)
    model.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]), state)
    for a, b in zip(state.layers, before.layers):
        assert torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv)


def test_select_and_cat_round_trip(model):
    _, state = _prefilled(model, b=3)
    parts = [state.select([i]) for i in range(3)]
    joined = ModelState.cat(parts)
    for a, b in zip(joined.layers, state.layers):
        assert torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv)
    swapped = state.select([2, 0])
    assert swapped.batch_size == 2
    assert torch.equal(swapped.layers[0].ssm[0], state.layers[0].ssm[2])


def test_nbytes_counts_every_tensor(model):
    state = model.new_state(batch_size=3)
    c = model.config
    conv = c.d_inner if c.family == "mamba" else c.conv_dim
    ssm = c.d_inner * c.d_state if c.family == "mamba" else c.n_heads * c.head_dim * c.d_state
    assert state.nbytes == 3 * c.n_layer * 4 * ((c.d_conv - 1) * conv + ssm)


def test_state_of_another_model_is_refused(model, tmp_path):
    other = mambastep.load(make_hf_checkpoint(tmp_path / "other", family=model.config.family, state_size=6))
    _, state = _prefilled(other)
    state.save(tmp_path / "other.state")
    with pytest.raises(StateError, match="not of this model"):
        mambastep.load_state(tmp_path / "other.state", model)
    with pytest.raises(StateError, match="another model"):
        model.step(torch.tensor([1, 2]), state)


def test_corrupt_and_missing_state_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no state file"):
        mambastep.load_state(tmp_path / "nothing.state", model)
    _, state = _prefilled(model)
    path = tmp_path / "s.state"
    state.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="not a readable state file"):
        mambastep.load_state(path, model)
    path.write_bytes(b"garbage")
    with pytest.raises(StateError):
        mambastep.load_state(path, model)


def test_a_session_file_is_not_a_state_file(model, tmp_path):
    path = tmp_path / "chat.session"
    mambastep.Session(model).save(path)
    with pytest.raises(StateError, match="a mambastep session file, not a state file: read it with Session.load"):
        mambastep.load_state(path, model)


def test_saving_into_a_missing_folder_names_the_folder(model, tmp_path):
    for save, name in ((model.new_state(1).save, "s.state"), (mambastep.Session(model).save, "s.session")):
        path = tmp_path / "missing" / name
        with pytest.raises(FileNotFoundError) as err:
            save(path)
        assert str(err.value) == f"cannot write {path}: there is no folder {path.parent}"
    assert not (tmp_path / "missing").exists()


def test_a_checkpoint_gets_the_usual_file_mode_and_a_state_its_owners_only(model, tmp_path):
    umask = os.umask(0o022)
    try:
        mambastep.save(model, tmp_path / "copy")
        model.new_state(1).save(tmp_path / "s.state")
    finally:
        os.umask(umask)
    files = [*(tmp_path / "copy").iterdir(), tmp_path / "s.state"]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "s.state": 0o600}
    assert mambastep.load(tmp_path / "copy").weights_digest() == model.weights_digest()


def test_batch_mismatch_is_an_error(model):
    state = model.new_state(batch_size=2)
    with pytest.raises(StateError, match="2 sequences"):
        model.step(torch.tensor([1, 2, 3]), state)


def test_state_saved_with_other_weights_is_refused_unless_asked_for(model, tmp_path):
    """Same architecture, other weights (a fine-tuned variant): an error naming both digests,
    unless ``other_weights``; the same weights in another model object load."""
    path = make_hf_checkpoint(tmp_path / "variant", family=model.config.family, seed=1)
    variant = mambastep.load(path)
    assert variant.config.fingerprint == model.config.fingerprint
    assert variant.weights_digest() != model.weights_digest()
    _, state = _prefilled(variant)
    state.save(tmp_path / "v.state")
    with pytest.raises(
        StateError,
        match=f"saved with weights {variant.weights_digest()}, but this model's weights are {model.weights_digest()}",
    ):
        mambastep.load_state(tmp_path / "v.state", model)
    loaded = ModelState.load(tmp_path / "v.state", model, other_weights=True)
    assert all(torch.equal(a.ssm, b.ssm) for a, b in zip(loaded.layers, state.layers))
    again = mambastep.load(path)  # the same checkpoint, loaded again: the same digest
    assert again.weights_digest() == variant.weights_digest()
    assert torch.equal(
        again.step(torch.tensor([1, 2]), ModelState.load(tmp_path / "v.state", again))[0],
        variant.step(torch.tensor([1, 2]), state)[0],
    )


def test_the_weights_digest_follows_the_weights(model):
    digest = model.weights_digest()
    _prefilled(model)
    assert model.weights_digest() == digest  # running the model changes nothing
    with torch.no_grad():
        model.backbone.layers[0].mixer.D.add_(1e-3)  # an in-place update
    assert model.weights_digest() != digest
    with torch.no_grad():
        model.backbone.layers[0].mixer.D.sub_(1e-3)
    assert model.weights_digest() == digest  # the same values again
    assert model.to(torch.bfloat16).weights_digest() != digest


def test_a_state_file_without_a_weights_digest_loads_with_a_warning(model, tmp_path, caplog):
    """Files of format version 1 record the architecture only."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, state = _prefilled(model)
    state.save(tmp_path / "s.state")
    with safe_open(str(tmp_path / "s.state"), framework="pt") as f:
        metadata = f.metadata()
    old = {key: value for key, value in metadata.items() if key != "weights"} | {"version": "1"}
    save_file(load_file(str(tmp_path / "s.state")), str(tmp_path / "old.state"), metadata=old)
    with caplog.at_level("WARNING"):
        loaded = mambastep.load_state(tmp_path / "old.state", model)
    assert "records no weights digest" in caplog.text
    assert all(torch.equal(a.ssm, b.ssm) for a, b in zip(loaded.layers, state.layers))
