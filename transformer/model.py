"""Transformer models built from one set of blocks.

`Block` is the unit every family shares: self-attention, optional cross-attention, feed-forward, each wrapped in a
residual connection with pre-norm (x + f(norm(x))) or post-norm ("Add & Norm": norm(x + f(x))).
`DecoderLM` is the decoder-only (GPT) language model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.attention import Attention, causal_mask, init_kv_cache
from transformer.config import ModelConfig
from transformer.layers import DTYPES, MLP, AbsolutePositions, Embed, Norm, dropout, kernel_init, output_logits, param
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
                 context_kv=None, dropout_key=None, cache=None, cache_index=None):
        """Returns x_BTD, or (x_BTD, new_cache) when a self-attention `cache` is given. A cross-attention block
        reads the encoder output `context_BSD`, or this layer's precomputed `context_kv`."""
        k = split_key(dropout_key, 5)
        new_cache = None
        x_BTD = constrain(x_BTD, ACT_BTD)

        def self_attention(h):
            nonlocal new_cache
            out = self.attn(h, mask_B1TS=mask_B1TS, positions_BT=positions_BT, dropout_key=k[0], cache=cache,
                            cache_index=cache_index)
            if cache is None:
                return out
            out, new_cache = out
            return out

        x_BTD = self._residual(x_BTD, self.attn_norm, self_attention, k[1])
        if self.cross_attn is not None:
            x_BTD = self._residual(
                x_BTD, self.cross_norm,
                lambda h: self.cross_attn(h, mask_B1TS=context_mask_B1TS, context_BSD=context_BSD,
                                          context_kv=context_kv, dropout_key=k[4]), k[2])
        x_BTD = constrain(self._residual(x_BTD, self.mlp_norm, self.mlp, k[3]), ACT_BTD)
        return x_BTD if cache is None else (x_BTD, new_cache)


class DecoderLM(nnx.Module):
    """Decoder-only causal language model: tokens -> next-token logits (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.vocab_size > 0, "set model.vocab_size (train.py takes it from the tokenizer)"
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.positions = AbsolutePositions(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        # Post-norm blocks already end in a norm; pre-norm stacks need one before the unembedding.
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None
        self.unembed_DV = None if cfg.tie_embeddings else param(
            rngs, kernel_init(cfg), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BT, *, positions_BT=None, mask_B1TS=None, dropout_key=None, cache=None,
                 cache_index=None):
        """Next-token logits (float32).

        Full forward by default: positions 0..T-1 and a causal mask. For decoding pass `cache` (from
        `init_cache`), the slot `cache_index` where these T tokens go, their `positions_BT`, and `mask_B1TS` over the
        cache slots; it then returns (logits, new_cache).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if mask_B1TS is None:
            mask_B1TS = causal_mask(positions_BT, positions_BT)
        keys = split_key(dropout_key, cfg.n_layers + 1)
        x_BTD = self.embed(tokens_BT, DTYPES[cfg.dtype])
        pos_BTD = self.positions(positions_BT)
        if pos_BTD is not None:
            x_BTD = x_BTD + pos_BTD.astype(x_BTD.dtype)
        x_BTD = dropout(x_BTD, cfg.dropout, keys[-1])
        new_cache = []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x_BTD = block(x_BTD, mask_B1TS=mask_B1TS, positions_BT=positions_BT, dropout_key=keys[i])
            else:
                x_BTD, layer_cache = block(x_BTD, mask_B1TS=mask_B1TS, positions_BT=positions_BT, cache=cache[i],
                                           cache_index=cache_index)
                new_cache.append(layer_cache)
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        logits_BTV = output_logits(x_BTD, self.embed, self.unembed_DV, self.cfg.matmul_dtype)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        return init_kv_cache(batch, length, self.cfg, self.cfg.n_layers)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def analytic_param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of `DecoderLM(cfg)`; a test checks it against the built model."""
    D, F, V, L = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_layers
    bias = cfg.use_bias
    norm = D * (2 if bias and cfg.norm == "layernorm" else 1)
    attn = 4 * D * D + (4 * D if bias else 0)
    mlp = (3 if cfg.activation == "swiglu" else 2) * D * F
    if bias:
        mlp += D + (0 if cfg.activation == "swiglu" else F)
    block = attn + mlp + 2 * norm
    total = V * D + L * block
    total += cfg.max_len * D if cfg.positions == "learned" else 0
    total += norm if cfg.norm_position == "pre" else 0
    total += 0 if cfg.tie_embeddings else D * V
    return total
