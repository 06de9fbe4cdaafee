"""LoRA (Hu et al. 2021): a low-rank update beside a weight matrix, y = x W + (alpha / r) x A B, with A (inputs x r)
drawn like a layer's weights and B (r x outputs) zero, so an adapted model starts as the model itself.

Adapters are `LoRAParam`s (a kind of `nnx.Param`), so they can be split from the base weights with a filter: the
base stays frozen and only the adapters train. `merged_params` folds them into the base weights for export.
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.layers import ABSTRACT, dropout, matmul


class LoRAParam(nnx.Param):
    """A low-rank adapter weight."""


def _lora_param(rngs: nnx.Rngs, init, shape, axes) -> LoRAParam:
    if ABSTRACT.get():
        return LoRAParam(jax.ShapeDtypeStruct(shape, jnp.float32), logical_axes=axes, decay=False)
    return LoRAParam(init(rngs.params(), shape, jnp.float32), logical_axes=axes, decay=False)


def adapter_state(params: nnx.State) -> nnx.State:
    """The adapters of a params State (or of its abstract or sharding twin), without the base weights."""
    return nnx.split_state(params, LoRAParam, ...)[0]


class Adapter(nnx.Module):
    """x[..., I] -> (alpha / r) x A B, shaped like the adapted matrix's outputs `out` (e.g. (N, H))."""

    def __init__(self, cfg: ModelConfig, d_in: int, out: tuple[int, ...], in_axis: str | None,
                 out_axes: tuple[str | None, ...], *, rngs: nnx.Rngs):
        r = cfg.lora_rank
        bound = 1.0 / math.sqrt(d_in)  # A like a linear layer's default init (PEFT's too); B zero

        def uniform(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.a_IR = _lora_param(rngs, uniform, (d_in, r), (in_axis, None))
        self.b_RO = _lora_param(rngs, jax.nn.initializers.zeros, (r, *out), (None, *out_axes))
        self.scale = cfg.lora_alpha / r
        self.dropout_rate = cfg.lora_dropout
        self.mm = cfg.matmul_dtype  # bf16 inputs (float32 accumulation) like the adapted matrix's own matmul

    def down(self, x_MI):
        """x A: float32 (M, inputs) -> (M, r)."""
        return matmul(x_MI, self.a_IR[...], self.mm)

    def up(self, h_MR, lead: tuple[int, ...], dtype):
        """(alpha / r) h B, shaped lead + the adapted matrix's outputs, in `dtype`."""
        y = matmul(h_MR, self.b_RO[...].reshape(h_MR.shape[-1], -1), self.mm) * self.scale
        return y.reshape(*lead, *self.b_RO.shape[1:]).astype(dtype)

    def __call__(self, x, dropout_key=None):
        """The update for input x; with a `dropout_key` (training) x is first dropped out at `lora_dropout`."""
        x = dropout(x, self.dropout_rate, dropout_key)
        return self.up(self.down(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), x.shape[:-1], x.dtype)


def adapters(cfg: ModelConfig, shapes: dict[str, tuple], rngs: nnx.Rngs) -> nnx.Dict | None:
    """The adapters of one block's matrices: `shapes` maps each adaptable name the module has to (d_in, out dims,
    in axis, out axes); only those in cfg.lora_targets get one."""
    if not cfg.lora_rank:
        return None
    chosen = {name: Adapter(cfg, *shapes[name], rngs=rngs) for name in cfg.lora_target_names if name in shapes}
    return nnx.Dict(chosen) if chosen else None


def with_dropout(lora, key):
    """The adapters as callables that drop their inputs out (`lora_dropout`), each with a key of its own; `lora`
    itself when there is no key (no training) or no dropout. `delta` takes either."""
    if lora is None or key is None or not any(a.dropout_rate for a in lora.values()):
        return lora
    return {name: functools.partial(a, dropout_key=jax.random.fold_in(key, i)) for i, (name, a) in
            enumerate(lora.items())}


def delta(lora, name: str, x):
    """The adapter `name`'s update for input x, or None when that matrix has none."""
    return lora[name](x) if lora is not None and name in lora else None


def add_delta(y, x, lora, name: str):
    """y (the matrix `name`'s output for input x) plus its adapter's update, if it has one."""
    d = delta(lora, name, x)
    return y if d is None else y + d


def deltas(lora, names: tuple[str, ...], x) -> list:
    """The updates of the adapters `names` (None where a matrix has none) for one input x. Plain adapters (no
    per-adapter dropout) share one matmul for their A matrices: x [A_q A_k A_v], then each slice times its B."""
    plain = [n for n in names if lora is not None and n in lora and isinstance(lora[n], Adapter)]
    if len(plain) < 2:
        return [delta(lora, n, x) for n in names]
    a_IR = jnp.concatenate([lora[n].a_IR[...] for n in plain], axis=1)
    h_MR = matmul(x.reshape(-1, x.shape[-1]).astype(jnp.float32), a_IR, lora[plain[0]].mm)
    ends = list(itertools.accumulate(lora[n].a_IR.shape[1] for n in plain))
    pieces = dict(zip(plain, jnp.split(h_MR, ends[:-1], axis=1)))
    return [lora[n].up(pieces[n], x.shape[:-1], x.dtype) if n in pieces else delta(lora, n, x) for n in names]


def add_deltas(y, x, lora, names: tuple[str, ...], axis: int):
    """y (a fused projection, its parts stacked on `axis`, e.g. q, k, v) plus each part's adapter update."""
    return add_parts(y, deltas(lora, names, x), axis)


def add_parts(y, parts: list, axis: int):
    """y (a fused projection) plus `parts`, one update per part stacked on `axis` (None: that part has none)."""
    if all(p is None for p in parts):
        return y
    shape = list(y.shape)
    del shape[axis]
    parts = [jnp.zeros(shape, y.dtype) if p is None else p for p in parts]
    return y + jnp.stack(parts, axis=axis)


def lora_param_count(cfg: ModelConfig) -> int:
    """Adapter parameters: rank x (inputs + outputs) per adapted matrix, in every attention (an encoder-decoder's
    decoder layers have two: self and cross) and every MLP."""
    n_dec = cfg.n_decoder_layers or cfg.n_layers
    n_attn, n_mlp = ((cfg.n_layers + 2 * n_dec, cfg.n_layers + n_dec) if cfg.arch == "encoder_decoder"
                     else (cfg.n_layers, cfg.n_layers))
    shapes = cfg.lora_shapes()
    per = {t: cfg.lora_rank * sum(shapes[t]) for t in cfg.lora_target_names}
    return sum(n * per[t] for t in per for n in [n_attn if t in ("q", "k", "v", "o") else n_mlp])


def fold(w: nnx.Param, adapter: Adapter, part: int | None = None) -> None:
    """Add the adapter's update (alpha / r) A B into the matrix w (into slice `part` of its axis 1 when w fuses
    several matrices, e.g. q / k / v)."""
    r = adapter.a_IR.shape[1]
    update = (adapter.a_IR[...] @ adapter.b_RO[...].reshape(r, -1)) * adapter.scale
    if part is None:
        w[...] = w[...] + update.reshape(w.shape)
    else:
        w[...] = w[...].at[:, part].add(update.reshape(w.shape[:1] + w.shape[2:]))


def merged_params(model: nnx.Module) -> dict:
    """The params of the same model without LoRA (cfg.lora_rank = 0): every adapter folded into its matrix. The model
    given is left as it is."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if getattr(module, "lora", None) is not None:
            module.merge_lora()
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
