"""Data at pretraining scale on this machine: preparing a generated corpus into token shards, and reading them back.

    python benchmarks/data_pipeline.py [--gb 2,0.5] [--workers 1,2] [--tokenizers sentencepiece,bpe] [--dir DIR]

Generates (once, under --dir) a corpus of at least the largest --gb of text as .jsonl files: documents of 1-12
paragraphs drawn from the embedded corpus (Python's help topics) and tiny Shakespeare (../shared/data), shuffled, with
about one word in eight replaced by another of the corpus and numbers spliced in, so it neither repeats nor
compresses to nothing. For each tokenizer (sentencepiece BPE and byte-level BPE, both 8,192 pieces, trained on a
64 MB sample) and corpus size, it prepares the shards with 1 and 2 worker processes (each in a fresh process, with
an empty cache) and prints the throughput in MB of text per second (the tokenizer's training, timed apart, not
included) and the peak resident memory of the preparing process and all its workers together (sampled every
0.25 s; the tokenizer trains in a process of its own, so its memory is not added to the preparation's). Then the
loader: tokens per second delivered as gpt2_small batches (12 x 1,024, with document segments) from the shards, read
from the disk (the shards dropped from the page cache first, as for a corpus larger than memory) and then from the
page cache, and the time to the first batch of a run resumed deep into them.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    shakespeare = SHARED / "data/tinyshakespeare/input.txt"
    if shakespeare.exists():
        text += "\n\n" + shakespeare.read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]


def generate(out_dir: Path, gb: float, seed: int = 0) -> list[Path]:
    """.jsonl files of ~256 MB each until `gb` GB of text; files already there are kept (generated once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = int(gb * 2**30)
    files = sorted(out_dir.glob("part_*.jsonl"))
    have = sum(int(f.stat().st_size) for f in files)
    pool = paragraphs()
    words = sorted({w for p in pool[:5000] for w in p.split()})
    rng = np.random.default_rng([seed, len(files)])
    while have < target:
        path = out_dir / f"part_{len(files):03d}.jsonl"
        size = 0
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            while size < 256 * 2**20 and have + size < target:
                doc = "\n\n".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 13))).split(" ")
                swap = rng.integers(0, len(doc), len(doc) // 8)
                for k, w in zip(swap, rng.integers(0, len(words), len(swap))):
                    doc[k] = words[w]
                for k in rng.integers(0, len(doc), max(1, len(doc) // 40)):
                    doc[k] = f"{doc[k]} {rng.integers(0, 10**6)}"
                line = json.dumps({"text": " ".join(doc)}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
        os.replace(f"{path}.tmp", path)
        files.append(path)
        have += size
        print(f"generated {path.name}: {size / 2**20:.0f} MB ({have / 2**30:.2f} GB in all)", flush=True)
    return files


def corpus_of(files: list[Path], gb: float) -> tuple[str, float]:
    """A glob naming the first files that hold `gb` GB, as a directory of links (the data path of one size)."""
    chosen, total = [], 0
    for f in files:
        if total >= gb * 2**30 * 0.99:
            break
        chosen.append(f)
        total += f.stat().st_size
    link_dir = files[0].parent / f"size_{gb:g}"
    link_dir.mkdir(exist_ok=True)
    for f in chosen:
        if not (link_dir / f.name).exists():
            (link_dir / f.name).symlink_to(f)
    return str(link_dir / "*.jsonl"), total / 2**20


PREPARE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from transformer.config import DataConfig
from transformer.data.prepare import _sample_tokenizer, cache_root, prepared_shards
from transformer.data.sources import source_identity
cfg = DataConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
tok = _sample_tokenizer(cfg, source_identity(cfg), cache_root(cfg), lambda s: None)
tok_seconds = time.perf_counter() - t
t = time.perf_counter()
tok, cache = prepared_shards(cfg, tok, log=lambda s: None)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"seconds": seconds, "tokenizer_seconds": tok_seconds, "peak_kb": peak, "cache": cache}}))
"""


def prepare(data: str, tokenizer: str, workers: int, cache_dir: str) -> dict:
    import shutil

    shutil.rmtree(os.path.join(cache_dir, "shards"), ignore_errors=True)  # the tokenizer stays cached
    settings = {"path": data, "prepared": True, "cache_dir": cache_dir, "workers": workers, "vocab_size": 8192,
                "tokenizer": tokenizer, "tokenizer_sample_mb": 64}
    proc = subprocess.Popen([sys.executable, "-c", PREPARE.format(repo=str(REPO)), json.dumps(settings)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:  # the whole process tree's resident memory, sampled: the real peak at any moment
        peak = max(peak, tree_rss_kb(proc.pid))
        time.sleep(0.25)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        sys.exit(f"preparation failed: {stderr.strip().splitlines()[-1]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if peak:  # Linux (/proc); elsewhere the process's own and its largest child's peaks, summed
        result["peak_kb"] = peak
    return result


def tree_rss_kb(pid: int) -> int:
    """Resident memory (kB) of a process and all its descendants, from /proc; 0 where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS")), 0)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return 0
    return rss + sum(tree_rss_kb(c) for c in children)


def evict(cache: str) -> None:
    """Drop the shards from the page cache (POSIX_FADV_DONTNEED, no privileges needed): the next reads come from the
    disk, as they do for a corpus larger than memory."""
    for path in glob.glob(os.path.join(cache, "*")):
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def loader(cache: str, batches: int = 300) -> tuple[float, float]:
    from transformer.data.loader import ShardPipeline

    p = ShardPipeline(cache, T=1024, batch_rows=12, eval_rows=12, n_eval=1, seed=0)
    every = np.arange
    p.next(0, every)
    t = time.perf_counter()
    tokens = sum(p.next(s, every)["inputs"].size for s in range(1, batches + 1))
    rate = tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    resumed = ShardPipeline(cache, T=1024, batch_rows=12, eval_rows=12, n_eval=1, seed=0)
    resumed.restore({"batch": 1_000_000})
    resumed.next(1_000_000, every)
    return rate, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", default="2,0.5")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tokenizers", default="sentencepiece,bpe")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/transformer_data_bench"))
    ap.add_argument("--loader-only", action="store_true", help="time the loader on the shards already in --dir")
    args = ap.parse_args()
    if args.loader_only:
        caches = {t: c for t in args.tokenizers.split(",") for c in glob.glob(str(args.dir / f"cache_{t}/shards/*"))
                  if os.path.isdir(c)}
        return time_loader(caches)
    sizes = sorted((float(g) for g in args.gb.split(",")), reverse=True)
    files = generate(args.dir / "corpus", sizes[0])
    print("tokenizer | corpus GB | workers | MB/s | seconds | peak RSS MB | tokenizer training s (cached after "
          "the first)", flush=True)
    caches = {}
    for tokenizer in args.tokenizers.split(","):
        for gb in sizes:
            data, mb = corpus_of(files, gb)
            for workers in (int(w) for w in args.workers.split(",")):
                r = prepare(data, tokenizer, workers, str(args.dir / f"cache_{tokenizer}"))
                caches[tokenizer] = r["cache"]
                print(f"{tokenizer} | {mb / 1024:.2f} | {workers} | {mb / r['seconds']:.1f} | {r['seconds']:.0f} | "
                      f"{r['peak_kb'] / 1024:.0f} | {r['tokenizer_seconds']:.0f}", flush=True)
    time_loader(caches)


def time_loader(caches: dict[str, str]) -> None:
    states = ("disk", "page cache") if hasattr(os, "posix_fadvise") else ("page cache",)
    for tokenizer, cache in caches.items():
        for state in states:
            if state == "disk":
                evict(cache)
            rate, first = loader(cache)
            print(f"loader ({tokenizer} shards, read from the {state}): {rate / 1e6:.2f}M tokens/s as 12 x 1,024 "
                  f"batches with segments; first batch of a run resumed at batch 1,000,000: {first:.2f} s", flush=True)


if __name__ == "__main__":
    main()
