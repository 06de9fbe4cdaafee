"""Building blocks shared by every model family: parameters with logical axes, embeddings, positions, norms, MLP.

Every weight is created through `param()`, which records its logical axis names (e.g. ("embed", "mlp")) as
metadata; `transformer/sharding.py` maps those names to mesh axes. Modules never mention mesh axes.
"""
from __future__ import annotations

import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from transformer.config import ModelConfig
from transformer.sharding import ACT_BTD, constrain, data_only_mesh, is_partitioned

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


normal = jax.nn.initializers.normal
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


# While set, `param` makes shapes only (see model.abstract_model).
ABSTRACT = contextvars.ContextVar("abstract_params", default=False)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
          decay: bool = True) -> nnx.Param:
    """A float32 weight with its logical axes. `decay`: whether AdamW's weight decay applies (matrices and tables
    yes; biases and norm scales no: `bias_param`, `Norm`)."""
    assert len(shape) == len(axes), (shape, axes)
    if ABSTRACT.get():
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32), logical_axes=axes, decay=decay)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes, decay=decay)


def bias_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    """A bias: zeros, never weight-decayed, whatever its rank (the fused q/k/v bias is (3, N, H))."""
    return param(rngs, zeros, shape, axes, decay=False)


def kernel_init(cfg: ModelConfig, *, in_axis=-2, out_axis=-1, batch_axis=(), residual: bool = False):
    """Initialiser of a weight matrix, by `cfg.init`. "gpt2": normal(0.02), and 0.02 / sqrt(2 * layers) for the
    projections that write into the residual stream. "xavier": Glorot-uniform over the matrix's fan-in and fan-out
    (the original Transformer's, and torch nn.Transformer's): larger weights at d_model 256-512, which an
    encoder-decoder learns from faster in its first few hundred steps. Axes (`in_axis` / `out_axis`, tuples for
    split dims such as heads x head_dim; `batch_axis` for stacked matrices such as fused q/k/v) say how a weight
    of more than two dims is one (or several) matrices."""
    if cfg.init == "xavier":
        return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis,
                                                    batch_axis=batch_axis)
    return normal(0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02)


def _flat_transpose(a):
    t = a.T
    return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


def _physical_transpose(a, batch_rows: bool = False):
    """a.T materialised row-major. XLA:CPU would otherwise fold the transpose into the dot's dimension numbers, and
    its bf16 kernels only take the plain (M,K)@(K,N) form: a folded transpose silently falls back to float32.
    `batch_rows`: a's rows are the batch (an activation), otherwise a is a weight. Across a data-parallel mesh each
    device transposes its own block (flattening a sharded array would make the partitioner gather it); under
    fsdp / tensor sharding the transpose is left to XLA."""
    if jax.default_backend() != "cpu":
        return a.T
    if not is_partitioned():
        return _flat_transpose(a)
    mesh = data_only_mesh()
    if mesh is None:
        return a.T
    spec_in, spec_out = (P("data", None), P(None, "data")) if batch_rows else (P(), P())
    return jax.shard_map(_flat_transpose, mesh=mesh, in_specs=spec_in, out_specs=spec_out)(a)


@jax.custom_vjp
def matmul_bf16(x, w):
    """(M,K)@(K,N) with bfloat16 inputs and float32 accumulation and output, forward and backward."""
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _matmul_bf16_fwd(x, w):
    like_w = jnp.zeros((0,), w.dtype)  # the weight's own dtype (f32, or bf16 for a frozen LoRA base) for its gradient
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return jnp.dot(x, w, preferred_element_type=jnp.float32), (x, w, like_w)


def _matmul_bf16_bwd(res, g_MN):
    x_MK, w_KN, like_w = res
    g_MN = g_MN.astype(jnp.bfloat16)
    dx = jnp.dot(g_MN, _physical_transpose(w_KN), preferred_element_type=jnp.float32)
    dw = jnp.dot(_physical_transpose(x_MK, batch_rows=True), g_MN, preferred_element_type=jnp.float32)
    return dx, dw.astype(like_w.dtype)


matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


@jax.custom_vjp
def matmul_nt_bf16(x_MK, w_NK):
    """x @ w.T for a weight stored (N, K), e.g. the tied embedding table as the output layer: bfloat16 inputs,
    float32 accumulation and output, forward and backward."""
    return _matmul_nt_bf16_fwd(x_MK, w_NK)[0]


def _matmul_nt_bf16_fwd(x_MK, w_NK):
    like_w = jnp.zeros((0,), w_NK.dtype)
    x_MK, w_NK = x_MK.astype(jnp.bfloat16), w_NK.astype(jnp.bfloat16)
    return jnp.dot(x_MK, _physical_transpose(w_NK), preferred_element_type=jnp.float32), (x_MK, w_NK, like_w)


def _matmul_nt_bf16_bwd(res, g_MN):
    x_MK, w_NK, like_w = res
    g_MN = g_MN.astype(jnp.bfloat16)
    dx = jnp.dot(g_MN, w_NK, preferred_element_type=jnp.float32)
    dw = jnp.dot(_physical_transpose(g_MN, batch_rows=True), x_MK, preferred_element_type=jnp.float32)
    return dx, dw.astype(like_w.dtype)


matmul_nt_bf16.defvjp(_matmul_nt_bf16_fwd, _matmul_nt_bf16_bwd)


def matmul(x, w, matmul_dtype: str = "float32"):
    """2-D x @ w. matmul_dtype="bfloat16" feeds bf16 to the matmul units and accumulates in float32 (the output keeps
    x's dtype); "float32" multiplies in x's dtype."""
    if matmul_dtype == "bfloat16" and x.dtype == jnp.float32:
        return matmul_bf16(x, w)
    return x @ w.astype(x.dtype)


def dense(x, w, matmul_dtype: str = "float32"):
    """x[..., I] @ w[I, *out] as one 2-D matmul (measured faster on XLA:CPU than batched contractions)."""
    n_in = x.shape[-1]
    y = matmul(x.reshape(-1, n_in), w.reshape(n_in, -1), matmul_dtype)
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def dense_out(x, w, n_in_axes: int, matmul_dtype: str = "float32"):
    """Contract the last `n_in_axes` axes of x with the leading axes of w (e.g. BTNH,NHD->BTD)."""
    lead = x.shape[:-n_in_axes]
    k = math.prod(x.shape[-n_in_axes:])
    y = matmul(x.reshape(-1, k), w.reshape(k, -1), matmul_dtype)
    return y.reshape(*lead, *w.shape[n_in_axes:])


def dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def lookup(table_XD, ids_BT):
    """Rows of a table for a batch of ids. The whole table is gathered first (as FSDP does for every weight) so the
    rows land straight in the batch-sharded layout; a gather from a sharded table is rematerialised by the
    partitioner."""
    table_XD = constrain(table_XD, (None, None))
    return constrain(jnp.take(table_XD, ids_BT, axis=0), ACT_BTD)


class Embed(nnx.Module):
    """Token embedding; `attend` is the tied unembedding (logits in float32)."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.table_VD = param(rngs, normal(std), (vocab_size, d_model), ("vocab", "embed"))

    def __call__(self, tokens_BT, dtype):
        return lookup(self.table_VD[...], tokens_BT).astype(dtype)

    def attend(self, x_BTD, matmul_dtype: str = "float32"):
        x_MD = x_BTD.reshape(-1, x_BTD.shape[-1]).astype(jnp.float32)
        if matmul_dtype == "bfloat16":
            y_MV = matmul_nt_bf16(x_MD, self.table_VD[...])
        else:
            y_MV = x_MD @ self.table_VD[...].T
        return y_MV.reshape(*x_BTD.shape[:-1], -1)


def output_logits(x_BTD, embed: Embed, unembed_DV=None, matmul_dtype: str = "float32"):
    """Vocabulary logits in float32 (from bf16 matmul inputs with matmul_dtype="bfloat16"): the tied embedding
    (`Embed.attend`), or a separate output matrix."""
    if unembed_DV is None:
        return embed.attend(x_BTD, matmul_dtype)
    return dense(x_BTD.astype(jnp.float32), unembed_DV[...], matmul_dtype)


def sinusoidal_at(positions_BT, d_model: int):
    """Sinusoidal encodings computed at arbitrary positions (no table bound: works past max_len)."""
    inv_freq = jnp.exp(-math.log(10_000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = positions_BT[..., None].astype(jnp.float32) * inv_freq
    out = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # interleave sin, cos
    return out.reshape(*positions_BT.shape, -1)[..., :d_model]


class AbsolutePositions(nnx.Module):
    """Learned or sinusoidal positions added to the token embeddings (rotary lives in attention)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.positions
        self.d_model = cfg.d_model
        if self.kind == "learned":
            self.table_TD = param(rngs, normal(0.02), (cfg.max_len, cfg.d_model), (None, "embed"))

    def __call__(self, positions_BT):
        if self.kind == "learned":
            return lookup(self.table_TD[...], positions_BT)
        if self.kind == "sinusoidal":
            return sinusoidal_at(positions_BT, self.d_model)
        return None


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotary angle per position of each pair of head dims (float32, H / 2 of them): theta^(-2i / H), stretched
    for long wavelengths by Llama 3's scaling when `cfg.rope_scaling` asks for it. Computed in numpy at trace time,
    in float32 the way the reference implementations compute it, so imported models rotate by the same angles."""
    H = cfg.d_head
    inv_freq = (1.0 / np.float32(cfg.rope_theta) ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_scaling == "llama3":
        old = cfg.rope_original_max_len
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        stretched = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        between = (1 - smooth) * stretched / cfg.rope_factor + smooth * stretched
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, between, stretched).astype(np.float32)
    return inv_freq


def rotary(x_BTNH, positions_BT, inv_freq_h):
    """Rotary position embedding (RoFormer), rotating the two halves of the head dim by position * inv_freq_h."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h, jnp.float32)
    sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.scale_D = param(rngs, ones, (cfg.d_model,), ("embed",), decay=False)
        self.bias_D = bias_param(rngs, (cfg.d_model,), ("embed",)) if cfg.use_bias and not self.rms else None

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.rms:
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        x = x * self.scale_D[...]
        if self.bias_D is not None:
            x = x + self.bias_D[...]
        return x.astype(dtype)


ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu}
