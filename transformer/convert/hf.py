"""Import a Hugging Face model directory, and export a decoder to one.

The directory's `model_type` picks the family: BERT-family encoders (convert/bert.py), Llama / Mistral / Qwen2
(convert/llama.py) and GPT-2 (convert/gpt2.py) decoders. Each family's name-mapping table serves both directions.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from transformer.config import ConfigError, ModelConfig
from transformer.convert import bert, gpt2, llama
from transformer.convert.hf_files import (
    is_hf_dir,
    read_generation_config,
    read_hf_config,
    read_tensors,
    read_tokenizer,
    write_hf_dir,
)
from transformer.convert.mapping import Pretrained, check_complete, export_tensors, import_tensors
from transformer.model import abstract_model

__all__ = ["is_hf_dir", "open_hf", "load_hf", "export_hf", "decoder_family", "FAMILIES"]

FAMILIES = {t: llama for t in llama.MODEL_TYPES} | {t: gpt2 for t in gpt2.MODEL_TYPES}
SUPPORTED = (*FAMILIES, *bert.POSITION_OFFSET)


def param_shapes(cfg: ModelConfig) -> dict:
    """The model's params tree as ShapeDtypeStructs (nothing allocated)."""
    _, params = nnx.split(abstract_model(cfg), nnx.Param)
    return nnx.to_pure_dict(params)


def decoder_config(family, hf: dict, what: str) -> ModelConfig:
    cfg = dataclasses.replace(family.model_config(hf), matmul_dtype="float32")  # the checkpoint's own precision
    return _validated(cfg, what)


def import_decoder(family, hf: dict, tensors: dict, what: str) -> tuple[ModelConfig, dict]:
    """(config, params) of a decoder from its config dict and tensors (in Hugging Face names)."""
    cfg = decoder_config(family, hf, what)
    shapes = param_shapes(cfg)
    table = family.import_table(cfg, tensors, what)
    params = import_tensors(table, tensors, shapes, ignored=family.ignored, what=what)
    check_complete(params, shapes)
    return cfg, params


def _validated(cfg: ModelConfig, what: str) -> ModelConfig:
    from transformer.config import Config

    try:
        Config(model=cfg).validate()
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return cfg


def open_hf(path: str) -> Pretrained:
    """A Hugging Face directory as (config, tokenizer, params read when first asked for): any model type in
    SUPPORTED."""
    path = os.fspath(path)
    hf = read_hf_config(path)
    kind = hf.get("model_type")
    if kind in bert.POSITION_OFFSET:
        cfg, state, tok = bert.load_hf_encoder(path)
        params = nnx.to_pure_dict(state)
        return Pretrained(cfg, tok, f"hf:{kind}", lambda: params)
    if kind not in FAMILIES:
        raise ConfigError(f"unsupported Hugging Face model_type {kind!r} in {path}: supported are "
                          f"{', '.join(SUPPORTED)}")
    what = f"{path} ({kind})"
    cfg = decoder_config(FAMILIES[kind], hf, what)  # the architecture is checked before the weights are read
    tok = read_tokenizer(path, read_generation_config(path))
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return Pretrained(cfg, tok, f"hf:{kind}", lambda: import_decoder(FAMILIES[kind], hf, read_tensors(path), what)[1])


def load_hf(path: str) -> Pretrained:
    """`open_hf` with the weights read now."""
    pre = open_hf(path)
    pre.params  # noqa: B018
    return pre


def decoder_family(cfg: ModelConfig) -> tuple[object, str]:
    """(family module, model_type) that represents a decoder config, or a ConfigError saying why none does."""
    if cfg.arch != "decoder":
        raise ConfigError(f"only decoders export to Hugging Face; this run holds model.arch={cfg.arch}")
    for family in (llama, gpt2):
        kind = family.exportable(cfg)
        if kind:
            return family, kind
    raise ConfigError("no Hugging Face family represents this decoder: export needs either GPT-2's shape (learned "
                      "positions, LayerNorm, GELU/ReLU, tied embeddings) or Llama's (rotary, RMSNorm, SwiGLU)")


def export_hf(cfg: ModelConfig, params, tokenizer, out_dir: str, generation: dict | None = None) -> str:
    """Write a decoder's config, weights and (Hugging Face) tokenizer as a directory transformers loads; returns the
    model_type written. A decoder trained without biases exports as GPT-2 with zero biases."""
    family, kind = decoder_family(cfg)
    pure = jax.tree.map(np.asarray, params)
    table = family.table(cfg)
    pure = _with_zero_biases(table, pure)
    config = family.hf_config(cfg, kind)
    if getattr(tokenizer, "bos_id", None) is not None:
        config["bos_token_id"] = tokenizer.bos_id
    if getattr(tokenizer, "eos_id", None) is not None:
        config["eos_token_id"] = tokenizer.eos_id
    stops = getattr(tokenizer, "stop_ids", None)
    generation = generation or ({"eos_token_id": stops if len(stops) > 1 else stops[0]} if stops else None)
    write_hf_dir(out_dir, config, export_tensors(table, pure), tokenizer, generation)
    return kind


def _with_zero_biases(table, pure: dict) -> dict:
    """Biases (and LayerNorm shifts) a bias-free decoder lacks, as zeros of the shape the table says."""
    pure = jax.tree.map(lambda x: x, pure)  # new dicts over the same arrays: only the dicts are filled in
    for e in table:
        node = pure
        for k in e.ours[:-1]:
            node = node[k]
        if e.ours[-1] not in node:
            assert e.ours[-1].startswith("b"), e.ours  # only biases may be absent
            size = sum(int(np.prod(s)) for s in e.shapes)
            node[e.ours[-1]] = np.zeros(size, np.float32)
    return pure
