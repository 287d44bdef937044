"""Tokenizers, their loading and its errors, and the incremental detokenizer."""

import json

import pytest

from mambastep.files.tokenizer import (
    REPLACEMENT_CHAR,
    ByteTokenizer,
    HFTokenizer,
    TextStream,
    TokenizerError,
    load_tokenizer,
)

TEXT = "héllo wörld 日本語 🐍"
SENTENCES = ["hello world", "héllo wörld", "the quick brown fox jumps over the lazy dog", "hello there"]


def train_bpe(directory, vocab_size=300):
    """A tiny byte-level BPE, trained here and saved as directory/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def stream_pieces(tokenizer, ids):
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    return pieces + [stream.flush()]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and len(ids) > len(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eos_token_id) == (256, None)
    assert ByteTokenizer(eos_token_id=3).eos_token_id == 3
    assert tok.decode(ids[:2]) == "h" + REPLACEMENT_CHAR  # a split character is replaced, not an error


def test_byte_tokenizer_rejects_ids_outside_bytes():
    with pytest.raises(ValueError, match="256"):
        ByteTokenizer().decode([104, 300])
    with pytest.raises(ValueError, match="eos_token_id"):
        ByteTokenizer(eos_token_id=256)


def test_text_stream_bytes_never_splits_a_character():
    tok = ByteTokenizer()
    pieces = stream_pieces(tok, tok.encode(TEXT))
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == TEXT
    assert sum(1 for p in pieces if p) == len(TEXT)  # one piece per character


def test_text_stream_flush_emits_an_incomplete_character():
    tok = ByteTokenizer()
    stream = TextStream(tok)
    assert [stream.push(i) for i in "a🐍".encode()[:3]] == ["a", "", ""]
    assert stream.flush() == REPLACEMENT_CHAR
    assert stream.flush() == ""


def test_text_stream_decodes_a_bounded_window():
    """Each push decodes a few ids, not the whole output (no O(n^2))."""

    class Counting(ByteTokenizer):
        longest = 0

        def decode(self, ids):
            Counting.longest = max(Counting.longest, len(ids))
            return super().decode(ids)

    tok = Counting()
    text = TEXT * 200
    assert "".join(stream_pieces(tok, tok.encode(text))) == text
    assert Counting.longest <= 8


def test_hf_tokenizer_round_trip_and_stream(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 300
    assert tok.eos_token_id == 0  # "<|endoftext|>"
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges were learned
    pieces = stream_pieces(tok, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == TEXT
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(TEXT) == ids


def test_hf_tokenizer_adds_no_special_tokens(tmp_path):
    from tokenizers import processors

    tok = load_tokenizer(train_bpe(tmp_path))
    eos = tok.eos_token_id
    tok.tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    assert eos not in tok.encode("hello")
    assert tok.encode("hello", add_special_tokens=True)[-1] == eos


def test_load_tokenizer_bytes(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 16, "tokenizer": "bytes"}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("not/used", tokenizer="bytes"), ByteTokenizer)


def test_load_tokenizer_override_takes_precedence(tmp_path):
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    model_dir.mkdir(), tok_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"d_model": 16}))
    assert isinstance(load_tokenizer(model_dir, tokenizer=train_bpe(tok_dir)), HFTokenizer)


def test_load_tokenizer_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2}))
    with pytest.raises(TokenizerError, match="no tokenizer.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "--tokenizer EleutherAI/gpt-neox-20b" in str(err.value)


@pytest.mark.parametrize(
    "vocab_size, hint",
    [
        (16, "Its vocabulary of 16 tokens is too small for a text tokenizer: give it token ids"),
        (1000, "Pass the tokenizer it was trained with (at most 1000 tokens) with --tokenizer"),
        (50280, "--tokenizer EleutherAI/gpt-neox-20b"),
    ],
)
def test_the_hint_for_a_missing_tokenizer_fits_the_vocabulary(tmp_path, vocab_size, hint):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": vocab_size}))
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    assert hint in str(err.value) and ("gpt-neox" in str(err.value)) == (vocab_size == 50280)


def test_load_tokenizer_unknown_named_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": "words"}))
    with pytest.raises(TokenizerError, match="'words' is not understood"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"model": 3}', ""])
def test_load_tokenizer_corrupt_json(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    for source in (tmp_path, path):
        with pytest.raises(TokenizerError, match="tokenizer.json") as err:
            load_tokenizer(source)
        assert str(path) in str(err.value)


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "absent")


def test_load_tokenizer_offline_hub_id(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.chdir(tmp_path)  # so that the id is not a local path
    with pytest.raises(TokenizerError, match="could not be fetched") as err:
        load_tokenizer("no-such-owner-mambastep/no-such-model")
    assert "local directory" in str(err.value) and "tokenizer.json" in str(err.value)
    assert err.value.__cause__ is not None
