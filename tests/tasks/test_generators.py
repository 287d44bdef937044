"""Invariants of the synthetic task generators (mambastep.evidence.tasks): layout, solvability, randomness, sizes."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch

from mambastep.evidence.tasks import IGNORE, TASKS, InductionHeads, SelectiveCopying, Task, TaskBatch, task
from mambastep.evidence.tasks.base import validation_seed
from mambastep.evidence.tasks.selective_copying import distinct_sorted_positions

COPYING_CONFIGS = [  # (vocab_size, n_memorize, length)
    (16, 16, 100),
    (16, 16, 32),  # shortest: no noise at all
    (5, 3, 40),
    (4, 1, 2),
]
INDUCTION_CONFIGS = [(16, 64), (16, 4), (4, 10), (30, 7)]  # (vocab_size, length)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def accuracy(predictions: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of scored entries where ``predictions`` (b, l) equals the target."""
    mask = batch.scored_mask
    return (predictions[mask] == batch.targets[mask]).double().mean().item()


# ---------------------------------------------------------------- oracles (read tokens only, never targets)


def copying_oracle(tokens: torch.Tensor, t: SelectiveCopying) -> torch.Tensor:
    """(b, l): scan left to right, keep the data tokens seen, answer the j-th one at the j-th marker."""
    out = torch.full_like(tokens, -1)
    for row, seq in enumerate(tokens.tolist()):
        seen, markers = [], 0
        for i, tok in enumerate(seq):
            if tok == t.marker_token:
                out[row, i] = seen[markers] if markers < len(seen) else -1
                markers += 1
            elif tok != t.noise_token:
                seen.append(tok)
    return out


def induction_oracle(tokens: torch.Tensor, t: InductionHeads) -> torch.Tensor:
    """(b, l): remember the token after the first trigger, answer it when the trigger comes again."""
    out = torch.full_like(tokens, -1)
    for row, seq in enumerate(tokens.tolist()):
        recalled, after_trigger = None, False
        for i, tok in enumerate(seq):
            if after_trigger and recalled is None:
                recalled = tok
            if tok == t.trigger_token:
                if recalled is not None:
                    out[row, i] = recalled
                after_trigger = True
    return out


# ---------------------------------------------------------------- selective copying


@pytest.mark.parametrize("vocab_size,n_memorize,length", COPYING_CONFIGS)
def test_copying_layout(vocab_size, n_memorize, length):
    t = SelectiveCopying(vocab_size=vocab_size, n_memorize=n_memorize)
    b, m = 64, n_memorize
    batch = t.sample(b, length, gen(1))
    assert batch.tokens.shape == batch.targets.shape == (b, length)
    assert batch.tokens.dtype == batch.targets.dtype == torch.int64
    assert t.noise_token == 0 and t.marker_token == vocab_size - 1
    region, answers = batch.tokens[:, : length - m], batch.tokens[:, length - m :]
    assert (answers == t.marker_token).all()
    is_data = region != t.noise_token
    assert (is_data.sum(dim=1) == m).all(), "exactly n_memorize data tokens per sequence"
    data = region[is_data]
    assert ((data >= 1) & (data <= vocab_size - 2)).all(), "noise and marker never appear as data"
    # Scored targets are the data tokens in order of appearance; IGNORE elsewhere.
    in_order = region[is_data].view(b, m)  # boolean indexing keeps row-major order
    assert torch.equal(batch.targets[:, length - m :], in_order)
    assert (batch.targets[:, : length - m] == IGNORE).all()
    assert torch.equal(batch.scored_positions, torch.arange(length - m, length))
    assert batch.n_scored == b * m
    assert torch.equal(batch.scored_mask, batch.targets != IGNORE)


def test_copying_oracle_solves_and_constant_guess_is_chance():
    t = SelectiveCopying()
    batch = t.sample(128, 96, gen(2))
    assert accuracy(copying_oracle(batch.tokens, t), batch) == 1.0
    # A "model" that always answers the most frequent data token of a training set.
    train = t.sample(1000, 96, gen(3))
    most_frequent = Counter(train.targets[train.scored_mask].tolist()).most_common(1)[0][0]
    test = t.sample(2000, 96, gen(4))
    acc = accuracy(torch.full_like(test.tokens, most_frequent), test)
    assert abs(acc - 1 / t.n_answers) < 0.01, acc  # 32000 answers: std ~0.0014


def test_copying_positions_and_values_are_uniform():
    t = SelectiveCopying(vocab_size=8, n_memorize=4)
    n, length = 6000, 24  # data region of 20 positions, each holds data with probability 4/20
    batch = t.sample(n, length, gen(5))
    per_position = (batch.tokens[:, :20] != t.noise_token).sum(dim=0).double()
    expected = n * 4 / 20
    assert ((per_position - expected).abs() < 0.1 * expected).all(), per_position
    counts = torch.bincount(batch.targets[batch.scored_mask], minlength=8)
    assert counts[0] == counts[7] == 0
    expected = n * 4 / 6
    assert ((counts[1:7].double() - expected).abs() < 0.08 * expected).all(), counts


def test_distinct_sorted_positions_is_a_uniform_subset():
    pos = distinct_sorted_positions(12000, 5, 2, gen(6))  # 10 possible subsets
    assert ((pos >= 0) & (pos < 5)).all()
    assert (pos[:, 1] > pos[:, 0]).all(), "distinct and increasing"
    counts = Counter(map(tuple, pos.tolist()))
    assert len(counts) == 10
    assert all(abs(c - 1200) < 150 for c in counts.values()), counts
    full = distinct_sorted_positions(3, 7, 7, gen(7))  # k == n: every position
    assert torch.equal(full, torch.arange(7).expand(3, 7))


# ---------------------------------------------------------------- induction heads


@pytest.mark.parametrize("vocab_size,length", INDUCTION_CONFIGS)
def test_induction_layout(vocab_size, length):
    t = InductionHeads(vocab_size=vocab_size)
    b = 64
    batch = t.sample(b, length, gen(8))
    tokens, targets = batch.tokens, batch.targets
    assert tokens.shape == targets.shape == (b, length)
    assert tokens.dtype == targets.dtype == torch.int64
    assert t.trigger_token == vocab_size - 1
    is_trigger = tokens == t.trigger_token
    assert (is_trigger.sum(dim=1) == 2).all(), "the trigger appears exactly twice"
    assert is_trigger[:, -1].all(), "the last input is the trigger"
    first = is_trigger.int().argmax(dim=1)  # (b,)
    assert (first <= length - 4).all(), "at least one token between the recalled one and the final trigger"
    others = tokens[~is_trigger]
    assert ((others >= 1) & (others <= vocab_size - 2)).all()
    assert torch.equal(targets[:, -1], tokens[torch.arange(b), first + 1])
    assert (targets[:, :-1] == IGNORE).all()
    assert torch.equal(batch.scored_positions, torch.tensor([length - 1]))
    assert batch.n_scored == b


def test_induction_oracle_solves_and_previous_token_is_chance():
    t = InductionHeads()
    batch = t.sample(256, 64, gen(9))
    assert accuracy(induction_oracle(batch.tokens, t), batch) == 1.0
    test = t.sample(20000, 16, gen(10))
    prev = torch.roll(test.tokens, 1, dims=1)  # "answer" the token just before the final trigger
    acc = accuracy(prev, test)
    assert abs(acc - 1 / t.n_answers) < 0.01, acc  # never the recalled token by construction: chance


def test_induction_recalled_token_and_trigger_position_are_uniform():
    t = InductionHeads()
    n, length = 14000, 9
    batch = t.sample(n, length, gen(11))
    counts = torch.bincount(batch.targets[:, -1], minlength=16)
    assert counts[0] == counts[15] == 0, "neither the reserved id nor the trigger is ever recalled"
    assert ((counts[1:15] - 1000).abs() < 130).all(), counts  # 14 values, std ~31
    first = (batch.tokens == t.trigger_token).int().argmax(dim=1)
    per_position = torch.bincount(first, minlength=length).double()
    assert (per_position[length - 3 :] == 0).all()
    assert ((per_position[: length - 3] - n / 6).abs() < 0.1 * n / 6).all(), per_position


# ---------------------------------------------------------------- determinism and RNG isolation


@pytest.mark.parametrize("name", sorted(TASKS))
def test_validation_set_is_fixed(name):
    t = task(name)
    a = t.validation_set(64, 4, seed=3)
    b = t.validation_set(64, 4, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, t.validation_set(64, 4, seed=4).tokens)
    longer = t.validation_set(65, 4, seed=3)
    assert not torch.equal(a.tokens[:, :40], longer.tokens[:, :40]), "the length enters the seed"
    # Rows do not depend on count, and a row can be built alone.
    for i in range(4):
        one = t.validation_set(64, 1, seed=3, start=i)
        assert torch.equal(one.tokens[0], a.tokens[i]) and torch.equal(one.targets[0], a.targets[i])
    # Row i is a draw of sample() from a generator seeded by a stable hash (not Python's salted hash()).
    row = t.sample(1, 64, torch.Generator().manual_seed(validation_seed(name, 64, 3, 2)))
    assert torch.equal(row.tokens[0], a.tokens[2])


def test_validation_seed_is_stable():
    # SHA-256 based: the same in every process and on every platform.
    assert validation_seed("induction_heads", 256, 0, 0) == 841226600661089720
    assert validation_seed("selective_copying", 256, 0, 0) != validation_seed("induction_heads", 256, 0, 0)
    assert 0 <= validation_seed("x", 1, 2, 3) < 2**63


@pytest.mark.parametrize("name", sorted(TASKS))
def test_global_rng_is_neither_read_nor_advanced(name):
    t = task(name)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    v1 = t.validation_set(48, 3)
    s1 = t.sample(3, 48, gen(12))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was advanced"
    torch.manual_seed(123)
    torch.rand(17)
    v2 = t.validation_set(48, 3)
    s2 = t.sample(3, 48, gen(12))
    assert torch.equal(v1.tokens, v2.tokens) and torch.equal(v1.targets, v2.targets)
    assert torch.equal(s1.tokens, s2.tokens) and torch.equal(s1.targets, s2.targets)
    g = gen(12)
    t.sample(3, 48, g)
    assert not torch.equal(t.sample(3, 48, g).tokens, s1.tokens), "sample() advances the generator it is given"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", sorted(TASKS))
def test_length_2_pow_20(name):
    t = task(name)
    start = time.perf_counter()
    batch = t.validation_set(2**20, 1)
    elapsed = time.perf_counter() - start
    assert batch.tokens.shape == (1, 2**20)
    assert elapsed < 2.0, elapsed  # ~0.04 s on an idle core
    if isinstance(t, InductionHeads):
        assert int((batch.tokens == t.trigger_token).sum()) == 2
        assert torch.equal(batch.scored_positions, torch.tensor([2**20 - 1]))
    else:
        assert int((batch.tokens[:, : -t.n_memorize] != t.noise_token).sum()) == t.n_memorize
        assert batch.n_scored == t.n_memorize


def test_minimum_lengths():
    assert SelectiveCopying(n_memorize=5).min_length == 10
    assert InductionHeads().min_length == 4
    b = InductionHeads().sample(8, 4, gen(13))
    assert (b.tokens[:, 0] == 15).all() and torch.equal(b.targets[:, 3], b.tokens[:, 1])


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bad_sample_arguments(name):
    t = task(name)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        t.sample(0, 64, gen())
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        t.sample(1.5, 64, gen())
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        t.sample(True, 64, gen())
    with pytest.raises(ValueError, match=f"length {t.min_length - 1} is too short for {name}"):
        t.sample(2, t.min_length - 1, gen())
    with pytest.raises(ValueError, match="length must be an integer"):
        t.sample(2, "64", gen())
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        t.sample(2, 64, 0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        t.validation_set(64, 0)
    with pytest.raises(ValueError, match="start must be >= 0"):
        t.validation_set(64, 1, start=-1)
    with pytest.raises(ValueError, match="too short"):
        t.validation_set(t.min_length - 1, 1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="vocab_size must be >= 4 for selective_copying"):
        SelectiveCopying(vocab_size=3)
    with pytest.raises(ValueError, match="n_memorize must be >= 1"):
        SelectiveCopying(n_memorize=0)
    with pytest.raises(ValueError, match=r"train_length 31 is too short for selective_copying.*16 data tokens"):
        SelectiveCopying(train_length=31)
    with pytest.raises(ValueError, match="vocab_size must be >= 4 for induction_heads"):
        InductionHeads(vocab_size=3)
    with pytest.raises(ValueError, match="train_length 3 is too short for induction_heads"):
        InductionHeads(train_length=3)
    with pytest.raises(ValueError, match="unknown task 'copying'; known tasks: induction_heads, selective_copying"):
        task("copying")
    with pytest.raises(TypeError):
        task("induction_heads", n_memorize=4)  # a keyword the task does not take


def test_task_batch_checks_its_tensors():
    with pytest.raises(ValueError, match="same|both"):
        TaskBatch(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        TaskBatch(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------- registry and docs


def test_registry_and_defaults():
    assert set(TASKS) == {"selective_copying", "induction_heads"}
    for name, factory in TASKS.items():
        t = task(name)
        assert isinstance(t, Task) and isinstance(t, factory) and t.name == name
        assert t.vocab_size == 16
        text = t.describe()
        assert text and "\n" not in text and "15" in text  # one paragraph naming the special token id
    assert task("selective_copying").train_length == 4096
    assert task("induction_heads").train_length == 256
    custom = task("selective_copying", vocab_size=10, n_memorize=4, train_length=64)
    assert (custom.vocab_size, custom.n_memorize, custom.train_length, custom.marker_token) == (10, 4, 64, 9)
    assert "n_memorize=4" in repr(custom)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_sample_on_the_generator_device(name):
    t = task(name)
    batch = t.sample(4, 128, torch.Generator(device="cuda").manual_seed(0))
    assert batch.tokens.is_cuda and batch.targets.is_cuda
    assert batch.n_scored == 4 * (t.n_memorize if isinstance(t, SelectiveCopying) else 1)


def test_key_positions_are_the_data_tokens_and_the_trigger_pairs():
    copying = SelectiveCopying(n_memorize=5)
    batch = copying.validation_set(40, 1)
    marked = copying.key_positions(batch.tokens[0])
    assert int(marked.sum()) == 5 and bool((batch.tokens[0][marked] != 0).all())
    heads = InductionHeads()
    tokens = heads.validation_set(64, 1).tokens[0]
    marked = heads.key_positions(tokens)
    first = int((tokens == heads.trigger_token).nonzero()[0])
    assert marked.nonzero().flatten().tolist() == [first, first + 1, 63]
