import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

from transformer.config import ConfigError, DataConfig
from transformer.data import hub, sources
from transformer.data.blocks import BlockIterator, eval_batches
from transformer.data.sources import load_texts, split_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert train == sources.default_corpus()  # same order every time


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
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: True)
    with pytest.raises(ConfigError, match="roneneldan/TinyStories") as e:
        load_texts(DataConfig(path="roneneldan/TinyStories"))
    assert "\n" not in str(e.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_reachability_check(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.hub_reachable(f"http://127.0.0.1:{port}")
        assert not hub.hub_reachable(f"http://127.0.0.1:{_closed_port()}")
        assert not hub.hub_reachable("https://hub.invalid")  # a name that never resolves (RFC 2606)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")  # the libraries would go through the proxy
        assert hub.hub_reachable("https://hub.invalid")

    def hang(*args, **kwargs):  # a dead resolver or a dropped SYN
        time.sleep(1)
        raise TimeoutError

    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.perf_counter()
    assert not hub.hub_reachable("https://huggingface.co", timeout=0.2)
    assert time.perf_counter() - t0 < 1


def _cache_as_hub_dataset(tmp_path, repo_id: str, texts: list[str]):
    """The datasets cache as one online load of hub dataset `repo_id` (a single 'train' split) leaves it."""
    from datasets.packaged_modules.json.json import Json

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    owner, name = repo_id.split("/")
    builder = Json(dataset_name=name, data_files={"train": str(src)}, cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, tmp_path / "cache" / f"{owner}___{name}" / "default" / "0.0.0" / "0123abcd")
    return tmp_path / "cache"


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_dataset_without_network_comes_from_the_cache(tmp_path, monkeypatch, capfd, why):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _cache_as_hub_dataset(
        tmp_path, "some_owner/tiny_tales", ["once upon a time", "the end"]))
    if why == "HF_HUB_OFFLINE":  # what the variable sets at import
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: pytest.fail("checked the network"))
    else:
        monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: False)
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connects.append(address))
    capfd.readouterr()

    assert load_texts(DataConfig(path="some_owner/tiny_tales")) == (["once upon a time", "the end"], None)
    with pytest.raises(ConfigError, match="not in the local cache; use a local file") as e:
        load_texts(DataConfig(path="some_owner/absent"))
    assert ("HF_HUB_OFFLINE=1" if why == "HF_HUB_OFFLINE" else "huggingface.co) is unreachable") in str(e.value)
    with pytest.raises(ConfigError, match="Unknown split"):
        load_texts(DataConfig(path="some_owner/tiny_tales", split="validation"))
    assert connects == []
    assert capfd.readouterr().err == ""  # the libraries' warnings (using the cache, ...) stay quiet
    assert datasets.config.HF_HUB_OFFLINE == constants.HF_HUB_OFFLINE == (why == "HF_HUB_OFFLINE")


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "https://hub.invalid"}, {"HF_HUB_OFFLINE": "1"}])
def test_train_cli_with_a_hub_dataset_and_no_network_fails_fast_in_one_line(tmp_path, env):
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "HF_HOME": str(tmp_path / "hf"), **env}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data.path", "some_owner/some_dataset",
                           "--train.run_dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load 'some_owner/some_dataset'"), proc.stderr
    assert "not in the local cache" in lines[0] and "Traceback" not in proc.stderr + proc.stdout
    # 4-10 s of it is starting Python, jax and datasets on a busy 2-core machine (tests run two at a time); the
    # libraries' own retries took ~25 s more before the error (33 s in all, and 20+ warning lines)
    assert elapsed < 20, elapsed
