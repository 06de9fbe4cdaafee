import json
import os

import pytest

from transformer.files import write_atomic, write_json_atomic


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "index.json")
    write_json_atomic(path, {"flushes": [1, 2]}, durable=True)

    def half_then_crash(f):
        f.write('{"flushes": [')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_crash)
    assert json.load(open(path)) == {"flushes": [1, 2]}
    assert os.listdir(tmp_path) == ["index.json"]


def test_binary_writes_replace_the_file(tmp_path):
    path = str(tmp_path / "a.bin")
    write_atomic(path, lambda f: f.write(b"old"), binary=True)
    write_atomic(path, lambda f: f.write(b"new!"), binary=True, durable=True)
    assert open(path, "rb").read() == b"new!"
