"""Train the shakespeare_char preset on tiny Shakespeare; print val loss at the last step and median tokens/s.

    python benchmarks/train_shakespeare_char.py [--steps 2000] [--peer-python /path/to/python-with-torch]

With --peer-python, the PyTorch peer (../shared/peers/torch_char_gpt.py, nanoGPT's CPU recipe) runs right after on
the same machine and the throughput ratio is printed: machines differ up to 3x, so only the ratio is comparable.
Extra arguments are passed to train.py as overrides (e.g. --model.dtype=bfloat16).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def run_ours(steps: int, data: str, extra: list[str]) -> dict:
    from transformer.cli import parse_args
    from transformer.train import METRICS_FILE, train
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, _ = parse_args(["--config", "shakespeare_char", "--data.path", data, "--train.run_dir", run_dir,
                             "--train.steps", str(steps), "--train.log_interval=10", "--train.progress=false",
                             "--train.ckpt_interval", str(steps), *extra])
        train(cfg)
        records = [json.loads(line) for line in open(os.path.join(run_dir, METRICS_FILE))]
        full_val = whole_val_loss(run_dir)
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # first interval includes compiling
    val = [r for r in records if "val_loss" in r][-1]
    return {"val_loss": val["val_loss"], "val_step": val["step"], "full_val_loss": full_val,
            "tokens_per_s": statistics.median(speeds),
            "mfu": statistics.median(r["mfu"] for r in records if r.get("mfu"))}


def whole_val_loss(run_dir: str) -> float:
    """Loss over every non-overlapping block of the validation split (the 20-batch figure samples 240 of ~1,740)."""
    import jax
    import numpy as np
    from flax import nnx

    from transformer.data.blocks import eval_batches
    from transformer.data.prepare import TOKENS_DIR
    from transformer.infer.loading import load_run
    from transformer.tasks.losses import cross_entropy
    run = load_run(run_dir)
    val = np.load(os.path.join(run_dir, TOKENS_DIR, "val.npy"))
    T, B = run.cfg.model.max_len, run.cfg.train.batch_size
    loss = jax.jit(lambda p, x, y: cross_entropy(nnx.merge(run.graphdef, p)(x), y))
    batches = eval_batches(val, T, B, n_batches=len(val))
    return float(np.mean([loss(run.params, x, y) for x, y in batches]))


def run_peer(python: str, steps: int, data: str) -> dict:
    out = subprocess.run([python, str(SHARED / "peers/torch_char_gpt.py"), "--iters", str(steps), "--data", data],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"median ([\d.]+) ms/iter, (\d+) tokens/s, val loss ([\d.]+)", out)
    return {"ms": float(m.group(1)), "tokens_per_s": float(m.group(2)), "val_loss": float(m.group(3))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--data", default=str(SHARED / "data/tinyshakespeare/input.txt"))
    ap.add_argument("--peer-python", default=os.environ.get("TORCH_PYTHON", ""))
    args, extra = ap.parse_known_args()
    if not os.path.isfile(args.data):
        print(f"error: {args.data} not found: pass --data PATH/TO/tinyshakespeare/input.txt", file=sys.stderr)
        sys.exit(2)
    ours = run_ours(args.steps, args.data, extra)
    print(f"ours: val loss {ours['val_loss']:.4f} at step {ours['val_step']} (20 val batches; "
          f"{ours['full_val_loss']:.4f} over the whole val split), "
          f"median {ours['tokens_per_s']:,.0f} tokens/s, MFU {ours['mfu']:.1%} {' '.join(extra)}", flush=True)
    if args.peer_python:
        peer = run_peer(args.peer_python, args.steps, args.data)
        print(f"torch peer: val loss {peer['val_loss']:.4f}, median {peer['tokens_per_s']:,.0f} tokens/s "
              f"({peer['ms']:.1f} ms/iter)")
        print(f"throughput ratio ours / peer: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x "
              f"(target >= 1.3x); val loss target <= 1.88: {'met' if ours['val_loss'] <= 1.88 else 'NOT met'}")
    else:
        print("peer not run: pass --peer-python (a Python with torch) for the side-by-side ratio")


if __name__ == "__main__":
    main()
