"""Looking inside a model, as pure functions that return arrays (`python -m transformer.inspect` formats and plots
them): the next-token distribution, every layer's attention probabilities and residual stream, the logit lens, and
nearest neighbours in the embedding table.

The attention probabilities and residual streams come out of the model's own forward pass as explicit outputs
(`model(..., internals=True)`), computed by the same code as the plain forward, so what is shown is what the model
computes, and the plain forward (the training step) compiles to the same program as before.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Internals(NamedTuple):
    """One forward pass seen from inside, for a batch of one (arrays on the host, float32).

    logits_TV: the model's output; attention_LNTS: each layer's attention probabilities (for an encoder-decoder, the
    decoder's self-attention); residual_LTD: the residual stream entering each layer and leaving the last (L + 1).
    Encoder-decoders add cross_LNTS (decoder queries over source keys) and encoder_LNSS."""
    logits_TV: np.ndarray
    attention_LNTS: np.ndarray
    residual_LTD: np.ndarray
    cross_LNTS: np.ndarray | None = None
    encoder_LNSS: np.ndarray | None = None


@functools.lru_cache(maxsize=8)
def _forward(graphdef):
    def f(params, inputs: dict):
        model = nnx.merge(graphdef, params)
        arch = model.cfg.arch
        if arch == "encoder_decoder":
            return model(inputs["src"], inputs["tokens"], src_valid_BS=inputs["src_valid"], internals=True)
        if arch == "encoder":
            return model(inputs["tokens"], valid_BT=inputs["valid"], internals=True)
        return model(inputs["tokens"], internals=True)
    return jax.jit(f)


def internals(graphdef, params, tokens_T, *, src_S=None) -> Internals:
    """The forward pass over one sequence of token ids (for an encoder-decoder: the target ids so far, given the
    source ids `src_S`), with its attention probabilities and residual streams."""
    tokens = jnp.asarray(np.asarray(tokens_T, np.int32)[None])
    inputs = {"tokens": tokens, "valid": jnp.ones_like(tokens, bool)}
    if src_S is not None:
        src = jnp.asarray(np.asarray(src_S, np.int32)[None])
        inputs.update(src=src, src_valid=jnp.ones_like(src, bool))
    logits, seen = _forward(graphdef)(params, inputs)
    stack = lambda arrays: np.stack([np.asarray(a[0], np.float32) for a in arrays])  # noqa: E731
    return Internals(np.asarray(logits[0], np.float32), stack(seen["attention"]), stack(seen["residual"]),
                     stack(seen["cross_attention"]) if "cross_attention" in seen else None,
                     stack(seen["encoder_attention"]) if "encoder_attention" in seen else None)


def next_token_probs(logits_V) -> np.ndarray:
    """The next-token distribution at temperature 1: softmax of the logits (what an unfiltered sampler draws from)."""
    return np.asarray(jax.nn.softmax(jnp.asarray(logits_V, jnp.float32), axis=-1))


def top(probs, k: int) -> list[tuple[int, float]]:
    """The k most probable (id, probability) pairs, most probable first."""
    probs = np.asarray(probs)
    ids = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in ids]


@functools.lru_cache(maxsize=8)
def _lens(graphdef, k: int):
    def f(params, residual_LTD):
        model = nnx.merge(graphdef, params)
        probs_LTV = jax.nn.softmax(model.unembed(residual_LTD), axis=-1)  # the layers stand in for the batch
        return jax.lax.top_k(probs_LTV, k)
    return jax.jit(f)


def logit_lens(graphdef, params, residual_LTD, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's residual stream read out as if it were the last: through the model's final norm and output layer
    (nostalgebraist's logit lens). Returns the top-k (probabilities, ids), each (L + 1, T, k); row L is the model's
    own output distribution."""
    probs, ids = _lens(graphdef, k)(params, jnp.asarray(residual_LTD))
    return np.asarray(probs), np.asarray(ids)


def embedding_table(params) -> np.ndarray:
    """The token embedding table (V, D) of any family."""
    pure = nnx.to_pure_dict(params)
    embed = pure["encoder"]["embed"] if "encoder" in pure else pure["embed"]
    return np.asarray(embed["table_VD"], np.float32)


def cosine_neighbours(table_VD, query_D, k: int, exclude=()) -> list[tuple[int, float]]:
    """The k rows of the table nearest the query by cosine similarity, (id, cosine), nearest first; ids in `exclude`
    are skipped (the words of an analogy, say)."""
    table = np.asarray(table_VD, np.float32)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    q = np.asarray(query_D, np.float32)
    cos = unit @ (q / max(float(np.linalg.norm(q)), 1e-12))
    cos[list(exclude)] = -np.inf
    return top(cos, k)


def analogy_vector(table_VD, a: int, b: int, c: int) -> np.ndarray:
    """a - b + c over unit-length embeddings ("king" - "man" + "woman"): the query of an analogy."""
    unit = lambda i: table_VD[i] / max(float(np.linalg.norm(table_VD[i])), 1e-12)  # noqa: E731
    return unit(a) - unit(b) + unit(c)
