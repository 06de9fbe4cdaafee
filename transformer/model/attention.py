"""Multi-head and grouped-query attention (self and cross), its masks, and the attention formula itself."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention_forms import attend_chunked, attend_fused
from transformer.model.layers import (
    DTYPES,
    bias_param,
    dense,
    dense_out,
    dropout,
    kernel_init,
    param,
    rope_frequencies,
    rotary,
)
from transformer.model.lora import adapters, add_delta, add_deltas, add_parts, delta, deltas, fold, with_dropout
from transformer.sharding import constrain

# Large finite negative for masked scores: exp() underflows to exactly 0 without the inf - inf = nan of -inf.
NEG_INF = -1e30


def causal_mask(q_positions_BT, kv_positions_BS, window: int = 0):
    """True where query position >= key position: a token sees itself and the past; with a sliding `window` > 0,
    only the `window` most recent positions, itself included."""
    q_B1T1, kv_B11S = q_positions_BT[:, None, :, None], kv_positions_BS[:, None, None, :]
    mask = q_B1T1 >= kv_B11S
    return mask & (q_B1T1 - kv_B11S < window) if window else mask


def segment_mask(segments_BT, positions_BT, window: int = 0):
    """The causal mask of rows packed with several sequences: a token sees the earlier tokens of its own segment
    only (segment ids, 0 for padding; positions restart at 0 in each segment), so no sequence attends to another."""
    same_B1TS = segments_BT[:, None, :, None] == segments_BT[:, None, None, :]
    return causal_mask(positions_BT, positions_BT, window) & same_B1TS


ACT_BTNH = ("batch", "length", "act_heads", None)
ACT_BSKH = ("batch", "length", "act_kv_heads", None)


def padding_mask(kv_valid_BS):
    """True at real (non-padding) keys; broadcasts over heads and queries."""
    return kv_valid_BS[:, None, None, :]


def attend(q_BTNH, k_BKHS, v_BKSH, mask_B1TS=None, *, dropout_rate: float = 0.0, dropout_key=None):
    """softmax(Q K^T / sqrt(H) + mask) V, with the softmax in float32.

    Keys come as K^T per head (B K H S) and values heads-first (B K S H), the layouts of the KV cache: both batched
    matmuls then read the cache as plain row-major operands, where other layouts cost a copy of the whole cache at
    every decode step. With fewer key/value heads K than query heads N (grouped-query attention), query head n reads
    key/value head n // (N / K).
    """
    return attend_blocks(q_BTNH, [(k_BKHS, v_BKSH, mask_B1TS)], dropout_rate=dropout_rate, dropout_key=dropout_key)


def attend_blocks(q_BTNH, blocks, *, dropout_rate: float = 0.0, dropout_key=None):
    """Attention over the concatenation of several (K^T, V, mask) blocks with one softmax: e.g. the cache as it was
    plus the tokens being added, so that the cache is only read before it is written (XLA then updates it in
    place instead of copying it every decode step)."""
    return mix_values(attention_probs(q_BTNH, blocks), blocks, dropout_rate=dropout_rate, dropout_key=dropout_key)


def attention_probs(q_BTNH, blocks):
    """softmax(Q K^T / sqrt(H) + mask) over the keys of all blocks, float32, as (B K G T S): query head n = k * G + g
    (G = N / K query heads per key/value head). Query heads are grouped so each group multiplies its one key/value
    head, never a copy of it: the queries of a group are stacked along the query axis (B K G*T H), so the matmul
    stays a plain batched one over (B, K), the form XLA:CPU's bf16 kernels take."""
    B, T, N, H = q_BTNH.shape
    K = blocks[0][0].shape[1]
    G = N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = []
    for k_BKHS, _, mask_B1TS in blocks:
        s_BKMS = jnp.einsum("BKMH,BKHS->BKMS", q_BKMH, k_BKHS, preferred_element_type=jnp.float32)
        s_BKGTS = s_BKMS.reshape(B, K, G, T, -1) * (1.0 / math.sqrt(H))
        scores.append(s_BKGTS if mask_B1TS is None else jnp.where(mask_B1TS[:, :, None], s_BKGTS, NEG_INF))
    return jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)


def mix_values(probs_BKGTS, blocks, *, dropout_rate: float = 0.0, dropout_key=None):
    """The attention output (B T N H): each query's probability-weighted sum of the values of all blocks."""
    B, K, G, T, _ = probs_BKGTS.shape
    H = blocks[0][1].shape[-1]
    probs_BKGTS = dropout(probs_BKGTS, dropout_rate, dropout_key)
    out_BKMH, start = 0.0, 0
    for k_BKHS, v_BKSH, _ in blocks:
        S = k_BKHS.shape[-1]
        p_BKMS = probs_BKGTS[..., start:start + S].astype(v_BKSH.dtype).reshape(B, K, G * T, S)
        out_BKMH = out_BKMH + jnp.einsum("BKMS,BKSH->BKMH", p_BKMS, v_BKSH)
        start += S
    return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def heads_first(probs_BKGTS):
    """(B K G T S) attention probabilities as (B N T S), query head n = k * G + g."""
    B, K, G, T, S = probs_BKGTS.shape
    return probs_BKGTS.reshape(B, K * G, T, S)


class Attention(nnx.Module):
    """Multi-head attention: N query heads of dim H (d_model / N unless `cfg.head_dim` says otherwise) over K = N,
    or fewer (grouped-query), key/value heads.

    Multi-head self-attention fuses the q, k, v projections into one matmul (`w_qkv_DCNH`). Grouped-query
    self-attention projects queries (`w_q_DNH`) and keys / values (`w_kv_DCKH`) apart, as does cross-attention
    (`cross=True`), whose queries come from `x` and keys / values from `context` (the encoder output).
    Biases: on every projection with `cfg.use_bias`, on q, k, v only with `cfg.qkv_bias` (Qwen2).
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.cross = cross
        self.fused = not cross and K == N
        self.rotary = cfg.positions == "rotary" and not cross
        self.inv_freq_h = tuple(rope_frequencies(cfg).tolist()) if self.rotary else None
        self.dropout_rate = cfg.dropout
        self.form, self.chunk = cfg.attention, cfg.attention_chunk
        self.dtype = DTYPES[cfg.dtype]
        self.mm = cfg.matmul_dtype
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        # Each of q, k, v is a D x (heads * H) matrix; the output projection an (N * H) x D one.
        if self.fused:
            self.w_qkv_DCNH = param(rngs, kernel_init(cfg, in_axis=0, out_axis=(2, 3), batch_axis=1), (D, 3, N, H),
                                    ("embed", None, "heads", "head_dim"))
            self.b_qkv_CNH = bias_param(rngs, (3, N, H), (None, "heads", "head_dim")) if qkv_bias else None
        else:
            self.w_q_DNH = param(rngs, kernel_init(cfg, in_axis=0, out_axis=(1, 2)), (D, N, H),
                                 ("embed", "heads", "head_dim"))
            self.w_kv_DCKH = param(rngs, kernel_init(cfg, in_axis=0, out_axis=(2, 3), batch_axis=1), (D, 2, K, H),
                                   ("embed", None, "kv_heads", "head_dim"))
            self.b_q_NH = bias_param(rngs, (N, H), ("heads", "head_dim")) if qkv_bias else None
            self.b_kv_CKH = bias_param(rngs, (2, K, H), (None, "kv_heads", "head_dim")) if qkv_bias else None
        self.w_o_NHD = param(rngs, kernel_init(cfg, in_axis=(0, 1), out_axis=2, residual=True), (N, H, D),
                             ("heads", "head_dim", "embed"))
        self.b_o_D = bias_param(rngs, (D,), ("embed",)) if cfg.use_bias else None
        heads, kv = ("heads", "head_dim"), ("kv_heads", "head_dim")
        self.lora = adapters(cfg, {"q": (D, (N, H), "embed", heads), "k": (D, (K, H), "embed", kv),
                                   "v": (D, (K, H), "embed", kv), "o": (N * H, (D,), None, ("embed",))}, rngs)

    def merge_lora(self) -> None:
        """Fold the adapters into the weights they adapt, and drop them."""
        for name, adapter in self.lora.items():
            if name == "o":
                fold(self.w_o_NHD, adapter)
            elif self.fused:
                fold(self.w_qkv_DCNH, adapter, "qkv".index(name))
            elif name == "q":
                fold(self.w_q_DNH, adapter)
            else:
                fold(self.w_kv_DCKH, adapter, "kv".index(name))
        self.lora = None

    def _kv(self, x_BSD, dkv):
        """Keys and values of x, (B S K H) each, before any rotation. `dkv`: the k and v adapters' updates of x
        (`deltas`; None each where there is none)."""
        kv_BSCKH = add_parts(dense(x_BSD, self.w_kv_DCKH[...], self.mm), dkv, axis=2)
        if self.b_kv_CKH is not None:
            kv_BSCKH = kv_BSCKH + self.b_kv_CKH[...].astype(kv_BSCKH.dtype)
        return kv_BSCKH[:, :, 0], kv_BSCKH[:, :, 1]

    def _project_in(self, x_BTD, lora):
        """(q_BTNH, k_BSKH, v_BSKH) of self-attention."""
        if self.fused:
            qkv_BTCNH = add_deltas(dense(x_BTD, self.w_qkv_DCNH[...], self.mm), x_BTD, lora, ("q", "k", "v"),
                                   axis=2)
            if self.b_qkv_CNH is not None:
                qkv_BTCNH = qkv_BTCNH + self.b_qkv_CNH[...].astype(qkv_BTCNH.dtype)
            return qkv_BTCNH[:, :, 0], qkv_BTCNH[:, :, 1], qkv_BTCNH[:, :, 2]
        dq, dk, dv = deltas(lora, ("q", "k", "v"), x_BTD)  # the three A matrices in one matmul
        return (self._q(x_BTD, dq), *self._kv(x_BTD, [dk, dv]))

    def _q(self, x_BTD, dq):
        """Queries of x; `dq`: the q adapter's update of x, or None."""
        q_BTNH = dense(x_BTD, self.w_q_DNH[...], self.mm)
        if dq is not None:
            q_BTNH = q_BTNH + dq
        if self.b_q_NH is not None:
            q_BTNH = q_BTNH + self.b_q_NH[...].astype(q_BTNH.dtype)
        return q_BTNH

    def cross_kv(self, context_BSD, lora=None) -> dict:
        """Cross-attention keys and values of the encoder output ({"k": B K H S, "v": B K S H}): computed once per
        source and reused at every decoding step."""
        k_BSKH, v_BSKH = self._kv(context_BSD, deltas(self.lora if lora is None else lora, ("k", "v"), context_BSD))
        k_BSKH, v_BSKH = constrain(k_BSKH, ACT_BSKH), constrain(v_BSKH, ACT_BSKH)
        return {"k": k_BSKH.transpose(0, 2, 3, 1), "v": v_BSKH.transpose(0, 2, 1, 3)}

    def _project_out(self, out_BTNH, lora):
        y_BTD = add_delta(dense_out(out_BTNH, self.w_o_NHD[...], 2, self.mm),
                          out_BTNH.reshape(*out_BTNH.shape[:2], -1), lora, "o")
        if self.b_o_D is not None:
            y_BTD = y_BTD + self.b_o_D[...].astype(y_BTD.dtype)
        return y_BTD

    def __call__(self, x_BTD, *, mask_B1TS=None, positions_BT=None, context_BSD=None, context_kv=None,
                 dropout_key=None, cache=None, cache_index=None, weights: bool = False):
        """Full forward: returns y_BTD. With a `cache` ({"k": B K H S, "v": B K S H}) the new keys and values are
        written at slot `cache_index`, the queries attend over all S slots (the mask says which are visible), and it
        returns (y_BTD, new_cache): the same code serves prefill (T = prompt) and decode (T = 1). Cross-attention
        takes the encoder output as `context_BSD`, or its precomputed `context_kv` (from `cross_kv`).
        With `weights` (no cache) it returns (y_BTD, probs_BNTS): the attention probabilities it used, for looking
        inside the model; the computation is the same, so the default call's program does not change."""
        # the adapters' own dropout (lora_dropout) draws from a key of its own
        lora = with_dropout(self.lora, None if dropout_key is None else jax.random.fold_in(dropout_key, 1))
        if self.cross:
            kv = self.cross_kv(context_BSD, lora) if context_kv is None else context_kv
            q_BTNH = constrain(self._q(x_BTD, delta(lora, "q", x_BTD)), ACT_BTNH)
            return self._attend_full(q_BTNH, kv["k"], kv["v"], mask_B1TS, dropout_key, weights, lora)
        q_BTNH, k_BSKH, v_BSKH = self._project_in(x_BTD, lora)
        if self.rotary:  # keys are cached already rotated: rotary scores depend only on relative position
            q_BTNH = rotary(q_BTNH, positions_BT, self.inv_freq_h)
            k_BSKH = rotary(k_BSKH, positions_BT, self.inv_freq_h)
        q_BTNH = constrain(q_BTNH, ACT_BTNH)
        k_BSKH, v_BSKH = constrain(k_BSKH, ACT_BSKH), constrain(v_BSKH, ACT_BSKH)
        k_BKHS, v_BKSH = k_BSKH.transpose(0, 2, 3, 1), v_BSKH.transpose(0, 2, 1, 3)
        if cache is None:
            return self._attend_full(q_BTNH, k_BKHS, v_BKSH, mask_B1TS, dropout_key, weights, lora)
        # The mask covers all cache slots; the new tokens' own slots [cache_index, cache_index + T) are attended
        # through the fresh k, v (block 2), the older slots through the cache as it was (block 1).
        S, T = cache["v"].shape[2], x_BTD.shape[1]
        old_B1TS = mask_B1TS & (jnp.arange(S) < cache_index)
        new_B1TT = jax.lax.dynamic_slice_in_dim(mask_B1TS, cache_index, T, axis=3)
        blocks = [(k_BKHS, v_BKSH, new_B1TT)]
        if not (isinstance(cache_index, int) and cache_index == 0):  # a prefill into an empty cache skips it
            blocks.insert(0, (cache["k"], cache["v"], old_B1TS))
        out_BTNH = attend_blocks(q_BTNH, blocks)
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BKHS.astype(cache["k"].dtype),
                                                   (0, 0, 0, cache_index)),
                 "v": jax.lax.dynamic_update_slice(cache["v"], v_BKSH.astype(cache["v"].dtype),
                                                   (0, 0, cache_index, 0))}
        return self._project_out(out_BTNH, lora), cache

    def _attend_full(self, q_BTNH, k_BKHS, v_BKSH, mask_B1TS, dropout_key, weights: bool, lora):
        if self.form == "chunked" and not weights:
            return self._project_out(attend_chunked(q_BTNH, k_BKHS, v_BKSH, mask_B1TS, self.chunk,
                                                    dropout_rate=self.dropout_rate, dropout_key=dropout_key), lora)
        if self.form == "cudnn" and not weights:
            return self._project_out(attend_fused(q_BTNH, k_BKHS, v_BKSH, mask_B1TS), lora)
        blocks = [(k_BKHS, v_BKSH, mask_B1TS)]
        probs_BKGTS = attention_probs(q_BTNH, blocks)
        out_BTNH = mix_values(probs_BKGTS, blocks, dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        y_BTD = self._project_out(out_BTNH, lora)
        return (y_BTD, heads_first(probs_BKGTS)) if weights else y_BTD


def init_kv_cache(batch: int, length: int, cfg: ModelConfig, n_layers: int) -> list[dict]:
    """Per-layer {"k": B K H S, "v": B K S H} buffers (K key/value heads): an explicit pytree passed in and out of the
    decode step."""
    K, H, dtype = cfg.kv_heads, cfg.d_head, DTYPES[cfg.dtype]
    axes = ("batch", "act_kv_heads", None, None)  # rows over data, heads over tensor (under an activation mesh)
    return [{"k": constrain(jnp.zeros((batch, K, H, length), dtype), axes),
             "v": constrain(jnp.zeros((batch, K, length, H), dtype), axes)} for _ in range(n_layers)]
