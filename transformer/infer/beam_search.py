"""Batched beam search with separate alive and finished sets (GNMT, Wu et al. 2016; tensor2tensor's beam_search).

Each batch item keeps K ALIVE hypotheses, ranked by raw log-probability (they all have the same length, so a length
penalty would not change their order), and K FINISHED ones, ranked by the GNMT score
    log p / ((5 + length) / 6) ** length_penalty,    length counting the tokens up to and including EOS.
Each step expands the alive beams over the vocabulary, PAD and BOS masked out so that they never appear inside a
hypothesis, and takes the 2K best candidates (C = 2K below): each beam has one EOS, so at least K of them go on. The
candidates ending in EOS are scored and merged into FINISHED (the best K stay); the best K others become ALIVE and the
state rows (the KV cache) follow their parents. A finished hypothesis therefore never takes a slot from a live one,
and hypotheses of different lengths only ever meet on the penalised score.

The loop ends after `max_new` tokens, or once every item has K finished hypotheses that none of its alive ones can
still beat: log p only falls as a hypothesis grows, so its log p divided by the largest penalty of any length it could
still finish at bounds every score it can reach. An item with fewer than K finished hypotheses at the end fills the
remaining slots with its best alive ones, scored at length `max_new`.

-inf marks an empty slot or an impossible candidate. It is only added, compared, and divided by a positive penalty,
never subtracted from itself, so no NaN arises; a slot that no hypothesis could fill comes back as pad, scored -inf.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def never_emitted(V: int, *, pad: int, bos: int, eos: int):
    """(V,) True at PAD and BOS, which a decoded target never holds (unless a vocabulary makes one of them EOS)."""
    vocab_V = jnp.arange(V)
    return ((vocab_V == pad) | (vocab_V == bos)) & (vocab_V != eos)


def _penalty(length, alpha: float):
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn, state, *, batch: int, beam: int, max_new: int, bos: int, eos: int, pad: int,
                length_penalty: float = 0.6):
    """Beam search over a pure `step_fn(tokens_R, t, state) -> (logits_RV, state)` where R = batch * beam rows (row
    b * beam + k is beam k of item b) and every leaf of `state` has R leading rows, reordered with the alive beams.
    Returns (tokens_BKN, scores_BK) sorted best first: each hypothesis up to and including its EOS, pad after it;
    scores are log p / ((5 + length) / 6) ** length_penalty, the raw log-probability when length_penalty is 0."""
    B, K, N, alpha = batch, beam, max_new, length_penalty
    rows_B1 = jnp.arange(B)[:, None] * K

    def body(s):
        t, alive_tokens_BKN = s["t"], s["alive_tokens"]
        last_BK = jax.lax.dynamic_index_in_dim(alive_tokens_BKN, jnp.maximum(t - 1, 0), 2, keepdims=False)
        logits_RV, inner = step_fn(jnp.where(t == 0, bos, last_BK).reshape(-1), t, s["inner"])
        V = logits_RV.shape[-1]
        never_V = never_emitted(V, pad=pad, bos=bos, eos=eos)
        # Masked after the softmax, not before: a score stays the model's own log-probability of its tokens.
        logp_RV = jnp.where(never_V, -jnp.inf, jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1))
        logp_BKV = logp_RV.reshape(B, K, V)
        logp_BC, flat_BC = jax.lax.top_k((s["alive_logp"][..., None] + logp_BKV).reshape(B, K * V), 2 * K)
        parent_BC, token_BC = flat_BC // V, (flat_BC % V).astype(jnp.int32)
        tokens_BCN = jnp.take_along_axis(alive_tokens_BKN, parent_BC[..., None], axis=1)
        tokens_BCN = jax.lax.dynamic_update_index_in_dim(tokens_BCN, token_BC, t, 2)
        eos_BC = token_BC == eos

        # Finished: the old K and the new EOS candidates compete on the penalised score at their own lengths.
        ended_BC = jnp.where(eos_BC, logp_BC / _penalty(t + 1, alpha), -jnp.inf)
        fin_score_BK, pick_BK = jax.lax.top_k(jnp.concatenate([s["fin_score"], ended_BC], axis=1), K)
        fin_tokens_BKN = jnp.take_along_axis(jnp.concatenate([s["fin_tokens"], tokens_BCN], axis=1),
                                             pick_BK[..., None], axis=1)

        # Alive: the best K candidates that go on, all of length t + 1, so raw log p ranks them.
        alive_logp_BK, pick_BK = jax.lax.top_k(jnp.where(eos_BC, -jnp.inf, logp_BC), K)
        src_R = (rows_B1 + jnp.take_along_axis(parent_BC, pick_BK, axis=1)).reshape(-1)
        return {"t": t + 1, "alive_tokens": jnp.take_along_axis(tokens_BCN, pick_BK[..., None], axis=1),
                "alive_logp": alive_logp_BK, "fin_tokens": fin_tokens_BKN, "fin_score": fin_score_BK,
                "inner": jax.tree.map(lambda a: a[src_R], inner)}

    def searching(s):
        # Alive hypotheses have t tokens and can finish at any length in [t + 1, N]; the penalty is monotone in it.
        best_B = s["alive_logp"][:, 0] / jnp.maximum(_penalty(s["t"] + 1, alpha), _penalty(N, alpha))
        worst_B = s["fin_score"][:, -1]
        settled_B = jnp.isfinite(worst_B) & (best_B <= worst_B)
        return (s["t"] < N) & ~jnp.all(settled_B)

    start = {"t": jnp.zeros((), jnp.int32), "alive_tokens": jnp.full((B, K, N), pad, jnp.int32),
             # all K rows start from the same empty prefix: step 0 expands beam 0 only
             "alive_logp": jnp.tile(jnp.array([0.0] + [-jnp.inf] * (K - 1), jnp.float32), (B, 1)),
             "fin_tokens": jnp.full((B, K, N), pad, jnp.int32), "fin_score": jnp.full((B, K), -jnp.inf),
             "inner": state}
    out = jax.lax.while_loop(searching, body, start)

    # Finished hypotheses come sorted with the empty (-inf) slots last; alive ones fill those, in their own order.
    # Only a loop that ran to N leaves an item short, so every alive hypothesis then has N tokens.
    fill_B1 = jnp.sum(jnp.isfinite(out["fin_score"]), axis=1, keepdims=True)
    from_alive_BK = jnp.arange(K) >= fill_B1
    idx_BK = jnp.clip(jnp.arange(K) - fill_B1, 0, K - 1)
    alive_score_BK = jnp.take_along_axis(out["alive_logp"], idx_BK, axis=1) / _penalty(N, alpha)
    score_BK = jnp.where(from_alive_BK, alive_score_BK, out["fin_score"])
    tokens_BKN = jnp.where(from_alive_BK[..., None],
                           jnp.take_along_axis(out["alive_tokens"], idx_BK[..., None], axis=1), out["fin_tokens"])
    tokens_BKN = jnp.where(jnp.isfinite(score_BK)[..., None], tokens_BKN, pad)
    order_BK = jnp.argsort(-score_BK, axis=1)
    return jnp.take_along_axis(tokens_BKN, order_BK[..., None], axis=1), jnp.take_along_axis(score_BK, order_BK, 1)
