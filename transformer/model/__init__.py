"""The model families, by `model.arch`: one place that maps a config to its module class. Every family is built from
the same `Block` (block.py) over the same layers (layers.py, attention.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.decoder import DecoderLM
from transformer.model.encoder import EncoderLM
from transformer.model.layers import ABSTRACT
from transformer.model.seq2seq import EncoderDecoder

ARCHS = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return ARCHS[cfg.arch](cfg, rngs=rngs)


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """The model with jax.ShapeDtypeStruct params (nothing allocated, no random numbers drawn): for its graphdef and
    shapes before restoring or importing weights. What `nnx.eval_shape(build_model)` gives, without tracing the
    initialisers: tracing ~400 of them costs seconds (measured 2 s for SmolLM2-135M's 30 layers) as each random-key
    update is traced."""
    token = ABSTRACT.set(True)
    try:
        return build_model(cfg, nnx.Rngs(0))
    finally:
        ABSTRACT.reset(token)


def cast_params(tree, dtype):
    """`tree` (an nnx State of params, concrete or abstract) with every floating leaf in `dtype`; metadata (logical
    axes, decay flags, shardings) kept."""
    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)
    return jax.tree.map(cast, tree)
