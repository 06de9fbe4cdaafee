"""The Block every family shares: self-attention, optional cross-attention (the encoder-decoder's decoder), and a
feed-forward layer, each wrapped in a residual connection with pre-norm (x + f(norm(x))) or post-norm ("Add & Norm":
norm(x + f(x))).
"""
from __future__ import annotations

import jax
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention import Attention
from transformer.model.layers import MLP, Norm, dropout
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
