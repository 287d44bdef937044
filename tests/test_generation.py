"""Sampling parameters, the sampler, batched token generation and text generation with stop strings."""

import math
from dataclasses import dataclass

import pytest
import torch

import mambastep
from mambastep.files.tokenizer import ByteTokenizer, train_bpe
from mambastep.runtime.generation import StopFilter, generate, generate_batch, generate_tokens
from mambastep.runtime.sampling import SamplingParams, _draw, _outside_nucleus, sample

from conftest import hf_reference, make_hf_checkpoint

PROMPT_LENGTHS = (1, 5, 17)


@pytest.fixture(scope="module")
def model():
    """A tiny random Mamba with spread-out weights, so that greedy output is not one token repeated."""
    torch.manual_seed(0)
    model = mambastep.MambaLM(mambastep.MambaConfig(d_model=16, n_layer=2, vocab_size=300, d_state=4)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def byte_model():
    """A tiny random Mamba over the 256 byte values. Its embedding, tied to the LM head, is
    shrunk so that a token does not simply predict itself: sampling then gives varied bytes."""
    torch.manual_seed(0)
    model = mambastep.MambaLM(mambastep.MambaConfig(d_model=16, n_layer=2, vocab_size=256, d_state=4)).eval()
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def collect(model, prompts, params):
    """The tokens of each sequence, and the order (sequence index) in which they came."""
    out, order = [[] for _ in prompts], []
    for i, token in generate_tokens(model, prompts, params):
        out[i].append(token)
        order.append(i)
    return out, order


def printable_pair(text, start):
    """The first two printable ASCII characters in a row at or after ``start``."""
    return next(
        text[k : k + 2]
        for k in range(start, len(text) - 1)
        if text[k : k + 2].isascii() and text[k : k + 2].isprintable()
    )


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.0),
        ("stop", "\n"),
        ("stop", ("",)),
        ("stop", ("a", 3)),
        ("stop", None),
        ("eos_token_id", -1),
        ("eos_token_id", "0"),
        ("ignore_eos", 1),
    ],
)
def test_sampling_params_rejects(field, value):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**{field: value})
    assert repr(value) in str(err.value)


def test_sampling_params_defaults_and_normalisation():
    params = SamplingParams(stop=["\n", "END"], temperature=0)
    assert params.stop == ("\n", "END") and params.greedy
    assert not SamplingParams().greedy and SamplingParams().max_new_tokens == 64
    hash(params)  # frozen and hashable


# sample()


def test_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tokens = sample(logits, SamplingParams(temperature=0), gens(0, 1, 2, 3), [[]] * 4)
    assert tokens.dtype == torch.long and tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_are_greedy(filters):
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(1))
    tokens = sample(logits, SamplingParams(temperature=1.5, **filters), gens(*range(6)), [[]] * 6)
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "filters, allowed", [(dict(top_k=2), {0, 1}), (dict(top_p=0.75), {0, 1}), (dict(min_p=0.5), {0, 1})]
)
def test_filters_keep_the_right_tokens(filters, allowed):
    logits = torch.tensor([[0.5, 0.3, 0.2, 1e-3]]).log()
    g = gens(0)
    drawn = {int(sample(logits, SamplingParams(**filters), g, [[]])) for _ in range(300)}
    assert drawn == allowed


def test_repetition_penalty_changes_the_choice():
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    positive = torch.tensor([[2.0, 1.9, -1.0]])  # 2.0 / 1.5 < 1.9
    negative = torch.tensor([[-1.0, -1.2, -3.0]])  # -1.0 * 1.5 < -1.2
    for logits in (positive, negative):
        assert int(sample(logits, SamplingParams(temperature=0), gens(0), [[0]])) == 0
        assert int(sample(logits, params, gens(0), [[0]])) == 1
        assert int(sample(logits, params, gens(0), [[2]])) == 0
    batch = torch.cat([positive, positive])
    assert sample(batch, params, gens(0, 0), [[0], []]).tolist() == [1, 0]  # per row history


def test_same_seed_same_tokens():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    history = [[1, 2, 3]] * 8
    first = sample(logits, params, gens(*range(8)), history)
    assert sample(logits, params, gens(*range(8)), history).tolist() == first.tolist()
    assert sample(logits, params, gens(*range(100, 108)), history).tolist() != first.tolist()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3, temperature=0.7)],
)
def test_a_row_does_not_depend_on_the_others(params):
    history = [[5, 6], [7, 8, 9], [10]]
    for seed in range(5):
        logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(seed))
        together = sample(logits, params, gens(11, 42, 13), history)
        alone = sample(logits[1:2], params, gens(42), history[1:2])
        assert int(together[1]) == int(alone[0])


def test_sample_checks_its_arguments():
    with pytest.raises(ValueError, match="2 generators"):
        sample(torch.zeros(2, 5), SamplingParams(), gens(0), [[], []])
    for top_k in (0, 2):
        with pytest.raises(ValueError, match="NaN or infinite"):
            sample(torch.tensor([[0.0, math.nan, 1.0]]), SamplingParams(top_k=top_k), gens(0), [[]])


def test_top_k_keeps_every_token_tied_with_the_kth():
    """A row with three tokens tied at its 2nd largest logit keeps all three; the row beside it,
    without ties, keeps two (its other columns are padding that is never drawn)."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    g = gens(0, 1)
    drawn = [set(), set()]
    for _ in range(400):
        for row, token in enumerate(sample(logits, SamplingParams(top_k=2, temperature=2.0), g, [[], []]).tolist()):
            drawn[row].add(token)
    assert drawn == [{0, 1, 2, 3}, {3, 4}]


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=20), SamplingParams(top_k=20, top_p=0.8, min_p=0.02, temperature=0.7)]
)
def test_top_k_draws_the_token_a_draw_over_the_masked_row_draws(params):
    """Narrowed to its top-k columns (in vocabulary order), a row gives the token that a draw with
    the same generator gives over the whole vocabulary with the other tokens masked."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    for seed in range(20):
        got = sample(logits, params, gens(*range(seed, seed + 4)), [[]] * 4)
        masked = logits / params.temperature
        masked = masked.masked_fill(masked < masked.topk(params.top_k, dim=-1).values[:, -1:], -math.inf)
        if params.top_p < 1.0:
            masked = masked.masked_fill(_outside_nucleus(masked.softmax(-1), params.top_p), -math.inf)
        if params.min_p > 0.0:
            probs = masked.softmax(-1)
            masked = masked.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
        assert got.tolist() == _draw(masked.softmax(-1), gens(*range(seed, seed + 4))).tolist()


def test_draws_follow_the_probabilities():
    """Frequencies of 40,000 draws within 4.5 standard deviations of each token's probability;
    a token of probability 0 is never drawn, wherever it lies."""
    probs = torch.tensor([[0.0, 0.5, 0.25, 0.0, 0.15, 0.1, 0.0]])
    g = gens(7)
    counts = torch.bincount(torch.cat([_draw(probs, g) for _ in range(40_000)]), minlength=7).double()
    p = probs[0].double()
    sigma = (40_000 * p * (1 - p)).sqrt()
    assert (counts - 40_000 * p).abs().le(4.5 * sigma).all() and counts[p == 0].sum() == 0
    scaled = _draw(3 * probs, gens(7))  # rows need not sum to 1
    assert scaled.tolist() == _draw(probs, gens(7)).tolist()


def test_a_draw_at_the_top_of_the_range_stays_on_a_possible_token(monkeypatch):
    """The largest u (1 - 2^-53) draws the last token of non-zero probability, not the
    zero-probability tokens after it or past the end (as a float32 sum could round to)."""
    probs = torch.tensor([[0.1, 0.7, 0.2, 0.0, 0.0]], dtype=torch.float32)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor([1.0 - 2.0**-53], dtype=torch.float64))
    assert _draw(probs, gens(0)).tolist() == [2]


@pytest.mark.parametrize(
    "vocab, scale, top_p", [(100, 2.0, 0.9), (3000, 1.0, 0.95), (3000, 8.0, 0.9), (3000, 3.0, 0.5)]
)
def test_nucleus_equals_a_sort_of_the_whole_row(vocab, scale, top_p):
    """The nucleus found among the most likely tokens (more of them while it lies beyond) is the
    one a sort of the whole row gives: peaked and flat rows, one batch, so that the search
    widens for some rows only."""
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * scale
    logits[0] *= 0.05 / scale  # a nearly uniform row: most of it before top_p is reached
    probs = logits.softmax(-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(-1) - ordered >= top_p
    outside[:, 0] = False
    expected = outside.scatter(-1, order, outside)
    got = _outside_nucleus(probs, top_p)
    assert got.tolist() == expected.tolist()
    assert not got.all(-1).any()


# generate_tokens()


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0, max_new_tokens=12), SamplingParams(seed=7, max_new_tokens=12)]
)
def test_a_prompt_in_a_batch_gives_what_it_gives_alone(model, prompts, params):
    together, order = collect(model, prompts, params)
    alone = [collect(model, [p], params)[0][0] for p in prompts]
    assert together == alone
    assert [len(t) for t in together] == [12, 12, 12]  # max_new_tokens; no eos given
    assert order == [0, 1, 2] * 12  # one step of the whole batch after another
    assert len({tuple(t) for t in together}) == 3


def test_seeds(model, prompts):
    seeded = collect(model, prompts[:1], SamplingParams(max_new_tokens=10, seed=3))[0]
    assert collect(model, prompts[:1], SamplingParams(max_new_tokens=10, seed=3))[0] == seeded
    # Without a seed each call draws a fresh one. At temperature 2 the most likely 20-token output of this
    # model has a probability under 1%, so three calls agree with a probability under 1e-4.
    fresh = SamplingParams(max_new_tokens=20, temperature=2.0)
    assert len({str(collect(model, prompts[:1], fresh)[0]) for _ in range(3)}) > 1


def test_max_new_tokens(model, prompts):
    for n in (1, 3):
        out, _ = collect(model, prompts, SamplingParams(temperature=0, max_new_tokens=n))
        assert [len(t) for t in out] == [n] * len(prompts)


def test_eos_ends_only_its_sequence(model, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=15)
    full, _ = collect(model, prompts, params)
    # A token that the last sequence produces (not first, nor before) and the others never do.
    eos, at = next(
        (t, k) for k, t in enumerate(full[2]) if k > 0 and t not in full[2][:k] and all(t not in s for s in full[:2])
    )
    out, _ = collect(model, prompts, SamplingParams(temperature=0, max_new_tokens=15, eos_token_id=eos))
    assert out[2] == full[2][: at + 1]  # eos is yielded, then the sequence ends
    assert out[:2] == full[:2]
    ignored, _ = collect(
        model, prompts, SamplingParams(temperature=0, max_new_tokens=15, eos_token_id=eos, ignore_eos=True)
    )
    assert ignored == full


def test_generate_tokens_rejects_bad_prompts(model):
    with pytest.raises(ValueError, match="empty prompt at index 1"):
        generate_tokens(model, [[1], []])
    with pytest.raises(ValueError, match="token id 300"):
        generate_tokens(model, [[1, 300]])
    with pytest.raises(ValueError, match="token id -1"):
        generate_tokens(model, [[-1]])
    with pytest.raises(ValueError, match="no prompts"):
        generate_tokens(model, [])
    with pytest.raises(ValueError, match="eos_token_id 300"):
        generate_tokens(model, [[1]], SamplingParams(eos_token_id=300))


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_equals_transformers(tmp_path, prompts, repetition_penalty):
    directory = make_hf_checkpoint(tmp_path / "ckpt", vocab_size=300)
    ours_model, ref = mambastep.load(directory), hf_reference(directory)
    params = SamplingParams(temperature=0, max_new_tokens=20, repetition_penalty=repetition_penalty)
    ours, _ = collect(ours_model, prompts, params)
    for prompt, tokens in zip(prompts, ours):
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = ref.generate(
                input_ids, max_new_tokens=20, do_sample=False, eos_token_id=None, repetition_penalty=repetition_penalty
            )[0, len(prompt) :]
        assert len(expected) == 20
        assert tokens == expected.tolist()


# generate() and generate_batch()


def test_stop_filter_holds_back_possible_starts():
    f = StopFilter(["END", "\n\n"])
    assert f.push("abc E") == "abc "  # "E" may start "END"
    assert f.push("N") == ""
    assert f.push("x\n") == "ENx"
    assert f.push("\nmore") == ""
    assert f.stopped and f.push("more") == "" and f.flush() == ""
    f = StopFilter(["END"])
    assert f.push("the EN") == "the " and f.flush() == "EN"


def test_stop_filter_cuts_at_the_occurrence_that_ends_first():
    for pieces in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        f = StopFilter(["abcd", "bc"])
        assert "".join(f.push(p) for p in pieces) + f.flush() == "a"


def test_generate_streams_text(byte_model):
    tok = ByteTokenizer()
    pieces = list(generate(byte_model, tok, "Mamba is", seed=1, max_new_tokens=40))
    text = "".join(pieces)
    params = SamplingParams(seed=1, max_new_tokens=40)
    ids = [t for _, t in generate_tokens(byte_model, [tok.encode("Mamba is")], params)]
    assert text == tok.decode(ids)
    assert list(generate(byte_model, tok, "Mamba is", params)) == pieces
    assert "".join(generate(byte_model, tok, "Mamba is", params, max_new_tokens=20)) == tok.decode(ids[:20])


def test_generate_stops_at_a_stop_string(byte_model, monkeypatch):
    tok = ByteTokenizer()
    params = SamplingParams(seed=5, max_new_tokens=60)
    full = "".join(generate(byte_model, tok, "Hello", params))
    stop = printable_pair(full, 5)
    cut = full.find(stop)
    assert 0 < cut < len(full) - 10
    steps = []
    step = byte_model.step
    monkeypatch.setattr(byte_model, "step", lambda *a: steps.append(1) or step(*a))
    assert "".join(generate(byte_model, tok, "Hello", params, stop=(stop,))) == full[:cut]
    assert len(steps) < 59  # the sequence ended at the stop string, not at max_new_tokens
    assert "".join(generate(byte_model, tok, "Hello", params, stop=("never in the output",))) == full


def test_generate_stops_at_the_tokenizers_eos(byte_model):
    params = SamplingParams(seed=5, max_new_tokens=60)
    full = "".join(generate(byte_model, ByteTokenizer(), "Hello", params))
    char = printable_pair(full, 5)[0]
    tok = ByteTokenizer(eos_token_id=ord(char))
    assert "".join(generate(byte_model, tok, "Hello", params)) == full[: full.index(char)]
    assert "".join(generate(byte_model, tok, "Hello", params, ignore_eos=True)) == full


def test_generate_batch_equals_generate_alone(byte_model):
    tok = ByteTokenizer()
    texts = ["a", "Mamba is a", "The state space model reads the prompt"]
    params = SamplingParams(seed=2, max_new_tokens=30)
    alone = ["".join(generate(byte_model, tok, t, params)) for t in texts]
    assert generate_batch(byte_model, tok, texts, params) == alone
    stop = printable_pair(alone[1], 5)
    stopped = generate_batch(byte_model, tok, texts, params, stop=(stop,))
    assert stopped == ["".join(generate(byte_model, tok, t, params, stop=(stop,))) for t in texts]
    assert stopped[1] == alone[1][: alone[1].find(stop)] != alone[1]


def test_generate_rejects_bad_input(byte_model):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(byte_model, tok, "")
    with pytest.raises(ValueError, match="empty prompt at index 1"):
        generate_batch(byte_model, tok, ["a", ""])
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        generate(byte_model, tok, "a", max_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(byte_model, tok, "a", temperature=-1)


@pytest.fixture(scope="module")
def bpe():
    """A BPE tokenizer of 300 tokens, and a random Mamba-2 of that vocabulary."""
    text = "def f(x):\n    return x + 1\n\nclass A:\n    def g(self):\n        pass\n" * 30
    torch.manual_seed(0)
    config = mambastep.Mamba2Config(d_model=16, n_layer=2, vocab_size=300, d_state=4, head_dim=8)
    return mambastep.Mamba2LM(config).eval(), train_bpe([text], 300)


def test_a_prompt_ending_in_a_whitespace_token_is_healed(bpe):
    model, tok = bpe
    ids = tok.encode("def ")
    assert tok.decode(ids[-1:]) == " " and len(ids) == 2  # "def" then a lone space
    # The reference: read "def", then the first token drawn among those that start with " ".
    params = SamplingParams(temperature=0, max_new_tokens=6)
    logits, state = model.prefill(torch.tensor([ids[:-1]]))
    starts = torch.tensor([tok.decode([i]).startswith(" ") for i in range(model.config.vocab_size)])
    generated = [int(logits[0].masked_fill(~starts, -math.inf).argmax())]
    for _ in range(5):
        logits, state = model.step(torch.tensor(generated[-1:]), state)
        generated.append(int(logits[0].argmax()))
    expected = tok.decode(generated)
    assert expected.startswith(" ")
    assert "".join(generate(model, tok, "def ", params)) == expected[1:]  # the prompt's space is not said twice
    # A prompt whose last token is not whitespace alone is read whole.
    ids = tok.encode("def f")
    whole = tok.decode([t for _, t in generate_tokens(model, [ids], params)])
    assert "".join(generate(model, tok, "def f", params)) == whole
    assert generate_batch(model, tok, ["def ", "def f"], params) == [expected[1:], whole]
    # A tokenizer that cannot be a cache key heals the same.
    unhashable = UnhashableTokenizer(tok, tok.vocab_size, tok.eos_token_id)
    assert "".join(generate(model, unhashable, "def ", params)) == expected[1:]


@dataclass
class UnhashableTokenizer:
    """A tokenizer of the user's own: a dataclass with ``__eq__``, so without ``__hash__``."""

    inner: object
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids) -> str:
        return self.inner.decode(ids)
