"""Encoder-decoder Transformer ("Attention Is All You Need") from the shared blocks.

The encoder runs once over the source with unmasked self-attention (padding masked). Every decoder layer has causal
self-attention, then cross-attention whose queries come from the decoder and whose keys and values come from the
final encoder output, then the feed-forward block. One embedding table serves source, target and the output layer.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention import causal_mask, init_kv_cache, padding_mask
from transformer.model.block import apply_blocks, make_blocks, split_key
from transformer.model.layers import DTYPES, AbsolutePositions, Embed, Norm, dropout, kernel_init, output_logits, param


def _positions(B: int, T: int):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.vocab_size > 0, "set model.vocab_size (train.py takes it from the tokenizer)"
        self.cfg = cfg
        # Embeddings scaled by sqrt(d_model) start at std d_model ** -0.5, so that the scaled ones have unit variance
        # (and tied logits unit scale), as in the original Transformer.
        std = cfg.d_model ** -0.5 if cfg.scale_embeddings else 0.02
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=std)
        self.positions = AbsolutePositions(cfg, rngs=rngs)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.enc_blocks = make_blocks(cfg, cfg.n_layers, rngs=rngs)
        self.dec_blocks = make_blocks(cfg, n_dec, cross=True, rngs=rngs)
        pre = cfg.norm_position == "pre"  # post-norm blocks already end in a norm
        self.enc_norm = Norm(cfg, rngs=rngs) if pre else None
        self.dec_norm = Norm(cfg, rngs=rngs) if pre else None
        self.unembed_DV = None if cfg.tie_embeddings else param(
            rngs, kernel_init(cfg), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def _embed(self, tokens_BT, positions_BT, key):
        x_BTD = self.embed(tokens_BT, DTYPES[self.cfg.dtype]) * self.scale
        pos_BTD = self.positions(positions_BT)
        if pos_BTD is not None:
            x_BTD = x_BTD + pos_BTD.astype(x_BTD.dtype)
        return dropout(x_BTD, self.cfg.dropout, key)

    def encode(self, src_BS, src_valid_BS, *, dropout_key=None, internals: bool = False):
        """The final encoder output (memory) for a padded batch of sources; with `internals`, (memory,
        {"attention": per layer B N S S, "residual": the stream entering each layer and leaving the last})."""
        B, S = src_BS.shape
        keys = split_key(dropout_key, len(self.enc_blocks) + 1)
        positions_BS = _positions(B, S)
        x_BSD = self._embed(src_BS, positions_BS, keys[-1])
        mask_B1SS = padding_mask(src_valid_BS)
        x_BSD, seen = apply_blocks(self.enc_blocks, x_BSD, keys, cfg=self.cfg, internals=internals, mask_B1TS=mask_B1SS,
                                   positions_BT=positions_BS)
        memory_BSD = self.enc_norm(x_BSD) if self.enc_norm is not None else x_BSD
        return (memory_BSD, seen) if internals else memory_BSD

    def cross_kvs(self, memory_BSD) -> list[dict]:
        """Each decoder layer's cross-attention keys / values of the memory: computed once per source."""
        return [block.cross_attn.cross_kv(memory_BSD) for block in self.dec_blocks]

    def decode(self, tgt_BT, src_valid_BS, *, memory_BSD=None, cross_kvs=None, positions_BT=None, mask_B1TS=None,
               dropout_key=None, cache=None, cache_index=None, internals: bool = False):
        """Target-vocabulary logits (float32) for the decoder inputs, attending to the memory (or its precomputed
        per-layer keys / values). With a self-attention `cache` it returns (logits, new_cache), as DecoderLM; with
        `internals`, (logits, {"attention": B N T T and "cross_attention": B N T S per layer, "residual"})."""
        B, T = tgt_BT.shape
        keys = split_key(dropout_key, len(self.dec_blocks) + 1)
        if positions_BT is None:
            positions_BT = _positions(B, T)
        if mask_B1TS is None:
            mask_B1TS = causal_mask(positions_BT, positions_BT)
        cross_mask_B1TS = padding_mask(src_valid_BS)
        x_BTD = self._embed(tgt_BT, positions_BT, keys[-1])
        if cache is not None:
            new_cache = []
            for i, block in enumerate(self.dec_blocks):
                kv = None if cross_kvs is None else cross_kvs[i]
                x_BTD, layer_cache = block(x_BTD, mask_B1TS=mask_B1TS, positions_BT=positions_BT,
                                           context_BSD=memory_BSD, context_mask_B1TS=cross_mask_B1TS, context_kv=kv,
                                           cache=cache[i], cache_index=cache_index)
                new_cache.append(layer_cache)
            return self.unembed(x_BTD), new_cache
        if cross_kvs is not None:  # per-layer context: the blocks run one by one
            assert not internals, "internals need the memory (memory_BSD), not precomputed cross_kvs"
            for block, kv, key in zip(self.dec_blocks, cross_kvs, keys):
                x_BTD = block(x_BTD, mask_B1TS=mask_B1TS, positions_BT=positions_BT, context_kv=kv,
                              context_mask_B1TS=cross_mask_B1TS, dropout_key=key)
            return self.unembed(x_BTD)
        x_BTD, seen = apply_blocks(self.dec_blocks, x_BTD, keys, cfg=self.cfg, internals=internals, mask_B1TS=mask_B1TS,
                                   positions_BT=positions_BT, context_BSD=memory_BSD,
                                   context_mask_B1TS=cross_mask_B1TS)
        logits_BTV = self.unembed(x_BTD)
        return (logits_BTV, seen) if internals else logits_BTV

    def unembed(self, x_BTD):
        """Logits (float32) of a decoder residual stream: the final norm (pre-norm stacks), then the output layer."""
        if self.dec_norm is not None:
            x_BTD = self.dec_norm(x_BTD)
        return output_logits(x_BTD, self.embed, self.unembed_DV, self.cfg.matmul_dtype)

    def __call__(self, src_BS, tgt_in_BT, *, src_valid_BS, dropout_key=None, internals: bool = False):
        """Teacher forcing: logits for every target position given the whole source and the target so far. With
        `internals`, (logits, the decoder's internals plus "encoder_attention" and "encoder_residual")."""
        if internals:
            memory_BSD, enc = self.encode(src_BS, src_valid_BS, internals=True)
            logits, seen = self.decode(tgt_in_BT, src_valid_BS, memory_BSD=memory_BSD, internals=True)
            return logits, {**seen, "encoder_attention": enc["attention"], "encoder_residual": enc["residual"]}
        k_enc, k_dec = split_key(dropout_key, 2)
        memory_BSD = self.encode(src_BS, src_valid_BS, dropout_key=k_enc)
        return self.decode(tgt_in_BT, src_valid_BS, memory_BSD=memory_BSD, dropout_key=k_dec)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        return init_kv_cache(batch, length, self.cfg, len(self.dec_blocks))
