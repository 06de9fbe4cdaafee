import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.config import ModelConfig
from transformer.layers import Norm, rotary, sinusoidal_at


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
    # norm preserved
    np.testing.assert_allclose(jnp.linalg.norm(rotary(x, pos(7), 1e4)), jnp.linalg.norm(x), rtol=1e-5)
    # <R(m) x, R(n) y> depends on m - n only
    dot = lambda m, n: jnp.sum(rotary(x, pos(m), 1e4) * rotary(y, pos(n), 1e4), axis=-1)
    np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4, atol=1e-5)
    assert not np.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_norms_normalise():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 7, 16))
    ln = Norm(ModelConfig(d_model=16), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(ln.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ln.std(-1), 1.0, atol=1e-3)
    rms = Norm(ModelConfig(d_model=16, norm="rmsnorm"), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(rms ** 2, -1)), 1.0, atol=1e-3)
    assert abs(float(rms.mean())) > 0.1  # RMSNorm does not centre
