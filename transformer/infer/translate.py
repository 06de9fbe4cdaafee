"""Decoding a target for each source with an encoder-decoder: greedy, sampled, or beam search. The encoder and each
layer's cross-attention K/V run once per source; the decoder runs one token at a time on a KV cache."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.infer.beam_search import beam_search, never_emitted
from transformer.infer.sampling import FILTERED, Sampler


@functools.lru_cache(maxsize=16)
def _compiled_beam(graphdef, beam: int, max_new: int, bos: int, eos: int, pad: int, length_penalty: float):
    K, N = beam, max_new

    def run(params, src_BS, valid_BS):
        model = nnx.merge(graphdef, params)
        B = src_BS.shape[0]
        kvs = model.cross_kvs(model.encode(src_BS, valid_BS))  # once per source, then shared by its K beams
        kvs, valid_RS = jax.tree.map(lambda a: jnp.repeat(a, K, axis=0), (kvs, valid_BS))
        R = B * K

        def step(prev_R, t, cache):
            logits_R1V, cache = model.decode(prev_R[:, None], valid_RS, cross_kvs=kvs,
                                             positions_BT=jnp.full((R, 1), t, jnp.int32),
                                             mask_B1TS=(jnp.arange(N) <= t)[None, None, None, :], cache=cache,
                                             cache_index=t)
            return logits_R1V[:, 0], cache

        tokens_BKN, score_BK = beam_search(step, model.init_cache(R, N), batch=B, beam=K, max_new=N, bos=bos,
                                           eos=eos, pad=pad, length_penalty=length_penalty)
        return tokens_BKN[:, 0], score_BK[:, 0]

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _compiled_translate(graphdef, sampler: Sampler, max_new: int, bos: int, eos: int, pad: int):
    N = max_new

    def run(params, src_BS, valid_BS, keys_B):
        model = nnx.merge(graphdef, params)
        B = src_BS.shape[0]
        kvs = model.cross_kvs(model.encode(src_BS, valid_BS))  # the source is encoded once, its K/V kept
        never_V = never_emitted(model.cfg.vocab_size, pad=pad, bos=bos, eos=eos)
        state = {"t": jnp.zeros((), jnp.int32), "tokens": jnp.full((B, N + 1), pad, jnp.int32).at[:, 0].set(bos),
                 "cache": model.init_cache(B, N), "done": jnp.zeros((B,), bool)}

        def step(s):
            t = s["t"]
            logits_B1V, cache = model.decode(
                jax.lax.dynamic_slice_in_dim(s["tokens"], t, 1, axis=1), valid_BS, cross_kvs=kvs,
                positions_BT=jnp.full((B, 1), t, jnp.int32), mask_B1TS=(jnp.arange(N) <= t)[None, None, None, :],
                cache=s["cache"], cache_index=t)
            keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), t))(keys_B)
            logits_BV = jnp.where(never_V, FILTERED, logits_B1V[:, 0])
            nxt_B = jnp.where(s["done"], pad, sampler(logits_BV, keys))
            return {"t": t + 1, "tokens": jax.lax.dynamic_update_slice_in_dim(s["tokens"], nxt_B[:, None], t + 1, 1),
                    "cache": cache, "done": s["done"] | (nxt_B == eos)}

        out = jax.lax.while_loop(lambda s: (s["t"] < N) & ~jnp.all(s["done"]), step, state)
        return out["tokens"][:, 1:]

    return jax.jit(run)


def translate(graphdef, params, sources: Sequence[Sequence[int]], *, max_new_tokens: int, bos: int, eos: int,
              pad: int, sampler: Sampler = Sampler(0.0), key=None, beam_size: int = 1,
              length_penalty: float = 0.6, target_margin: int | None = 16) -> list[list[int]]:
    """Decode a target for each source with an encoder-decoder: greedy by default, sampling with `sampler`, or
    beam search with `beam_size` > 1 (GNMT length penalty). The encoder and each layer's cross-attention K/V run
    once per source; the decoder uses a KV cache. Returns the target tokens of each row, cut before EOS.

    A source may hold at most the model's `max_len` tokens (a ValueError otherwise: cut longer ones, as
    `evaluate.translate_texts` does). A target stops at `max_new_tokens`, at `max_len` tokens with learned positions
    (the end of the position table), or `target_margin` tokens past the batch's source length rounded up to 16,
    whichever comes first (None: no margin). A translation is rarely much longer than its source (in Multi30k's
    training pairs the target never runs more than 14 tokens past the source), and the cap keeps a model that has
    not learnt to stop yet, and the cache every step attends over, from running to the whole context."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one token")
    cfg = nnx.merge(graphdef, params).cfg
    S = max(len(s) for s in sources)
    if S > cfg.max_len:
        raise ValueError(f"a source of {S} tokens is longer than the model's context of {cfg.max_len}; cut it")
    # Nearby lengths share one compiled program; padding never runs past the context (a learned position table has
    # no row there, and its out-of-range lookup would fill the padding with NaN).
    S = min(-(-S // 16) * 16, cfg.max_len)
    if cfg.positions == "learned":
        max_new_tokens = min(max_new_tokens, cfg.max_len)
    if target_margin is not None:
        max_new_tokens = min(max_new_tokens, S + target_margin)
    src = np.full((len(sources), S), pad, np.int32)
    for i, s in enumerate(sources):
        src[i, :len(s)] = s
    key = jax.random.key(0) if key is None else key
    keys_B = jnp.stack([jax.random.key_data(jax.random.fold_in(key, i)) for i in range(len(sources))])
    if beam_size > 1:
        run = _compiled_beam(graphdef, beam_size, max_new_tokens, bos, eos, pad, float(length_penalty))
        out = np.asarray(run(params, jnp.asarray(src), jnp.asarray(src != pad))[0])
    else:
        run = _compiled_translate(graphdef, sampler, max_new_tokens, bos, eos, pad)
        out = np.asarray(run(params, jnp.asarray(src), jnp.asarray(src != pad), keys_B))
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows
