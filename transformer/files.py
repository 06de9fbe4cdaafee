"""Writing a file so that a crash never leaves it half written: readers see the old file or the new one, whole.

Every cache, index, config and tokenizer the library writes goes through here: the bytes go to a temporary file
beside the target (same directory, so the rename cannot cross filesystems) and `os.replace` swaps it in, which
POSIX makes atomic. `durable=True` also fsyncs before the swap, for files whose loss after a power cut would be
silent (a shard index that says data exists which never reached the disk).
"""
from __future__ import annotations

import contextlib
import json
import os


def write_atomic(path: str, write, *, binary: bool = False, durable: bool = False) -> str:
    """Call `write(f)` on a temporary file, then swap it in at `path`; the temporary file is removed on failure."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def write_json_atomic(path: str, obj, *, durable: bool = False, **dump_kwargs) -> str:
    return write_atomic(path, lambda f: json.dump(obj, f, **dump_kwargs), durable=durable)
