"""Prepare a corpus once into token shards that every run of the same data and tokenizer shares:

    python -m transformer.prepare --data.path='corpus/*.jsonl' --data.tokenizer=sentencepiece --data.workers=2
    python train.py --data.prepared=true --data.path='corpus/*.jsonl' --data.tokenizer=sentencepiece ...

Takes the same `--data.*` options (and `--config NAME`) as train.py; documents stream from local .txt (one per file),
.jsonl / .json / .parquet / .csv files or a hub dataset, and are tokenized by data.workers processes. Prints the cache
directory, the tokens of each split and the throughput. A preparation cut short resumes where it stopped when run
again; train.py with data.prepared=true runs this itself when the cache is not complete.
"""
from __future__ import annotations

import sys
import time

from transformer.cli import die


def main(argv=None) -> int:
    from transformer.cli import parse_args
    from transformer.config import ConfigError
    from transformer.data.prepare import prepared_shards
    from transformer.data.shards import read_index, total_tokens

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg, _ = parse_args(argv)
        t0 = time.perf_counter()
        tok, cache = prepared_shards(cfg.data, log=lambda s: print(s, flush=True))
        index = read_index(cache)
    except ConfigError as e:
        die(str(e))
    seconds = time.perf_counter() - t0
    train, val = total_tokens(index, "train"), total_tokens(index, "val")
    print(f"{cache}: {train:,} training and {val:,} validation tokens ({index['dtype']}, end-of-text id "
          f"{index['eot']}, vocabulary {index['vocab']:,}), {len(index['flushes'])} flushes; {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
