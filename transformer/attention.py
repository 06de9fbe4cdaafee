"""Multi-head attention (self and cross), its masks, and the attention formula itself."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.layers import DTYPES, dense, dense_out, dropout, normal, param, rotary, zeros

# Large finite negative for masked scores: exp() underflows to exactly 0 without the inf - inf = nan of -inf.
NEG_INF = -1e30


def causal_mask(q_positions_BT, kv_positions_BS):
    """True where query position >= key position: a token sees itself and the past."""
    return q_positions_BT[:, None, :, None] >= kv_positions_BS[:, None, None, :]


def padding_mask(kv_valid_BS):
    """True at real (non-padding) keys; broadcasts over heads and queries."""
    return kv_valid_BS[:, None, None, :]


def attend(q_BTNH, k_BNSH, v_BNSH, mask_B1TS=None, *, dropout_rate: float = 0.0, dropout_key=None):
    """softmax(Q K^T / sqrt(H) + mask) V, with the softmax in float32.

    Keys and values come heads-first (B N S H), the layout of the KV cache: the batched matmuls read it as is, where
    B S N H would cost a transpose of the whole cache at every decode step.
    """
    H = q_BTNH.shape[-1]
    scores_BNTS = jnp.einsum("BTNH,BNSH->BNTS", q_BTNH, k_BNSH, preferred_element_type=jnp.float32)
    scores_BNTS = scores_BNTS * (1.0 / math.sqrt(H))
    if mask_B1TS is not None:
        scores_BNTS = jnp.where(mask_B1TS, scores_BNTS, NEG_INF)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    probs_BNTS = dropout(probs_BNTS, dropout_rate, dropout_key).astype(v_BNSH.dtype)
    return jnp.einsum("BNTS,BNSH->BTNH", probs_BNTS, v_BNSH)


class Attention(nnx.Module):
    """Multi-head attention with d_head = d_model / n_heads.

    Self-attention fuses the q, k, v projections into one matmul. With `cross=True` the queries come from `x` and
    the keys / values from `context` (the encoder output), as in the original encoder-decoder.
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        D, N, H = cfg.d_model, cfg.n_heads, cfg.d_head
        self.cross = cross
        self.rotary = cfg.positions == "rotary" and not cross
        self.rope_theta = cfg.rope_theta
        self.dropout_rate = cfg.dropout
        self.dtype = DTYPES[cfg.dtype]
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        if cross:
            self.w_q_DNH = param(rngs, normal(0.02), (D, N, H), ("embed", "heads", "head_dim"))
            self.w_kv_DCNH = param(rngs, normal(0.02), (D, 2, N, H), ("embed", None, "heads", "head_dim"))
        else:
            self.w_qkv_DCNH = param(rngs, normal(0.02), (D, 3, N, H), ("embed", None, "heads", "head_dim"))
        self.w_o_NHD = param(rngs, normal(out_std), (N, H, D), ("heads", "head_dim", "embed"))
        if cfg.use_bias:
            self.b_qkv_CNH = param(rngs, zeros, (3, N, H), (None, "heads", "head_dim"))
            self.b_o_D = param(rngs, zeros, (D,), ("embed",))
        else:
            self.b_qkv_CNH = self.b_o_D = None

    def __call__(self, x_BTD, *, mask_B1TS=None, positions_BT=None, context_BSD=None, dropout_key=None,
                 cache=None, cache_index=None):
        """Full forward: returns y_BTD. With a `cache` ({"k", "v"}: B N S H) the new keys and values are written at
        slot `cache_index`, the queries attend over all S slots (the mask says which are visible), and it returns
        (y_BTD, new_cache): the same code serves prefill (T = prompt) and decode (T = 1)."""
        if self.cross:
            q_BTNH = dense(x_BTD, self.w_q_DNH[...])
            kv_BSCNH = dense(context_BSD, self.w_kv_DCNH[...])
            k_BSNH, v_BSNH = kv_BSCNH[:, :, 0], kv_BSCNH[:, :, 1]
            if self.b_qkv_CNH is not None:
                b = self.b_qkv_CNH[...].astype(x_BTD.dtype)
                q_BTNH, k_BSNH, v_BSNH = q_BTNH + b[0], k_BSNH + b[1], v_BSNH + b[2]
        else:
            qkv_BTCNH = dense(x_BTD, self.w_qkv_DCNH[...])
            if self.b_qkv_CNH is not None:
                qkv_BTCNH = qkv_BTCNH + self.b_qkv_CNH[...].astype(qkv_BTCNH.dtype)
            q_BTNH, k_BSNH, v_BSNH = qkv_BTCNH[:, :, 0], qkv_BTCNH[:, :, 1], qkv_BTCNH[:, :, 2]
        if self.rotary:  # keys are cached already rotated: rotary scores depend only on relative position
            q_BTNH = rotary(q_BTNH, positions_BT, self.rope_theta)
            k_BSNH = rotary(k_BSNH, positions_BT, self.rope_theta)
        k_BNSH, v_BNSH = k_BSNH.transpose(0, 2, 1, 3), v_BSNH.transpose(0, 2, 1, 3)
        if cache is not None:
            at = (0, 0, cache_index, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BNSH.astype(cache["k"].dtype), at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v_BNSH.astype(cache["v"].dtype), at)}
            k_BNSH, v_BNSH = cache["k"], cache["v"]
        out_BTNH = attend(q_BTNH, k_BNSH, v_BNSH, mask_B1TS, dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        y_BTD = dense_out(out_BTNH, self.w_o_NHD[...], 2)
        if self.b_o_D is not None:
            y_BTD = y_BTD + self.b_o_D[...].astype(y_BTD.dtype)
        return y_BTD if cache is None else (y_BTD, cache)


def init_kv_cache(batch: int, length: int, cfg: ModelConfig, n_layers: int) -> list[dict]:
    """Per-layer {"k", "v"} buffers of shape B N S H: an explicit pytree passed in and out of the decode step."""
    shape = (batch, cfg.n_heads, length, cfg.d_head)
    dtype = DTYPES[cfg.dtype]
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n_layers)]
