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


# --- the other formulations (model.attention): chunked and cuDNN-shaped, against the einsum formula --------------

def _qkv(B=2, T=37, S=37, N=6, K=2, H=8, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(r.standard_normal((B, K, H, S)), jnp.float32)
    v = jnp.asarray(r.standard_normal((B, K, S, H)), jnp.float32)
    return q, k, v


def _masks(B=2, T=37):
    from transformer.model.attention import segment_mask

    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.arange(T)[None] < jnp.array([[T], [T - 9]])  # the second row ends in padding
    segments = jnp.where(jnp.arange(T)[None] < jnp.array([[15], [20]]), 1, 2) * valid  # two documents a row
    seg_pos = jnp.where(segments == 2, pos - jnp.array([[15], [20]]), pos)
    return {"causal": causal_mask(pos, pos), "padding": padding_mask(valid),
            "causal+padding": causal_mask(pos, pos) & padding_mask(valid),
            "segments": segment_mask(segments, seg_pos), "window": causal_mask(pos, pos, 5), "none": None}


def _rows_that_see_a_key(mask, BT):
    """Queries with at least one visible key (a row of padding sees none: its output is meaningless either way)."""
    if mask is None:
        return np.ones(BT, bool)
    return np.asarray(jnp.broadcast_to(mask, (*BT[:1], 1, BT[1], mask.shape[-1])).any(-1))[:, 0]


def test_chunked_attention_equals_the_einsum_formula_with_every_mask_and_its_gradients():
    from transformer.model.attention_forms import attend_chunked

    q, k, v = _qkv()  # 6 query heads over 2 key/value heads; T = 37 is not a multiple of the chunk
    for name, mask in _masks().items():
        for chunk in (8, 64):
            got = attend_chunked(q, k, v, mask, chunk)
            want = attend(q, k, v, mask)
            valid = _rows_that_see_a_key(mask, got.shape[:2])
            np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, err_msg=name)
    mask = _masks()["causal+padding"]
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda q, k, v: attend_chunked(q, k, v, mask, 8), lambda q, k, v: attend(q, k, v, mask))]
    for g, want in zip(*grads):
        np.testing.assert_allclose(g, want, atol=5e-5)


def test_cudnn_shaped_attention_equals_the_einsum_formula():
    """The call model.attention=cudnn makes (jax.nn.dot_product_attention on our layouts), with JAX's own formula on
    this backend; the cuDNN kernel itself only runs on an NVIDIA GPU (checked there)."""
    from transformer.model.attention_forms import attend_fused

    q, k, v = _qkv()
    for name, mask in _masks().items():
        got = attend_fused(q, k, v, mask, implementation=None if jax.default_backend() != "gpu" else "cudnn")
        want = attend(q, k, v, mask)
        valid = _rows_that_see_a_key(mask, got.shape[:2])
        tol = 2e-5 if jax.default_backend() != "gpu" else 2e-2
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=tol, err_msg=name)


def test_cudnn_attention_on_a_cpu_is_a_config_error():
    import pytest

    from transformer.config import ConfigError
    from transformer.platform import check_attention

    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU"):
        check_attention("cudnn", jax.devices()[0])
    check_attention("chunked", jax.devices()[0])
