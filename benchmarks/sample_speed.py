"""Generation speed of transformer.infer.sampling.generate() on the shakespeare_char shape with a 1024-token context.

    python benchmarks/sample_speed.py [--peer-python /path/to/python-with-torch-and-transformers]

Prints, all measured in this run (medians of 3 timed runs after a compile run):
  - tokens/s generating 500 new tokens at batch 1 and 16 (temperature 1, no top-k, random weights);
  - the same with the full forward re-run for every token (the nanoGPT way, no cache), as one compiled loop;
  - Hugging Face transformers' KV-cache generate() on a GPT-2 model of the same shape, when --peer-python has torch
    and transformers (they are not project dependencies), and the ratios;
  - the time per new token at context lengths 64, 256 and 1024 (should stay roughly flat: the KV cache);
  - the wall time of `sample.py --max-new-tokens 1` on a freshly trained shakespeare_char run (interpreter start,
    checkpoint restore, compilation, first token).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from transformer.config import ModelConfig  # noqa: E402
from transformer.infer.sampling import Sampler, generate  # noqa: E402
from transformer.model import DecoderLM  # noqa: E402

CFG = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=1024)
NEW = 500

HF_SCRIPT = r"""
import sys, time, statistics, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=65, n_positions=1024, n_embd=128, n_layer=4, n_head=4)
model = GPT2LMHeadModel(cfg).eval()
for B in (1, 16):
    x = torch.randint(0, 65, (B, 1))
    times = []
    for i in range(4):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, do_sample=True, top_k=0, max_new_tokens=500, min_new_tokens=500,
                                 pad_token_id=0, attention_mask=torch.ones_like(x))
        times.append(time.perf_counter() - t)
        assert out.shape[1] == 501
    print(f"HF {B} {B * 500 / statistics.median(times[1:]):.1f}")
"""


def timed(fn, runs=3):
    fn()  # compile
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(graphdef, params, batch, prompt_len=1, new=NEW):
    prompts = [[(7 * i + b) % 65 for i in range(prompt_len)] for b in range(batch)]
    key = jax.random.key(0)
    return lambda: generate(graphdef, params, prompts, max_new_tokens=new, max_len=CFG.max_len,
                            sampler=Sampler(1.0), key=key)


def no_cache(graphdef, params, batch):
    """nanoGPT's generate: every new token re-runs the model over the whole sequence (here a fixed 1+NEW buffer
    with a causal mask, so it is one compiled loop rather than a recompile per length)."""
    L = 1 + NEW

    @jax.jit
    def run(params, key):
        model = nnx.merge(graphdef, params)
        tokens = jnp.zeros((batch, L), jnp.int32)

        def body(t, tokens):
            logits = model(tokens)[:, t - 1]
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logits)
            return tokens.at[:, t].set(nxt)
        return jax.lax.fori_loop(1, L, body, tokens)

    return lambda: jax.block_until_ready(run(params, jax.random.key(0)))


def per_token_ms(graphdef, params, context):
    """(time for 65 new tokens - time for 1) / 64, with the prompt sized so generation ends at `context`."""
    prompt = max(context - 65, 1)
    t_long = timed(ours(graphdef, params, 1, prompt, 65))
    t_short = timed(ours(graphdef, params, 1, prompt, 1))
    return (t_long - t_short) / 64 * 1e3


def time_to_first_token() -> float:
    data = SHARED / "data/tinyshakespeare/input.txt"
    with tempfile.TemporaryDirectory() as run:
        env = {**os.environ, "XLA_FLAGS": ""}
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "shakespeare_char", "--data.path",
                        str(data), "--train.run_dir", run, "--train.steps", "50", "--train.progress=false",
                        "--train.sample_tokens=0"], check=True, capture_output=True, env=env)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", run, "--prompt", "ROMEO:",
                        "--max-new-tokens", "1", "--no-stream"], check=True, capture_output=True, env=env)
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=os.environ.get("TORCH_PYTHON", ""))
    args = ap.parse_args()
    graphdef, params = nnx.split(DecoderLM(CFG, rngs=nnx.Rngs(0)))
    results = {}
    for batch in (1, 16):
        t = timed(ours(graphdef, params, batch))
        t_nc = timed(no_cache(graphdef, params, batch))
        results[batch] = batch * NEW / t
        print(f"batch {batch:2d}: KV cache {batch * NEW / t:8,.0f} tokens/s | full forward every token "
              f"{batch * NEW / t_nc:8,.0f} tokens/s | ratio {t_nc / t:5.1f}x (target >= 5x)", flush=True)
    if args.peer_python:
        out = subprocess.run([args.peer_python, "-c", HF_SCRIPT], capture_output=True, text=True)
        if out.returncode:
            print(f"HF transformers peer failed: {out.stderr.strip().splitlines()[-1]}")
        for line in out.stdout.splitlines():
            _, b, tps = line.split()
            b, tps = int(b), float(tps)
            print(f"batch {b:2d}: HF transformers generate() {tps:8,.0f} tokens/s | ours / HF "
                  f"{results[b] / tps:4.2f}x (target >= 2x)")
    else:
        print("HF transformers comparison not run: pass --peer-python (a Python with torch and transformers)")
    for context in (64, 256, 1024):
        print(f"context {context:4d}: {per_token_ms(graphdef, params, context):.3f} ms per new token (batch 1)",
              flush=True)
    print(f"sample.py time to first token on a trained shakespeare_char run: {time_to_first_token():.2f} s "
          "(interpreter start, restore, compile included; target < 5 s)")


if __name__ == "__main__":
    main()
