import json
import time

import numpy as np
import pytest

from transformer.config import ConfigError, DataConfig
from transformer.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
)

TEXT = ("The quick brown fox jumps over the lazy dog.\n"
        "  Indented line with  two spaces, a tab\tand trailing space \n"
        "\n"
        "def f(x):\n    return x ** 2  # squares\n"
        "Ünïcödé and 中文 survive too.\n") * 20


def test_char_roundtrip_and_vocab():
    tok = CharTokenizer.train(TEXT)
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    assert ids.min() == 0 and ids.max() == tok.vocab_size - 1
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (None, None, None)
    # ids follow code-point order
    assert list(tok.encode("".join(sorted(set(TEXT))))) == list(range(tok.vocab_size))


def test_char_unseen_character_names_it():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ConfigError, match=r"'z'.*never saw"):
        tok.encode("abz")


def test_char_encode_is_fast():
    text = TEXT * (1_000_000 // len(TEXT))
    tok = CharTokenizer.train(text)
    t0 = time.perf_counter()
    tok.encode(text)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_roundtrip_keeps_newlines_and_spaces(model_type):
    tok = SentencePieceTokenizer.train(TEXT, vocab_size=360, model_type=model_type)
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == TEXT
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert len(ids) < len(TEXT)  # learned merges beyond single characters
    unseen = "Ωμέγα ☃\n\nnew  text"  # byte fallback covers characters absent from training
    assert tok.decode(tok.encode(unseen)) == unseen


def test_sentencepiece_tiny_corpus_gets_smaller_vocab():
    tok = SentencePieceTokenizer.train("hello world\nhello there\n", vocab_size=4096, model_type="bpe")
    assert 260 < tok.vocab_size < 4096  # 256 byte pieces + specials + a few merges
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"


def test_sentencepiece_vocab_too_small_is_config_error():
    with pytest.raises(ConfigError, match="vocab_size=16"):
        SentencePieceTokenizer.train(TEXT, vocab_size=16, model_type="bpe")


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_json_and_run_dir_roundtrip(kind, tmp_path):
    tok = CharTokenizer.train(TEXT) if kind == "char" else SentencePieceTokenizer.train(TEXT, 360, "unigram")
    d = json.loads(json.dumps(tok.to_json()))
    again = tokenizer_from_json(d)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))

    save_tokenizer(tok, str(tmp_path / "run"))
    loaded = load_tokenizer(str(tmp_path / "run"))
    np.testing.assert_array_equal(loaded.encode(TEXT), tok.encode(TEXT))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer.json"]  # no temp file left


def test_load_tokenizer_missing_or_corrupt(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"type": "sentencepiece", "model": "bm90IGEgbW9kZWw="}')
    with pytest.raises(ConfigError, match="corrupt"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{trunc")
    with pytest.raises(ConfigError, match="corrupt"):
        load_tokenizer(str(tmp_path))


def test_from_file_and_build_tokenizer(tmp_path):
    trained = SentencePieceTokenizer.train(TEXT, 360, "bpe")
    model = tmp_path / "sp.model"
    model.write_bytes(trained._proto)
    cfg = DataConfig(tokenizer="sentencepiece", tokenizer_model=str(model))
    np.testing.assert_array_equal(build_tokenizer(cfg, "ignored").encode(TEXT), trained.encode(TEXT))
    assert isinstance(build_tokenizer(DataConfig(), TEXT), CharTokenizer)
    assert build_tokenizer(DataConfig(tokenizer="sentencepiece", vocab_size=360), TEXT).vocab_size == 360

    with pytest.raises(ConfigError, match="not found"):
        SentencePieceTokenizer.from_file(str(tmp_path / "missing.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a valid"):
        SentencePieceTokenizer.from_file(str(tmp_path / "bad.model"))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_exports_as_a_hugging_face_tokenizer_that_encodes_alike(model_type):
    """The tokenizer.json `python -m transformer.export` writes for a sentencepiece run gives the same ids and text as
    the model itself: spaces (single, double, leading, trailing), newlines, tabs, digits, characters it never saw
    (byte fallback), and its special tokens."""
    import io

    import sentencepiece as spm

    from transformer.data.tokenizer import SentencePieceTokenizer

    words = "the quick brown fox jumps over the lazy dog while seven grey geese fly over quiet hills".split()
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, rng.integers(3, 15))) + rng.choice([".", ",", "!", "?"])
                     for _ in range(3000))
    sp = SentencePieceTokenizer.train(text, 400, model_type)
    hf = sp.to_hf()
    for t in ["the quick fox.\nthe  lazy   dog!\n\n", "  leading and trailing  ", "tab\tseparated, 2024 and 7",
              "Grüße aus Köln — 東京 €3,50", text[:2000]]:
        ids = sp.encode(t).tolist()
        assert hf.encode(t).tolist() == ids, t
        assert hf.decode(ids) == sp.decode(ids) == t
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (sp.bos_id, sp.eos_id, sp.pad_id)

    model = io.BytesIO()  # sentencepiece's default normalisation (NFKC, dummy prefix) has no exact form: refused
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_writer=model, vocab_size=40,
                                   minloglevel=2)
    with pytest.raises(ConfigError, match="no exact Hugging Face form"):
        SentencePieceTokenizer(model.getvalue()).to_hf()
