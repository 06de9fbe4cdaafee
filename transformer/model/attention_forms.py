"""Two other formulations of full (uncached) attention, for long contexts and accelerators; the einsum formula in
attention.py is the reference both are tested against (same masks: causal, padding, segments, GQA).

- `attend_chunked` (model.attention=chunked): memory-efficient attention (Rabe & Staats 2021; the online softmax of
  FlashAttention) in plain JAX. Queries go in chunks of C, each over the keys in chunks of C with a running max,
  normaliser and weighted sum, and every query chunk is rematerialised in the backward pass: nothing of size T x S
  is kept, only the boolean mask (a byte per query-key pair) and one C x C tile of scores per head at a time. Runs
  on any backend; on XLA:CPU it is slower than the einsum formula at short T (more, smaller matmuls).
- `attend_fused` (model.attention=cudnn): `jax.nn.dot_product_attention` with cuDNN's fused flash attention on
  NVIDIA GPUs (bf16 / fp16 activations); the mask goes in as it is.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from transformer.model.layers import dropout

NEG_INF = -1e30  # as attention.py: a masked key's score (finite: a row with every key masked averages them all)


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def attend_chunked(q_BTNH, k_BKHS, v_BKSH, mask_B1TS, chunk: int, *, dropout_rate: float = 0.0, dropout_key=None):
    """softmax(Q K^T / sqrt(H) + mask) V (B T N H) in query x key tiles of `chunk`, float32 statistics. Keys and
    values come in the cache layouts (B K H S, B K S H) as `attention.attend` takes them."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    G = N // K
    Cq, Ck = min(chunk, T), min(chunk, S)
    q_BKGTH = (q_BTNH * (1.0 / math.sqrt(H))).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    q_BKGTH = _pad_to(q_BKGTH, 3, Cq)
    mask_B1TS = jnp.ones((B, 1, T, S), bool) if mask_B1TS is None else jnp.broadcast_to(mask_B1TS, (B, 1, T, S))
    # padded keys (S up to a multiple of Ck) get -inf, below any masked key: they never count, even in a row whose
    # real keys are all masked (those average their real keys, as the einsum formula's softmax does)
    key_ok_S = _pad_to(jnp.ones((S,), bool), 0, Ck, False)
    mask_B1TS = _pad_to(_pad_to(mask_B1TS, 3, Ck, False), 2, Cq, False)
    k_BKHS, v_BKSH = _pad_to(k_BKHS, 3, Ck), _pad_to(v_BKSH, 2, Ck)
    n_q, n_k = q_BKGTH.shape[3] // Cq, k_BKHS.shape[3] // Ck

    @jax.checkpoint  # the backward recomputes a query chunk's tiles instead of keeping them
    def query_chunk(i):
        q = jax.lax.dynamic_slice_in_dim(q_BKGTH, i * Cq, Cq, axis=3)
        mask_rows = jax.lax.dynamic_slice_in_dim(mask_B1TS, i * Cq, Cq, axis=2)

        def key_chunk(carry, j):
            m_BKGT, l_BKGT, acc_BKGTH = carry
            k = jax.lax.dynamic_slice_in_dim(k_BKHS, j * Ck, Ck, axis=3)
            v = jax.lax.dynamic_slice_in_dim(v_BKSH, j * Ck, Ck, axis=2)
            mask = jax.lax.dynamic_slice_in_dim(mask_rows, j * Ck, Ck, axis=3)[:, :, None]
            real = jax.lax.dynamic_slice_in_dim(key_ok_S, j * Ck, Ck)
            s = jnp.einsum("BKGTH,BKHS->BKGTS", q, k, preferred_element_type=jnp.float32)
            s = jnp.where(real, jnp.where(mask, s, NEG_INF), -jnp.inf)
            m_new = jnp.maximum(m_BKGT, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m_BKGT - m_new)
            if dropout_key is not None and dropout_rate > 0:
                p_used = dropout(p, dropout_rate, jax.random.fold_in(jax.random.fold_in(dropout_key, i), j))
            else:
                p_used = p
            acc = acc_BKGTH * scale[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", p_used.astype(v.dtype), v,
                                                            preferred_element_type=jnp.float32)
            return (m_new, l_BKGT * scale + p.sum(-1), acc), None

        init = (jnp.full((B, K, G, Cq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, Cq), jnp.float32),
                jnp.zeros((B, K, G, Cq, H), jnp.float32))
        (_, l_BKGT, acc_BKGTH), _ = jax.lax.scan(key_chunk, init, jnp.arange(n_k))
        return (acc_BKGTH / l_BKGT[..., None]).astype(v_BKSH.dtype)

    out_QBKGCH = jax.lax.map(query_chunk, jnp.arange(n_q))  # one query chunk after another
    out_BKGTH = out_QBKGCH.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, n_q * Cq, H)[:, :, :, :T]
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def attend_fused(q_BTNH, k_BKHS, v_BKSH, mask_B1TS, *, implementation: str | None = "cudnn"):
    """The same attention through `jax.nn.dot_product_attention` (B T N H queries, B S K H keys / values: GQA by
    head groups as ours); "cudnn" needs an NVIDIA GPU, None lets JAX pick (the XLA formula elsewhere)."""
    k_BSKH, v_BSKH = k_BKHS.transpose(0, 3, 1, 2), v_BKSH.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, implementation=implementation)
