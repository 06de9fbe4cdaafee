"""Prepared token shards (data/shards.py, data/prepare.py) and the Grain loader over them (data/loader.py):
the tokens are each document's plus an end-of-text token, preparation resumes to the same bytes, damaged shards are
rebuilt, a cache is shared and rebuilt when its data or tokenizer changes, and the loader resumes exactly, also on
another number of hosts."""
import dataclasses
import json
import multiprocessing
import os

import numpy as np
import pytest

from transformer.config import ConfigError, DataConfig
from transformer.data.loader import ShardPipeline, document_segments
from transformer.data.prepare import prepared_shards
from transformer.data.shards import TokenShards, prepare_shards, read_index, shard_files
from transformer.data.tokenizer import CharTokenizer

WORDS = "the cat sat on a mat while seven grey geese flew over quiet hills".split()


def corpus(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 30))) for _ in range(n)]


DOCS = corpus()
TOK = CharTokenizer.train("".join(DOCS))


def split_of(i):
    return "val" if (i + 1) % 10 == 0 else "train"


def documents():
    return ((split_of(i), d) for i, d in enumerate(DOCS))


def shard_bytes(cache):
    index = read_index(cache)
    return {s: b"".join(open(p, "rb").read() for p, _ in shard_files(cache, index, s)) for s in ("train", "val")}


def test_shards_hold_every_document_and_an_end_of_text_token_in_order(tmp_path):
    index = prepare_shards(documents, TOK, str(tmp_path), shard_tokens=500)
    assert index["complete"] and len(index["flushes"]) > 3 and index["eot"] == TOK.vocab_size
    for split in ("train", "val"):
        want = np.concatenate([np.append(TOK.encode(d), TOK.vocab_size) for i, d in enumerate(DOCS)
                               if split_of(i) == split])
        np.testing.assert_array_equal(np.concatenate(TokenShards(str(tmp_path), split).shards), want)


class Interrupted(Exception):
    pass


def test_an_interrupted_preparation_resumes_to_the_same_bytes_and_damage_is_rebuilt(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    prepare_shards(documents, TOK, whole, shard_tokens=400)

    def dies_at_70():
        for i, doc in enumerate(documents()):
            if i == 70:
                raise Interrupted
            yield doc

    with pytest.raises(Interrupted):
        prepare_shards(dies_at_70, TOK, cut, shard_tokens=400, chunk_docs=5)
    partial = read_index(cut)
    assert not partial["complete"] and 0 < partial["flushes"][-1]["docs"] <= 70
    with pytest.raises(ConfigError, match="no complete prepared data"):
        TokenShards(cut)
    prepare_shards(documents, TOK, cut, shard_tokens=400)
    assert shard_bytes(cut) == shard_bytes(whole)

    path, n = shard_files(cut, read_index(cut), "train")[2]
    with open(path, "r+b") as f:  # a shard cut short on disk is never read...
        f.truncate(n)
    with pytest.raises(ConfigError, match="missing or truncated"):
        TokenShards(cut)
    prepare_shards(documents, TOK, cut, shard_tokens=400)  # ...and preparing again rebuilds it
    assert shard_bytes(cut) == shard_bytes(whole)


def test_two_workers_write_the_same_shards_as_one(tmp_path):
    prepare_shards(documents, TOK, str(tmp_path / "one"), shard_tokens=700)
    prepare_shards(documents, TOK, str(tmp_path / "two"), shard_tokens=700, workers=2, chunk_docs=7)
    assert shard_bytes(str(tmp_path / "two")) == shard_bytes(str(tmp_path / "one"))


def _prepare_in_process(cache):
    prepare_shards(documents, TOK, cache, shard_tokens=300)


def test_two_preparations_of_one_cache_at_once_leave_it_whole(tmp_path):
    cache = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_prepare_in_process, args=(cache,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    prepare_shards(documents, TOK, str(tmp_path / "alone"), shard_tokens=300)
    assert shard_bytes(cache) == shard_bytes(str(tmp_path / "alone"))
    assert not [f for f in os.listdir(cache) if ".tmp" in f]


def test_a_cache_is_reused_and_rebuilt_when_the_data_or_the_tokenizer_changes(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(path=str(data), prepared=True, cache_dir=str(tmp_path / "cache"), shard_tokens=500)
    tok, cache = prepared_shards(cfg, log=lambda s: None)
    stamp = os.stat(shard_files(cache, read_index(cache), "train")[0][0]).st_mtime_ns
    tok2, again = prepared_shards(cfg, log=lambda s: None)
    assert again == cache and tok2.to_json() == tok.to_json()
    assert os.stat(shard_files(cache, read_index(cache), "train")[0][0]).st_mtime_ns == stamp  # not written again
    assert len(TokenShards(cache, "val")) > 0  # every 10th document held out (data.val_fraction=0.1)

    _, other_tok = prepared_shards(dataclasses.replace(cfg, tokenizer="sentencepiece", vocab_size=300),
                                   log=lambda s: None)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:-2]))  # the data changes
    _, other_data = prepared_shards(cfg, log=lambda s: None)
    assert len({cache, other_tok, other_data}) == 3
    assert len(TokenShards(other_data)) < len(TokenShards(cache))


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "sentencepiece"])
def test_a_corpus_with_no_text_is_a_config_error(tmp_path, tokenizer):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    cfg = DataConfig(path=str(data), prepared=True, cache_dir=str(tmp_path / "cache"), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"has no text \(2 document\(s\), all empty\); point data.path"):
        prepared_shards(cfg, log=lambda s: None)
    assert not os.path.exists(tmp_path / "cache" / "shards")  # nothing written


def test_document_segments_restart_after_each_end_of_text_token():
    x = np.array([[5, 6, 9, 7, 9, 9, 8]])
    segments, positions = document_segments(x, eot=9)
    np.testing.assert_array_equal(segments, [[1, 1, 1, 2, 2, 3, 4]])
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 0, 0]])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    prepare_shards(documents, TOK, path, shard_tokens=400)
    return path


def pipeline(cache, seed=0):
    return ShardPipeline(cache, T=16, batch_rows=6, eval_rows=4, n_eval=2, seed=seed)


def test_loader_blocks_come_from_the_shards_and_resume_exactly_on_any_number_of_hosts(cache):
    every = np.arange
    straight = pipeline(cache)
    batches = [straight.next(s, every) for s in range(40)]  # over an epoch: blocks reshuffle
    stream = np.concatenate(TokenShards(cache).shards)
    for b in batches[:3]:
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for row in b["inputs"]:  # each block is a stretch of the token stream
            hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, 16) == row, axis=1))
            assert len(hits)
    assert not np.array_equal(batches[0]["inputs"], pipeline(cache, seed=1).next(0, every)["inputs"])

    first = pipeline(cache)
    for s in range(25):
        first.next(s, every)
    state = json.loads(json.dumps(first.state()))  # as it goes through a checkpoint
    for hosts in (1, 2, 3):  # the run resumes on 1, 2 or 3 hosts, each reading its own rows
        resumed = []
        for h in range(hosts):
            p = pipeline(cache)
            p.restore(state)
            mine = lambda n, h=h: np.arange(n).reshape(hosts, -1)[h]  # noqa: E731
            resumed.append([p.next(s, mine) for s in range(25, 40)])
        for s in range(15):
            for key in ("inputs", "targets", "segments", "positions"):
                got = np.concatenate([r[s][key] for r in resumed])
                np.testing.assert_array_equal(got, batches[25 + s][key])


def test_loader_validation_batches_are_the_validation_split(cache):
    p = pipeline(cache)
    val = np.concatenate(TokenShards(cache, "val").shards)
    assert len(p.val) == 2
    np.testing.assert_array_equal(p.val[0]["inputs"][0], val[:16])
    with pytest.raises(ConfigError, match="not one of prepared shards"):
        p.restore({"epoch": 0, "index": 3})


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_with_document_segments_one_document_never_sees_another(positions):
    import jax.numpy as jnp
    from flax import nnx

    from transformer.config import ModelConfig
    from transformer.model import build_model

    eot = TOK.vocab_size
    model = build_model(ModelConfig(vocab_size=eot + 1, d_model=24, n_heads=2, n_layers=2, max_len=32,
                                    positions=positions), nnx.Rngs(0))
    a, other_a, b = TOK.encode("the cat sat"), TOK.encode("a grey hill"), TOK.encode("on a mat")
    row = np.concatenate([a, [eot], b])[None]
    changed = np.concatenate([other_a, [eot], b])[None]  # another first document, the same second one

    def logits(x, segmented=True):
        segments, pos = document_segments(x, eot)
        kw = {"segments_BT": jnp.asarray(segments), "positions_BT": jnp.asarray(pos)} if segmented else {}
        return np.asarray(model(jnp.asarray(x), **kw))

    second = slice(len(a) + 1, None)
    np.testing.assert_allclose(logits(row)[0, second], logits(changed)[0, second], atol=1e-6)
    np.testing.assert_allclose(logits(row)[0, second], logits(np.asarray(b)[None])[0], atol=1e-5)  # as if alone
    assert not np.allclose(logits(row, False)[0, second], logits(changed, False)[0, second], atol=1e-4)


def test_training_on_prepared_shards_resumes_as_if_uninterrupted_also_on_8_devices(tmp_path):
    from transformer.cli import parse_args
    from transformer.train import METRICS_FILE, train

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(400, seed=1)))

    def args(run, steps, *extra):
        return parse_args(["--data.path", str(data), "--data.prepared=true", "--data.cache_dir", str(tmp_path / "c"),
                           "--data.shard_tokens=2000", "--train.run_dir", str(tmp_path / run), "--train.steps",
                           str(steps), "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2",
                           "--model.max_len=32", "--train.batch_size=8", "--train.log_interval=1",
                           "--train.eval_interval=100", "--train.eval_batches=2", "--train.progress=false",
                           "--optim.warmup_steps=2", *extra])[0]

    def losses(run):
        with open(tmp_path / run / METRICS_FILE) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    train(args("full", 6, "--mesh.data=1"))
    train(args("half", 3, "--optim.decay_steps=6", "--mesh.data=1"))
    train(args("half", 6, "--mesh.data=8"), resume=True)  # the run moves from 1 device to 8
    assert len(os.listdir(tmp_path / "c" / "shards")) == 1  # both runs read one prepared cache
    np.testing.assert_allclose(losses("half")[-3:], losses("full")[-3:], rtol=1e-5)


def test_byte_level_bpe_encodes_in_batches_as_one_by_one_and_round_trips():
    from transformer.data.tokenizer import HFTokenizer

    tok = HFTokenizer.train_byte_level("\n".join(DOCS), 300)
    texts = DOCS[:5] + ["naïve café ✓"]  # bytes the training text never had still encode
    for ids, text in zip(tok.encode_batch(texts), texts):
        np.testing.assert_array_equal(ids, tok.encode(text))
        assert tok.decode(ids) == text
    assert tok.eos_id is not None and tok.vocab_size <= 300


def test_a_model_trained_on_documents_ends_them_and_sample_py_stops_there(tmp_path):
    """Every prepared document ends in an end-of-text token, the tokenizer's EOS: a model trained on them learns to
    end a document, and sample.py stops at that token by itself (not at --max-new-tokens)."""
    from inproc import run as cli

    from transformer.cli import parse_args
    from transformer.train import train

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in ["the cat sat on the mat."] * 60))
    run = tmp_path / "run"
    train(parse_args(["--data.path", str(data), "--data.prepared=true", "--data.cache_dir", str(tmp_path / "c"),
                      "--train.run_dir", str(run), "--train.steps=150", "--model.d_model=32", "--model.n_heads=2",
                      "--model.n_layers=2", "--model.max_len=32", "--train.batch_size=8", "--train.log_interval=50",
                      "--train.eval_interval=1000", "--train.progress=false", "--optim.lr=3e-3",
                      "--optim.warmup_steps=10", "--mesh.data=1"])[0])
    out = cli("sample.py", "--checkpoint", str(run), "--prompt", "the cat", "--greedy", "--max-new-tokens", "60")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the cat sat on the mat."  # then the end-of-text token: 15 of 60 tokens


def test_a_large_tokenizer_sample_trains_in_a_process_of_its_own_to_the_same_tokenizer(tmp_path, monkeypatch):
    """Above data.prepare.SEPARATE_TRAINING_MB the tokenizer trains in a spawned process (its memory then goes back
    before the shards are written); the tokenizer is the same as one trained in-process."""
    from transformer.data import prepare
    from transformer.data.sources import source_identity

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(path=str(data), prepared=True, tokenizer="sentencepiece", vocab_size=300)
    here = prepare._sample_tokenizer(cfg, source_identity(cfg), str(tmp_path / "a"), lambda s: None)
    monkeypatch.setattr(prepare, "SEPARATE_TRAINING_MB", 0)
    spawned = prepare._sample_tokenizer(cfg, source_identity(cfg), str(tmp_path / "b"), lambda s: None)
    assert spawned.to_json() == here.to_json()
