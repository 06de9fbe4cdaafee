"""Encoder-only (BERT-style) model from the shared blocks: bidirectional self-attention over [CLS] + tokens, with a
masked-LM head (tied to the embedding) and a classification head on the [CLS] hidden state."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention import padding_mask
from transformer.model.block import apply_blocks, make_blocks, split_key
from transformer.model.layers import (
    ACTIVATIONS,
    DTYPES,
    AbsolutePositions,
    Embed,
    Norm,
    bias_param,
    dense,
    dropout,
    kernel_init,
    lookup,
    normal,
    param,
)


class Encoder(nnx.Module):
    """Tokens (with [CLS] first, as the tokenizer adds it) -> final hidden states. No causal mask: every position
    sees every non-padding position."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.positions = AbsolutePositions(cfg, rngs=rngs)
        self.segment_SD = param(rngs, normal(0.02), (cfg.type_vocab_size, cfg.d_model), (None, "embed")) \
            if cfg.type_vocab_size else None
        self.embed_norm = Norm(cfg, rngs=rngs) if cfg.embed_norm else None
        self.blocks = make_blocks(cfg, cfg.n_layers, rngs=rngs)
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None

    def __call__(self, tokens_BT, *, valid_BT=None, segments_BT=None, dropout_key=None, internals: bool = False):
        """Final hidden states; with `internals`, (hidden, {"attention": per layer B N T T, "residual": the stream
        B T D entering each layer and leaving the last, before any final norm})."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask_B1TS = None if valid_BT is None else padding_mask(valid_BT)
        keys = split_key(dropout_key, cfg.n_layers + 1)
        x_BTD = self.embed(tokens_BT, DTYPES[cfg.dtype])
        pos_BTD = self.positions(positions_BT)
        if pos_BTD is not None:
            x_BTD = x_BTD + pos_BTD.astype(x_BTD.dtype)
        if self.segment_SD is not None:
            segments_BT = jnp.zeros_like(tokens_BT) if segments_BT is None else segments_BT
            x_BTD = x_BTD + lookup(self.segment_SD[...], segments_BT).astype(x_BTD.dtype)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)
        x_BTD = dropout(x_BTD, cfg.dropout, keys[-1])
        x_BTD, seen = apply_blocks(self.blocks, x_BTD, keys, cfg=self.cfg, internals=internals, mask_B1TS=mask_B1TS,
                                   positions_BT=positions_BT)
        hidden_BTD = self.final_norm(x_BTD) if self.final_norm is not None else x_BTD
        return (hidden_BTD, seen) if internals else hidden_BTD


class MLMHead(nnx.Module):
    """BERT's prediction head: dense + activation + norm, then the tied embedding plus a per-token bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = "gelu_exact" if cfg.activation == "swiglu" else cfg.activation
        self.w_DD = param(rngs, kernel_init(cfg), (cfg.d_model, cfg.d_model), ("embed", None))
        self.b_D = bias_param(rngs, (cfg.d_model,), (None,))
        self.norm = Norm(cfg, rngs=rngs)
        self.b_V = bias_param(rngs, (cfg.vocab_size,), ("vocab",))

    def __call__(self, x_BTD, embed: Embed):
        h_BTD = ACTIVATIONS[self.activation](dense(x_BTD, self.w_DD[...]) + self.b_D[...].astype(x_BTD.dtype))
        return embed.attend(self.norm(h_BTD)) + self.b_V[...]


class Classifier(nnx.Module):
    """BERT's pooler (dense + tanh on the [CLS] state) and a linear layer to the labels."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.w_pool_DD = param(rngs, kernel_init(cfg), (cfg.d_model, cfg.d_model), ("embed", None))
        self.b_pool_D = bias_param(rngs, (cfg.d_model,), (None,))
        self.w_out_DC = param(rngs, kernel_init(cfg), (cfg.d_model, cfg.n_classes), ("embed", None))
        self.b_out_C = bias_param(rngs, (cfg.n_classes,), (None,))

    def __call__(self, x_BTD, dropout_rate: float = 0.0, dropout_key=None):
        cls_BD = x_BTD[:, 0].astype(jnp.float32)
        pooled_BD = jnp.tanh(cls_BD @ self.w_pool_DD[...] + self.b_pool_D[...])
        pooled_BD = dropout(pooled_BD, dropout_rate, dropout_key)
        return pooled_BD @ self.w_out_DC[...] + self.b_out_C[...]


class EncoderLM(nnx.Module):
    """The encoder with its heads. Calling it gives masked-LM logits (float32); `classify` gives label logits;
    `hidden` the final hidden states (for embeddings)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.vocab_size > 0, "set model.vocab_size (train.py takes it from the tokenizer)"
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.mlm = MLMHead(cfg, rngs=rngs)
        self.classifier = Classifier(cfg, rngs=rngs) if cfg.n_classes else None

    def hidden(self, tokens_BT, *, valid_BT=None, segments_BT=None, dropout_key=None):
        return self.encoder(tokens_BT, valid_BT=valid_BT, segments_BT=segments_BT, dropout_key=dropout_key)

    def __call__(self, tokens_BT, *, valid_BT=None, segments_BT=None, dropout_key=None, internals: bool = False):
        """Masked-LM logits (float32); with `internals`, (logits, the encoder's internals)."""
        if internals:
            _, seen = self.encoder(tokens_BT, valid_BT=valid_BT, segments_BT=segments_BT, internals=True)
            return self.unembed(seen["residual"][-1]), seen
        return self.mlm(self.hidden(tokens_BT, valid_BT=valid_BT, segments_BT=segments_BT, dropout_key=dropout_key),
                        self.encoder.embed)

    def unembed(self, x_BTD):
        """Masked-LM logits of a residual stream: the final norm (pre-norm stacks), then the MLM head."""
        if self.encoder.final_norm is not None:
            x_BTD = self.encoder.final_norm(x_BTD)
        return self.mlm(x_BTD, self.encoder.embed)

    def classify(self, tokens_BT, *, valid_BT=None, segments_BT=None, dropout_key=None):
        assert self.classifier is not None, "set model.n_classes for a classification head"
        k1, k2 = split_key(dropout_key, 2)
        x_BTD = self.hidden(tokens_BT, valid_BT=valid_BT, segments_BT=segments_BT, dropout_key=k1)
        return self.classifier(x_BTD, self.cfg.dropout, k2)


def mean_pool(hidden_BTD, valid_BT, normalize: bool = True):
    """Sentence embedding: the mean of the hidden states over real tokens, L2-normalised (sentence-transformers)."""
    w_BT1 = valid_BT[..., None].astype(jnp.float32)
    emb_BD = (hidden_BTD.astype(jnp.float32) * w_BT1).sum(1) / jnp.maximum(w_BT1.sum(1), 1e-9)
    if normalize:
        emb_BD = emb_BD / jnp.maximum(jnp.linalg.norm(emb_BD, axis=-1, keepdims=True), 1e-12)
    return emb_BD
