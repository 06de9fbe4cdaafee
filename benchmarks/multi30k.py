"""Multi30k German -> English on this machine: train configs/multi30k_de_en.py for a budget of training minutes and
print sacreBLEU on the validation pairs (detokenized, cased, beam 4) after 15, 30 and 60 of them.

    python benchmarks/multi30k.py [--minutes 60] [--run-dir DIR] [--peer-python /path/to/python-with-torch]
                                  [--peer-log FILE] [--model.d_model=320 ...]

Training time is wall-clock time from the first train step (compilations included) with the evaluation pauses taken
out, as in the PyTorch peer (../shared/peers/torch_multi30k.py); data preparation before it counts in neither. Each
evaluation prints how long it took, and the translations of two fixed sentences. With --peer-python the peer runs
right after on the same machine (machines differ up to 3x in speed, so only a same-machine comparison counts) and
both BLEU columns are printed side by side; --peer-log reads a log of an earlier peer run instead. With --run-dir the
final model is saved there as a run that `sample.py` and `python -m transformer.infer.evaluate` load. Extra arguments are
config overrides. Runs for over an hour by default: run it in the background, never in the test suite.
"""
import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
MARKS = (15, 30, 60, 90, 120)
PEER_LINE = re.compile(r"== ([\d.]+) min, step (\d+): val sacreBLEU \(greedy\) ([\d.]+)")


def run_ours(minutes: float, data: Path, run_dir: str, extra: list[str]) -> dict:
    import jax
    import numpy as np

    from transformer import platform, sharding
    from transformer.checkpoint import Checkpointer, write_run_config
    from transformer.cli import parse_args
    from transformer.infer.evaluate import bleu, translate_texts
    from transformer.tasks import TASKS
    from transformer.train.setup import build_state, checkpoint_meta
    from transformer.train.step import inference_params, make_steps

    files = {"source_file": "train.de", "target_file": "train.en", "val_source_file": "val.de",
             "val_target_file": "val.en"}
    cfg, _ = parse_args(["--config", "multi30k_de_en", "--train.run_dir", run_dir,
                         *[f"--data.{k}={data / v}" for k, v in files.items()], *extra])
    t_prep = time.perf_counter()
    cfg = platform.resolve(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    task = TASKS["seq2seq"]
    prepared = task.prepare(cfg, run_dir)
    tok, val_pairs = prepared.tokenizer, prepared.val
    pipeline, vocab = task.pipeline(cfg, prepared, sharding.batch_shards(mesh))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)).validate()
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    state = create()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"ours: {n_params:,} parameters, vocab {vocab}, {len(pipeline.train):,} training pairs, "
          f"data preparation {time.perf_counter() - t_prep:.0f} s (not counted); "
          f"{' '.join(extra) or 'preset as is'}", flush=True)

    A, T = cfg.train.grad_accum, cfg.model.max_len
    batch_A = sharding.batch_sharding(mesh, lead_axes=1)
    sources, references = [s for s, _ in val_pairs], [t for _, t in val_pairs]
    marks = [m for m in MARKS if m <= minutes] or [minutes]
    results, step, paused, t0 = {}, 0, 0.0, time.perf_counter()
    while marks:
        step += 1
        local = pipeline.next(step, np.arange)
        batch = {k: jax.device_put(a.reshape(A, -1, *a.shape[1:]), batch_A) for k, a in local.items()}
        state, metrics = train_step(state, batch)
        if step % 10 == 0:  # keep the host at most a few steps ahead, so the clock measures finished steps
            jax.block_until_ready(metrics)
        if step % 200 == 0:
            print(f"step {step} loss {float(metrics['loss']):.3f} train-min "
                  f"{(time.perf_counter() - t0 - paused) / 60:.1f}", flush=True)
        if (time.perf_counter() - t0 - paused) / 60 < marks[0]:
            continue
        jax.block_until_ready(state)
        e0 = time.perf_counter()
        hyps = translate_texts(graphdef, inference_params(state), tok, T, sources, beam=cfg.train.bleu_beam)
        score = bleu(hyps, references).score
        seconds = time.perf_counter() - e0
        examples = translate_texts(graphdef, inference_params(state), tok, T, SENTENCES, beam=cfg.train.bleu_beam)
        results[marks[0]] = {"bleu": score, "step": step, "eval_seconds": seconds}
        print(f"== {marks[0]} min, step {step}: val sacreBLEU (beam {cfg.train.bleu_beam}) {score:.2f} "
              f"({len(sources)} sentences translated in {seconds:.1f} s, not counted)", flush=True)
        for src, hyp in zip(SENTENCES, examples):
            print(f"   {src} -> {hyp}", flush=True)
        if "ema" in state:  # what the weight average adds: the last weights themselves, beam and greedy
            for beam in (cfg.train.bleu_beam, 1):
                raw = bleu(translate_texts(graphdef, state["params"], tok, T, sources, beam=beam), references).score
                print(f"   without the weight average: {raw:.2f} (beam {beam})", flush=True)
        marks.pop(0)
        paused += time.perf_counter() - e0

    ckpt = Checkpointer(run_dir, keep=1)
    write_run_config(run_dir, cfg.to_dict())
    ckpt.save(step, state, checkpoint_meta(cfg, pipeline, tok))
    ckpt.wait()
    ckpt.close()
    return results


def run_peer(python: str, minutes: float, log: str) -> None:
    with open(log, "w") as f:
        subprocess.run([python, str(SHARED / "peers/torch_multi30k.py"), str(SHARED), str(minutes)], stdout=f,
                       stderr=subprocess.STDOUT, check=True)


def read_peer(log: str) -> dict:
    text = open(log, encoding="utf-8").read()
    return {float(m): {"bleu": float(b), "step": int(s)} for m, s, b in PEER_LINE.findall(text)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--data", type=Path, default=SHARED / "data/multi30k")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--peer-python", default=os.environ.get("TORCH_PYTHON", ""))
    ap.add_argument("--peer-log", default="", help="a log of torch_multi30k.py to compare with (or write, with "
                                                  "--peer-python)")
    args, extra = ap.parse_known_args()
    missing = [f for f in ("train.de", "train.en", "val.de", "val.en") if not (args.data / f).is_file()]
    if missing:
        print(f"error: {args.data} lacks {', '.join(missing)}: pass --data DIR holding Multi30k's "
              "train.{de,en} and val.{de,en}", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args.minutes, args.data, args.run_dir or tmp, extra)
    if not (args.peer_python or args.peer_log):
        return
    log = args.peer_log or os.path.join(tempfile.gettempdir(), "torch_multi30k.log")
    if args.peer_python:
        print(f"running the PyTorch peer for {args.minutes:g} training minutes (log: {log})", flush=True)
        run_peer(args.peer_python, args.minutes, log)
    peer = read_peer(log)
    print("training minutes | ours (beam 4) | PyTorch peer (greedy) | ours - peer")
    for mark, r in ours.items():
        p = peer.get(float(mark))
        if p:
            print(f"{mark:>16g} | {r['bleu']:13.2f} | {p['bleu']:21.2f} | {r['bleu'] - p['bleu']:+.2f}")
        else:
            print(f"{mark:>16g} | {r['bleu']:13.2f} | {'-':>21} |")


if __name__ == "__main__":
    main()
