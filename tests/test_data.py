import json

import numpy as np
import pytest

from transformer import data
from transformer.config import ConfigError, DataConfig
from transformer.data import BlockIterator, eval_batches, load_texts, split_text

T, B = 7, 5
TOKENS = np.arange(211, dtype=np.int32)  # token value == stream position, so a block reveals where it came from


def _starts(x_BT):
    return x_BT[:, 0].tolist()


def test_iterator_blocks_are_next_token_pairs():
    x, y = BlockIterator(TOKENS, T, B, seed=0).next()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one in the stream
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # each block is contiguous


def test_iterator_is_deterministic_in_seed():
    def batches(seed):
        it = BlockIterator(TOKENS, T, B, seed)
        return np.stack([it.next()[0] for _ in range(12)])

    np.testing.assert_array_equal(batches(3), batches(3))
    assert not np.array_equal(batches(3), batches(4))


def test_each_epoch_covers_every_block_once_and_batches_cross_epochs():
    it = BlockIterator(TOKENS, T, B, seed=1)
    n0, n1 = it.blocks_in_epoch(0), it.blocks_in_epoch(1)
    assert n0 % B != 0 or n1 % B != 0  # the sizes chosen make some batch straddle an epoch boundary
    starts = [s for _ in range(6 * (n0 + n1) // B) for s in _starts(it.next()[0])]
    for epoch, (lo, hi) in enumerate([(0, n0), (n0, n0 + n1)]):
        offset = starts[lo] % T
        assert all(s % T == offset for s in starts[lo:hi])  # one offset per epoch
        assert sorted(starts[lo:hi]) == [offset + j * T for j in range(hi - lo)]  # every block exactly once
        assert offset + (hi - lo + 1) * T + 1 > len(TOKENS)  # and no block that fits is left out
    assert it.epoch >= 2
    # epochs differ in offset or order
    assert starts[:n0] != starts[n0:n0 + n1]


def test_restore_equals_continuing():
    it = BlockIterator(TOKENS, T, B, seed=2)
    for _ in range(9):  # past the first epoch boundary (~30 blocks per epoch)
        it.next()
    state = json.loads(json.dumps(it.state()))
    expected = [it.next() for _ in range(10)]
    fresh = BlockIterator(TOKENS, T, B, seed=2).restore(state)
    for (x, y), (x2, y2) in zip(expected, [fresh.next() for _ in range(10)]):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_restore_rejects_state_from_other_data():
    with pytest.raises(ConfigError, match="does not fit"):
        BlockIterator(TOKENS, T, B, seed=0).restore({"epoch": 0, "index": 10_000})


def test_tiny_data_still_iterates_and_too_short_is_config_error():
    it = BlockIterator(np.arange(T + 1), T, B, seed=0)  # exactly one block
    assert [it.blocks_in_epoch(e) for e in range(20)] == [1] * 20  # the offset never pushes it out
    x, y = it.next()
    np.testing.assert_array_equal(x, np.tile(np.arange(T), (B, 1)))
    with pytest.raises(ConfigError, match="longer than the whole dataset"):
        BlockIterator(np.arange(T), T, B, seed=0)


def test_eval_batches_fixed_and_wrapping():
    batches = eval_batches(TOKENS, T, B, n_batches=3)
    assert len(batches) == 3
    assert [s for x, _ in batches for s in _starts(x)] == [j * T for j in range(3 * B)]
    np.testing.assert_array_equal(batches[1][1], batches[1][0] + 1)
    assert len(eval_batches(TOKENS, T, B, n_batches=100)) == (len(TOKENS) - 1) // T // B
    (x, _), = eval_batches(np.arange(2 * T + 1), T, B, n_batches=4)  # 2 blocks < one batch: cycle them
    assert _starts(x) == [0, T, 0, T, 0]
    with pytest.raises(ConfigError):
        eval_batches(np.arange(T), T, B, 1)


def test_split_text_proportions():
    docs = ["a" * 600, "b" * 398]
    train, val = split_text(docs, 0.1)
    assert train + val == "\n\n".join(docs)
    assert len(val) == 100 and val.endswith("b")
    assert split_text(["x", "y"], 0.5, val_docs=["v1", "v2"]) == ("x\n\ny", "v1\n\nv2")
    with pytest.raises(ConfigError):
        split_text(["a"], 0.1)


def test_default_corpus():
    train, val = load_texts(DataConfig())
    assert val is None
    assert sum(map(len, train)) > 400_000 and len(train) > 50
    assert train == data.default_corpus()  # same order every time


def test_txt_file_is_read_exactly(tmp_path):
    (tmp_path / "a.txt").write_text("first  doc\n\n  indented\n")
    (tmp_path / "b.txt").write_text("second")
    assert load_texts(DataConfig(path=str(tmp_path / "a.txt")))[0] == ["first  doc\n\n  indented\n"]
    train, val = load_texts(DataConfig(path=str(tmp_path / "*.txt"), val_path=str(tmp_path / "b.txt")))
    assert train == ["first  doc\n\n  indented\n", "second"] and val == ["second"]


def _write(tmp_path, fmt, rows):
    import pandas as pd

    path = tmp_path / f"d.{fmt}"
    df = pd.DataFrame(rows)
    {"jsonl": lambda: df.to_json(path, orient="records", lines=True), "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tabular_files_use_text_column(tmp_path, fmt):
    path = _write(tmp_path, fmt, {"id": [1, 2], "story": ["once upon, a time", "the end"]})
    assert load_texts(DataConfig(path=path, text_column="story"))[0] == ["once upon, a time", "the end"]
    with pytest.raises(ConfigError, match="available columns: id, story"):
        load_texts(DataConfig(path=path))


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data file .*missing.txt not found"):
        load_texts(DataConfig(path=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="no data files match"):
        load_texts(DataConfig(path=str(tmp_path / "*.jsonl")))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unsupported"):
        load_texts(DataConfig(path=str(tmp_path / "d.xml")))
    with pytest.raises(ConfigError, match="val_split"):
        load_texts(DataConfig(val_split="validation"))


def test_hub_failure_is_one_line_config_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="roneneldan/TinyStories") as e:
        load_texts(DataConfig(path="roneneldan/TinyStories"))
    assert "\n" not in str(e.value)
