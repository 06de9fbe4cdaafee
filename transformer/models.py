"""The model families, by `model.arch`: one place that maps a config to its module class."""
from __future__ import annotations

from flax import nnx

from transformer.config import ModelConfig
from transformer.encoder import EncoderLM
from transformer.model import DecoderLM
from transformer.seq2seq import EncoderDecoder

ARCHS = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return ARCHS[cfg.arch](cfg, rngs=rngs)
