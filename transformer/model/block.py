"""The Block every family shares: self-attention, optional cross-attention (the encoder-decoder's decoder), and a
feed-forward layer, each wrapped in a residual connection with pre-norm (x + f(norm(x))) or post-norm ("Add & Norm":
norm(x + f(x))).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention import Attention
from transformer.model.layers import Norm, dropout
from transformer.model.mlp import MLP
from transformer.model.stack import Stack
from transformer.sharding import ACT_BTD, constrain


def split_key(key, n: int):
    return [None] * n if key is None else list(jax.random.split(key, n))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm_position == "pre"
        self.dropout_rate = cfg.dropout
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = Norm(cfg, rngs=rngs)
            self.cross_attn = Attention(cfg, cross=True, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def _residual(self, x, norm, sublayer, key):
        if self.pre_norm:
            return x + dropout(sublayer(norm(x)), self.dropout_rate, key)
        return norm(x + dropout(sublayer(x), self.dropout_rate, key))

    def __call__(self, x_BTD, *, mask_B1TS, positions_BT, context_BSD=None, context_mask_B1TS=None,
                 context_kv=None, dropout_key=None, cache=None, cache_index=None, weights: bool = False):
        """Returns x_BTD, or (x_BTD, new_cache) when a self-attention `cache` is given, or (x_BTD, probs) with
        `weights`: {"self": B N T T, "cross": B N T S or None}, the attention probabilities of this layer. A
        cross-attention block reads the encoder output `context_BSD`, or this layer's precomputed `context_kv`."""
        k = split_key(dropout_key, 6)
        extra = {}  # the new cache, or the attention probabilities: a second result only when asked for
        x_BTD = constrain(x_BTD, ACT_BTD)

        def sublayer(attn, name, **kwargs):
            def f(h):
                out = attn(h, **kwargs)
                if not isinstance(out, tuple):
                    return out
                out, extra[name] = out
                return out
            return f

        self_kwargs = dict(cache=cache, cache_index=cache_index) if cache is not None else dict(weights=weights)
        x_BTD = self._residual(x_BTD, self.attn_norm, sublayer(
            self.attn, "self", mask_B1TS=mask_B1TS, positions_BT=positions_BT, dropout_key=k[0], **self_kwargs), k[1])
        if self.cross_attn is not None:
            x_BTD = self._residual(x_BTD, self.cross_norm, sublayer(
                self.cross_attn, "cross", mask_B1TS=context_mask_B1TS, context_BSD=context_BSD,
                context_kv=context_kv, dropout_key=k[4], weights=weights), k[2])
        x_BTD = constrain(self._residual(x_BTD, self.mlp_norm, lambda h: self.mlp(h, dropout_key=k[5]), k[3]), ACT_BTD)
        if cache is not None:
            return x_BTD, extra["self"]
        if weights:
            return x_BTD, {"self": extra["self"], "cross": extra.get("cross")}
        return x_BTD


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_blocks(cfg: ModelConfig, n: int, *, cross: bool = False, rngs: nnx.Rngs):
    """n Blocks: a list, or with `cfg.scan_layers` a Stack (one Block of stacked weights; the same values)."""
    blocks = [Block(cfg, cross=cross, rngs=rngs) for _ in range(n)]
    return Stack(blocks) if cfg.scan_layers else nnx.List(blocks)


def apply_blocks(blocks, x_BTD, keys, *, cfg: ModelConfig, internals: bool = False, **kwargs):
    """The stack of blocks without a cache: returns (x_BTD, seen). With `internals`, seen records what the layers
    computed: "residual" (the stream entering each block and leaving the last), "attention" (each block's
    self-attention probabilities) and, for cross-attention blocks, "cross_attention"; otherwise it is None.
    A Stack is scanned, and `cfg.remat` decides what the backward pass recomputes (neither changes the result)."""
    if not internals and (isinstance(blocks, Stack) or cfg.remat != "none"):
        return _scanned_or_remat(blocks, x_BTD, keys, cfg, kwargs), None
    if not internals:
        for block, key in zip(blocks, keys):
            x_BTD = block(x_BTD, dropout_key=key, **kwargs)
        return x_BTD, None
    seen = {"residual": [], "attention": [], "cross_attention": []}
    for block in blocks:
        seen["residual"].append(x_BTD)
        x_BTD, probs = block(x_BTD, weights=True, **kwargs)
        seen["attention"].append(probs["self"])
        if probs["cross"] is not None:
            seen["cross_attention"].append(probs["cross"])
    seen["residual"].append(x_BTD)
    if not seen["cross_attention"]:
        del seen["cross_attention"]
    return x_BTD, seen


def _scanned_or_remat(blocks, x_BTD, keys, cfg: ModelConfig, kwargs: dict):
    """The blocks as one pure function of (a layer's weights, x, key), rematerialised by `cfg.remat`'s policy:
    scanned over a Stack's stacked weights (one block body for XLA to compile however deep the model), or called
    layer by layer."""
    stacked = isinstance(blocks, Stack)
    graphdef, state = blocks.split() if stacked else nnx.split(blocks[0])

    def layer(state, x_BTD, key):
        return nnx.merge(graphdef, state)(x_BTD, dropout_key=key, **kwargs)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not stacked)
    keys = list(keys[:len(blocks)])
    if not stacked:
        for block, key in zip(blocks, keys):
            x_BTD = layer(nnx.split(block)[1], x_BTD, key)
        return x_BTD
    keys_L = None if keys[0] is None else jnp.stack(keys)

    def body(x_BTD, layer_in):
        state, key = layer_in
        return layer(state, x_BTD, key), None

    return jax.lax.scan(body, x_BTD, (state, keys_L))[0]
