import jax
import jax.numpy as jnp
import numpy as np

from transformer.model.attention import attend, causal_mask, padding_mask


def naive(q, k, v, mask):
    """softmax(Q K^T / sqrt(d)) V per batch and head, with plain numpy loops."""
    B, T, N, H = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
            s = np.where(mask[b, 0], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n]
    return out


def test_attend_equals_naive_formula_with_causal_and_padding_masks():
    B, T, N, H = 2, 7, 3, 5
    q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (B, T, N, H))) for i in range(3))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.array([[True] * T, [True] * 4 + [False] * 3])
    mask = causal_mask(pos, pos) & padding_mask(valid)
    got = attend(jnp.asarray(q), jnp.asarray(k).transpose(0, 2, 3, 1), jnp.asarray(v).transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, naive(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-5)


def test_masked_keys_get_zero_weight():
    B, T, N, H = 1, 4, 1, 2
    q = jnp.ones((B, T, N, H))
    k = jnp.ones((B, T, N, H))
    v = jnp.arange(T, dtype=jnp.float32).reshape(1, T, 1, 1) * jnp.ones((B, T, N, H))
    valid = jnp.array([[True, True, False, False]])
    out = attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), padding_mask(valid))
    np.testing.assert_allclose(out, 0.5)  # uniform over the two real keys (values 0 and 1)


def test_grouped_query_attention_equals_jax_reference():
    """9 query heads over 3 key/value heads: query head n reads kv head n // 3, as jax.nn.dot_product_attention's
    grouped form (and Hugging Face's repeat_kv) define it."""
    B, T, N, K, H = 2, 6, 9, 3, 4
    q = jax.random.normal(jax.random.key(0), (B, T, N, H))
    k, v = (jax.random.normal(jax.random.key(i), (B, T, K, H)) for i in (1, 2))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = causal_mask(pos, pos) & padding_mask(jnp.array([[True] * T, [False, False] + [True] * (T - 2)]))
    got = attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got[1, 2:], want[1, 2:], rtol=1e-5, atol=1e-6)  # rows with a visible key
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    # and the repeated-heads form: plain multi-head attention over each kv head copied to its 3 query heads
    rep = lambda x: jnp.repeat(x, N // K, axis=2)  # noqa: E731
    ref = naive(*(np.asarray(a) for a in (q, rep(k), rep(v))), np.asarray(mask))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, 2:], ref[1, 2:], rtol=1e-5, atol=1e-5)


def test_sliding_window_mask_sees_only_the_last_w_positions():
    pos = jnp.arange(6)[None]
    m = np.asarray(causal_mask(pos, pos, window=3))[0, 0]
    assert m.sum(1).tolist() == [1, 2, 3, 3, 3, 3]
    assert m[5].tolist() == [False, False, False, True, True, True]
