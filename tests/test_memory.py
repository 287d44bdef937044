"""Weights in transparent huge pages: what moves, what stays, what is freed."""

import gc

import pytest
import torch
from torch import nn

import mambastep
from mambastep import memory
from mambastep.memory import huge_pages_available, in_huge_pages, place_in_huge_pages
from mambastep.models.int8 import quantize_int8
from mambastep.settings import EngineSettings

from conftest import make_hf_checkpoint, random_tokens

needs_huge_pages = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _live_arenas() -> int:
    gc.collect()
    return len(memory._arenas)


@needs_huge_pages
def test_parameters_and_buffers_move_keeping_identity_values_and_ties():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 200), nn.LayerNorm(200), nn.Linear(200, 300, bias=False))
    model[2].weight = model[0].weight  # tied, as a language model's head
    model[1].register_buffer("count", torch.arange(5))
    tensors = [*model.parameters(), *model.buffers()]
    before = [t.clone() for t in tensors]
    moved = place_in_huge_pages(model, min_bytes=0)
    assert moved >= sum(t.nbytes for t in tensors)
    assert all(
        a is b for a, b in zip([*model.parameters(), *model.buffers()], tensors, strict=True)
    )  # the same objects
    assert all(in_huge_pages(t) for t in tensors)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert model[0].weight is model[2].weight
    assert "hg" in _vm_flags(model[0].weight.data_ptr())  # the mapping asked for huge pages (MADV_HUGEPAGE)
    assert place_in_huge_pages(model, min_bytes=0) == 0  # already there


@needs_huge_pages
def test_placed_weights_train():
    model = nn.Linear(64, 64)
    place_in_huge_pages(model, min_bytes=0)
    before = model.weight.detach().clone()
    model(torch.randn(3, 64)).square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert in_huge_pages(model.weight) and not torch.equal(model.weight, before)


@needs_huge_pages
def test_tensors_sharing_a_storage_stay_where_they_are():
    model = nn.Module()
    table = torch.randn(100, 30)
    model.a, model.b = nn.Parameter(table[:50]), nn.Parameter(table[50:])  # two views of one storage
    model.c = nn.Parameter(torch.randn(40, 30))
    assert place_in_huge_pages(model, min_bytes=0) == model.c.nbytes
    assert in_huge_pages(model.c) and not in_huge_pages(model.a) and not in_huge_pages(model.b)
    assert model.a.untyped_storage().data_ptr() == model.b.untyped_storage().data_ptr()


@needs_huge_pages
def test_an_arena_holding_replaced_tensors_is_replaced_and_freed():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    arenas = _live_arenas()
    place_in_huge_pages(model, min_bytes=0)
    assert _live_arenas() == arenas + 1
    model[1] = nn.Linear(100, 100)  # the old layer's weights are no longer in use
    old_weight = model[0].weight.data_ptr()
    assert place_in_huge_pages(model, min_bytes=0) > 0
    assert all(in_huge_pages(p) for p in model.parameters()) and model[0].weight.data_ptr() != old_weight
    assert _live_arenas() == arenas + 1  # the first arena went with its last tensor


@needs_huge_pages
def test_converted_weights_leave_the_arena_and_free_it():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    arenas = _live_arenas()
    place_in_huge_pages(model, min_bytes=0)
    model.to(torch.float64)  # new tensors for every parameter: not moved until placed again
    assert not any(in_huge_pages(p) for p in model.parameters()) and _live_arenas() == arenas


@needs_huge_pages
def test_too_little_to_fill_huge_pages_stays():
    model = nn.Linear(100, 100)
    assert place_in_huge_pages(model) == 0 and not in_huge_pages(model.weight)


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(memory, "huge_pages_available", lambda: False)
    model = nn.Linear(100, 100)
    assert place_in_huge_pages(model, min_bytes=0) == 0 and not in_huge_pages(model.weight)


@needs_huge_pages
@pytest.mark.parametrize("huge_pages", [True, False])
def test_loading_places_the_weights_as_the_settings_say(tmp_path, huge_pages):
    """A checkpoint of 8 MiB (a 16,384 x 128 embedding) and the same model's next token either way;
    int8 weights made afterwards go where the float ones were, and the float ones are freed."""
    path = make_hf_checkpoint(tmp_path / "m", vocab_size=16384, hidden_size=128)
    model = mambastep.load(path, settings=EngineSettings(huge_pages=huge_pages))
    assert all(in_huge_pages(p) == huge_pages for p in model.parameters())
    plain = mambastep.load(path, settings=EngineSettings(huge_pages=False))
    tokens = random_tokens(16384, 2, 9)
    assert torch.equal(model.prefill(tokens)[0], plain.prefill(tokens)[0])
    arenas = _live_arenas()
    quantize_int8(model)
    assert all(in_huge_pages(t) == huge_pages for t in (*model.parameters(), *model.buffers()))
    assert _live_arenas() == arenas  # a new arena for the int8 weights, the float one freed
