"""Multi-head attention (self and cross), its masks, and the attention formula itself."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.layers import DTYPES, bias_param, dense, dense_out, dropout, kernel_init, param, rotary
from transformer.sharding import constrain

# Large finite negative for masked scores: exp() underflows to exactly 0 without the inf - inf = nan of -inf.
NEG_INF = -1e30


def causal_mask(q_positions_BT, kv_positions_BS):
    """True where query position >= key position: a token sees itself and the past."""
    return q_positions_BT[:, None, :, None] >= kv_positions_BS[:, None, None, :]


ACT_BTNH = ("batch", "length", "act_heads", None)


def padding_mask(kv_valid_BS):
    """True at real (non-padding) keys; broadcasts over heads and queries."""
    return kv_valid_BS[:, None, None, :]


def attend(q_BTNH, k_BNHS, v_BNSH, mask_B1TS=None, *, dropout_rate: float = 0.0, dropout_key=None):
    """softmax(Q K^T / sqrt(H) + mask) V, with the softmax in float32.

    Keys come as K^T per head (B N H S) and values heads-first (B N S H), the layouts of the KV cache: both batched
    matmuls then read the cache as plain row-major operands, where other layouts cost a copy of the whole cache at
    every decode step.
    """
    return attend_blocks(q_BTNH, [(k_BNHS, v_BNSH, mask_B1TS)], dropout_rate=dropout_rate, dropout_key=dropout_key)


def attend_blocks(q_BTNH, blocks, *, dropout_rate: float = 0.0, dropout_key=None):
    """Attention over the concatenation of several (K^T, V, mask) blocks with one softmax: e.g. the cache as it was
    plus the tokens being added, so that the cache is only read before it is written (XLA then updates it in
    place instead of copying it every decode step)."""
    H = q_BTNH.shape[-1]
    scores = []
    for k_BNHS, _, mask_B1TS in blocks:
        s_BNTS = jnp.einsum("BTNH,BNHS->BNTS", q_BTNH, k_BNHS, preferred_element_type=jnp.float32)
        s_BNTS = s_BNTS * (1.0 / math.sqrt(H))
        scores.append(s_BNTS if mask_B1TS is None else jnp.where(mask_B1TS, s_BNTS, NEG_INF))
    probs_BNTS = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    probs_BNTS = dropout(probs_BNTS, dropout_rate, dropout_key)
    out_BTNH, start = 0.0, 0
    for k_BNHS, v_BNSH, _ in blocks:
        p_BNTS = probs_BNTS[..., start:start + k_BNHS.shape[-1]].astype(v_BNSH.dtype)
        out_BTNH = out_BTNH + jnp.einsum("BNTS,BNSH->BTNH", p_BNTS, v_BNSH)
        start += k_BNHS.shape[-1]
    return out_BTNH


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
        self.mm = cfg.matmul_dtype
        # Each of q, k, v is a D x (N * H) matrix; the output projection an (N * H) x D one.
        qkv_init = kernel_init(cfg, in_axis=0, out_axis=(2, 3), batch_axis=1)
        if cross:
            self.w_q_DNH = param(rngs, kernel_init(cfg, in_axis=0, out_axis=(1, 2)), (D, N, H),
                                 ("embed", "heads", "head_dim"))
            self.w_kv_DCNH = param(rngs, qkv_init, (D, 2, N, H), ("embed", None, "heads", "head_dim"))
        else:
            self.w_qkv_DCNH = param(rngs, qkv_init, (D, 3, N, H), ("embed", None, "heads", "head_dim"))
        self.w_o_NHD = param(rngs, kernel_init(cfg, in_axis=(0, 1), out_axis=2, residual=True), (N, H, D),
                             ("heads", "head_dim", "embed"))
        if cfg.use_bias:
            self.b_qkv_CNH = bias_param(rngs, (3, N, H), (None, "heads", "head_dim"))
            self.b_o_D = bias_param(rngs, (D,), ("embed",))
        else:
            self.b_qkv_CNH = self.b_o_D = None

    def cross_kv(self, context_BSD) -> dict:
        """Cross-attention keys and values of the encoder output ({"k": B N H S, "v": B N S H}): computed once per
        source and reused at every decoding step."""
        kv_BSCNH = dense(context_BSD, self.w_kv_DCNH[...], self.mm)
        k_BSNH, v_BSNH = kv_BSCNH[:, :, 0], kv_BSCNH[:, :, 1]
        if self.b_qkv_CNH is not None:
            b = self.b_qkv_CNH[...].astype(k_BSNH.dtype)
            k_BSNH, v_BSNH = k_BSNH + b[1], v_BSNH + b[2]
        k_BSNH, v_BSNH = constrain(k_BSNH, ACT_BTNH), constrain(v_BSNH, ACT_BTNH)
        return {"k": k_BSNH.transpose(0, 2, 3, 1), "v": v_BSNH.transpose(0, 2, 1, 3)}

    def _project_out(self, out_BTNH):
        y_BTD = dense_out(out_BTNH, self.w_o_NHD[...], 2, self.mm)
        if self.b_o_D is not None:
            y_BTD = y_BTD + self.b_o_D[...].astype(y_BTD.dtype)
        return y_BTD

    def __call__(self, x_BTD, *, mask_B1TS=None, positions_BT=None, context_BSD=None, context_kv=None,
                 dropout_key=None, cache=None, cache_index=None):
        """Full forward: returns y_BTD. With a `cache` ({"k": B N H S, "v": B N S H}) the new keys and values are written at
        slot `cache_index`, the queries attend over all S slots (the mask says which are visible), and it returns
        (y_BTD, new_cache): the same code serves prefill (T = prompt) and decode (T = 1). Cross-attention takes the
        encoder output as `context_BSD`, or its precomputed `context_kv` (from `cross_kv`)."""
        if self.cross:
            q_BTNH = dense(x_BTD, self.w_q_DNH[...], self.mm)
            if self.b_qkv_CNH is not None:
                q_BTNH = q_BTNH + self.b_qkv_CNH[...].astype(q_BTNH.dtype)[0]
            kv = self.cross_kv(context_BSD) if context_kv is None else context_kv
            out_BTNH = attend(constrain(q_BTNH, ACT_BTNH), kv["k"], kv["v"], mask_B1TS,
                              dropout_rate=self.dropout_rate, dropout_key=dropout_key)
            return self._project_out(out_BTNH)
        qkv_BTCNH = dense(x_BTD, self.w_qkv_DCNH[...], self.mm)
        if self.b_qkv_CNH is not None:
            qkv_BTCNH = qkv_BTCNH + self.b_qkv_CNH[...].astype(qkv_BTCNH.dtype)
        q_BTNH, k_BSNH, v_BSNH = qkv_BTCNH[:, :, 0], qkv_BTCNH[:, :, 1], qkv_BTCNH[:, :, 2]
        if self.rotary:  # keys are cached already rotated: rotary scores depend only on relative position
            q_BTNH = rotary(q_BTNH, positions_BT, self.rope_theta)
            k_BSNH = rotary(k_BSNH, positions_BT, self.rope_theta)
        q_BTNH = constrain(q_BTNH, ACT_BTNH)
        k_BSNH, v_BSNH = constrain(k_BSNH, ACT_BTNH), constrain(v_BSNH, ACT_BTNH)
        k_BNHS, v_BNSH = k_BSNH.transpose(0, 2, 3, 1), v_BSNH.transpose(0, 2, 1, 3)
        if cache is None:
            out_BTNH = attend(q_BTNH, k_BNHS, v_BNSH, mask_B1TS, dropout_rate=self.dropout_rate,
                              dropout_key=dropout_key)
        else:
            # The mask covers all cache slots; the new tokens' own slots [cache_index, cache_index + T) are attended
            # through the fresh k, v (block 2), the older slots through the cache as it was (block 1).
            S, T = cache["v"].shape[2], x_BTD.shape[1]
            old_B1TS = mask_B1TS & (jnp.arange(S) < cache_index)
            new_B1TT = jax.lax.dynamic_slice_in_dim(mask_B1TS, cache_index, T, axis=3)
            blocks = [(k_BNHS, v_BNSH, new_B1TT)]
            if not (isinstance(cache_index, int) and cache_index == 0):  # a prefill into an empty cache skips it
                blocks.insert(0, (cache["k"], cache["v"], old_B1TS))
            out_BTNH = attend_blocks(q_BTNH, blocks)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BNHS.astype(cache["k"].dtype),
                                                       (0, 0, 0, cache_index)),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v_BNSH.astype(cache["v"].dtype),
                                                       (0, 0, cache_index, 0))}
        y_BTD = self._project_out(out_BTNH)
        return y_BTD if cache is None else (y_BTD, cache)


def init_kv_cache(batch: int, length: int, cfg: ModelConfig, n_layers: int) -> list[dict]:
    """Per-layer {"k": B N H S, "v": B N S H} buffers: an explicit pytree passed in and out of the decode step."""
    N, H, dtype = cfg.n_heads, cfg.d_head, DTYPES[cfg.dtype]
    axes = ("batch", "act_heads", None, None)  # rows over data, heads over tensor (under an activation mesh)
    return [{"k": constrain(jnp.zeros((batch, N, H, length), dtype), axes),
             "v": constrain(jnp.zeros((batch, N, length, H), dtype), axes)} for _ in range(n_layers)]
