import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.layers import Norm, matmul, matmul_nt_bf16, rope_frequencies, rotary, sinusoidal_at


def test_sinusoidal_matches_the_paper_formula():
    pe = np.asarray(sinusoidal_at(jnp.arange(5)[None], 16))[0]
    expected = {1: (0.841, 0.540), 2: (0.909, -0.416), 3: (0.141, -0.990), 4: (-0.757, -0.654)}
    for pos, (s, c) in expected.items():
        np.testing.assert_allclose(pe[pos, :2], [s, c], atol=1e-3)
    # dimension pair i uses frequency 1 / 10000^(2i/D)
    np.testing.assert_allclose(pe[3, 4], np.sin(3 / 10000 ** (4 / 16)), atol=1e-6)
    np.testing.assert_allclose(pe[3, 5], np.cos(3 / 10000 ** (4 / 16)), atol=1e-6)


def test_rotary_is_a_rotation_and_relative():
    x = jax.random.normal(jax.random.key(0), (1, 1, 3, 8))
    y = jax.random.normal(jax.random.key(1), (1, 1, 3, 8))
    pos = lambda p: jnp.array([[p]])
    inv = rope_frequencies(ModelConfig(d_model=24, n_heads=3, positions="rotary"))  # head dim 8
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)  # theta^(-2i/H), theta = 10^4
    # norm preserved
    np.testing.assert_allclose(jnp.linalg.norm(rotary(x, pos(7), inv)), jnp.linalg.norm(x), rtol=1e-5)
    # <R(m) x, R(n) y> depends on m - n only
    dot = lambda m, n: jnp.sum(rotary(x, pos(m), inv) * rotary(y, pos(n), inv), axis=-1)
    np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4, atol=1e-5)
    assert not np.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_llama3_rope_scaling_stretches_only_long_wavelengths():
    # Head dim 8, theta 10^4: wavelengths 2 pi * (1, 10, 100, 1000) ~ 6.3, 63, 628, 6283. With an original context of
    # 1024, low factor 1 and high factor 4, wavelengths under 256 stay, over 1024 are divided by the factor (8), and
    # 628 lies between: smooth = (1024 / 628.3 - 1) / 3 = 0.2099, freq = 0.01 * (0.2099 + (1 - 0.2099) / 8).
    cfg = ModelConfig(d_model=24, n_heads=3, positions="rotary", rope_scaling="llama3", rope_factor=8.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=1024)
    smooth = (1024 / (2 * np.pi * 100) - 1) / 3
    np.testing.assert_allclose(rope_frequencies(cfg), [1.0, 0.1, 0.01 * (smooth + (1 - smooth) / 8), 0.001 / 8],
                               rtol=1e-5)


def test_norms_normalise():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 7, 16))
    ln = Norm(ModelConfig(d_model=16), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(ln.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ln.std(-1), 1.0, atol=1e-3)
    rms = Norm(ModelConfig(d_model=16, norm="rmsnorm"), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(rms ** 2, -1)), 1.0, atol=1e-3)
    assert abs(float(rms.mean())) > 0.1  # RMSNorm does not centre


def _matmul_nt(x, w_NK, matmul_dtype):
    return matmul_nt_bf16(x, w_NK) if matmul_dtype == "bfloat16" else x @ w_NK.T


@pytest.mark.parametrize("layout", ["x @ w", "x @ w.T (tied output layer)"])
def test_bf16_matmul_gradients_and_kernels(layout):
    """matmul_dtype="bfloat16": forward and both backward matmuls take bf16 inputs and accumulate in float32."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 32))
    w = jax.random.normal(kw, (32, 48) if layout == "x @ w" else (48, 32))
    mm = matmul if layout == "x @ w" else _matmul_nt
    loss = lambda x, w, dt: jnp.sum(jnp.sin(mm(x, w, dt)))  # noqa: E731
    grads32 = jax.grad(loss, argnums=(0, 1))(x, w, "float32")
    grads16 = jax.grad(loss, argnums=(0, 1))(x, w, "bfloat16")
    for g32, g16 in zip(grads32, grads16):
        assert g16.dtype == jnp.float32
        rel = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
        assert 1e-5 < rel < 2e-2  # bf16 rounding of the inputs, not garbage and not float32
    # Every dot of the compiled forward + backward reads bf16 operands: a transpose folded into a dot would make
    # XLA:CPU fall back to a float32 dot.
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2).lower(x, w, "bfloat16").compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 3
    for line in dots:
        operands = re.findall(r"%[\w.\-]+", re.search(r" dot\(([^)]*)\)", line).group(1))
        assert [_declared_type(hlo, name) for name in operands] == ["bf16", "bf16"], line


def _declared_type(hlo: str, name: str) -> str:
    """Element type of an HLO value (compiled HLO prints a dot's operands by name only)."""
    return re.search(rf"{re.escape(name)} = (\w+)\[", hlo).group(1)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_xavier_init_spreads_each_matrix_over_its_own_fans(activation):
    from transformer.model.attention import Attention
    from transformer.model.mlp import MLP

    D, N, F, L = 256, 4, 1024, 3
    cfg = ModelConfig(d_model=D, n_heads=N, d_ff=F, n_layers=L, activation=activation, init="xavier")
    att, cross, mlp = Attention(cfg, rngs=nnx.Rngs(0)), Attention(cfg, cross=True, rngs=nnx.Rngs(1)), MLP(cfg, rngs=nnx.Rngs(2))
    w_in = mlp.w_in_DCF if activation == "swiglu" else mlp.w_in_DF
    glorot = lambda fan_in, fan_out: (2.0 / (fan_in + fan_out)) ** 0.5  # std of U(-a, a), a = sqrt(6 / fan sum)
    for w, want in [(att.w_qkv_DCNH, glorot(D, D)), (att.w_o_NHD, glorot(D, D)), (cross.w_q_DNH, glorot(D, D)),
                    (cross.w_kv_DCKH, glorot(D, D)), (w_in, glorot(D, F)), (mlp.w_out_FD, glorot(F, D))]:
        v = np.asarray(w[...])
        np.testing.assert_allclose(v.std(), want, rtol=0.03)
        assert np.abs(v).max() <= want * 3 ** 0.5 * 1.0001  # uniform, bounded at sqrt(3) std
    from transformer.model import (
        build_model,  # an untied output layer is a weight matrix too
    )
    lm = build_model(ModelConfig(d_model=D, n_heads=N, d_ff=F, n_layers=1, vocab_size=1000, tie_embeddings=False,
                                 activation=activation, init="xavier"), nnx.Rngs(3))
    np.testing.assert_allclose(np.asarray(lm.unembed_DV[...]).std(), glorot(D, 1000), rtol=0.03)
    # The GPT-2 default: 0.02, residual-stream outputs 0.02 / sqrt(2 L).
    gpt2 = MLP(ModelConfig(d_model=D, d_ff=F, n_layers=L), rngs=nnx.Rngs(2))
    np.testing.assert_allclose(np.asarray(gpt2.w_in_DF[...]).std(), 0.02, rtol=0.03)
    np.testing.assert_allclose(np.asarray(gpt2.w_out_FD[...]).std(), 0.02 / (2 * L) ** 0.5, rtol=0.03)
