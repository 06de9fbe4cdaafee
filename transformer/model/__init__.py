"""The model families, by `model.arch`: one place that maps a config to its module class. Every family is built from
the same `Block` (block.py) over the same layers (layers.py, attention.py)."""
from __future__ import annotations

from flax import nnx

from transformer.config import ModelConfig
from transformer.model.decoder import DecoderLM
from transformer.model.encoder import EncoderLM
from transformer.model.seq2seq import EncoderDecoder

ARCHS = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return ARCHS[cfg.arch](cfg, rngs=rngs)
