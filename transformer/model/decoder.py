"""The decoder-only (GPT) language model: token and position embeddings, a stack of causal Blocks, the unembedding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.attention import causal_mask, init_kv_cache, segment_mask
from transformer.model.block import apply_blocks, make_blocks, split_key
from transformer.model.layers import DTYPES, AbsolutePositions, Embed, Norm, dropout, kernel_init, output_logits, param


class DecoderLM(nnx.Module):
    """Decoder-only causal language model: tokens -> next-token logits (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.vocab_size > 0, "set model.vocab_size (train.py takes it from the tokenizer)"
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.positions = AbsolutePositions(cfg, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.n_layers, rngs=rngs)
        # Post-norm blocks already end in a norm; pre-norm stacks need one before the unembedding.
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None
        self.unembed_DV = None if cfg.tie_embeddings else param(
            rngs, kernel_init(cfg), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BT, *, positions_BT=None, mask_B1TS=None, segments_BT=None, logits_at_BN=None,
                 dropout_key=None, cache=None, cache_index=None, internals: bool = False):
        """Next-token logits (float32).

        Full forward by default: positions 0..T-1 and a causal mask (over the last `sliding_window` tokens when the
        config has one). Rows packed with several sequences pass `segments_BT` (each token's sequence id, 0 for
        padding) and `positions_BT` restarting at 0 in each sequence: tokens then attend within their own sequence
        only. `logits_at_BN` (indices along T, per row) returns logits (B N V) at those positions only, the others
        never computed (fine-tuning learns a few positions of each row; a prefill needs only the last). For decoding
        pass `cache` (from `init_cache`), the slot `cache_index` where these T tokens go, their `positions_BT`, and
        `mask_B1TS` over the cache slots; it then returns (logits, new_cache).
        With `internals` it returns (logits, {"attention": per layer B N T T, "residual": the residual stream
        B T D entering each layer and leaving the last}) for looking inside (infer/internals.py).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if mask_B1TS is None and segments_BT is not None:
            mask_B1TS = segment_mask(segments_BT, positions_BT, cfg.sliding_window)
        elif mask_B1TS is None:
            mask_B1TS = causal_mask(positions_BT, positions_BT, cfg.sliding_window)
        keys = split_key(dropout_key, cfg.n_layers + 1)
        x_BTD = self.embed(tokens_BT, DTYPES[cfg.dtype])
        pos_BTD = self.positions(positions_BT)
        if pos_BTD is not None:
            x_BTD = x_BTD + pos_BTD.astype(x_BTD.dtype)
        x_BTD = dropout(x_BTD, cfg.dropout, keys[-1])
        if cache is not None:
            new_cache = []
            for i, block in enumerate(self.blocks):
                x_BTD, layer_cache = block(x_BTD, mask_B1TS=mask_B1TS, positions_BT=positions_BT, cache=cache[i],
                                           cache_index=cache_index)
                new_cache.append(layer_cache)
            return self.unembed(_at(x_BTD, logits_at_BN)), new_cache
        x_BTD, seen = apply_blocks(self.blocks, x_BTD, keys, cfg=self.cfg, internals=internals, mask_B1TS=mask_B1TS,
                                   positions_BT=positions_BT)
        logits_BTV = self.unembed(_at(x_BTD, logits_at_BN))
        return (logits_BTV, seen) if internals else logits_BTV

    def unembed(self, x_BTD):
        """Logits (float32) of a residual stream: the final norm, then the output layer (the logit lens applies it
        to every layer's stream)."""
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return output_logits(x_BTD, self.embed, self.unembed_DV, self.cfg.matmul_dtype)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        return init_kv_cache(batch, length, self.cfg, self.cfg.n_layers)


def _at(x_BTD, positions_BN):
    """The rows of x at the given positions (B N D), or all of x when positions_BN is None."""
    return x_BTD if positions_BN is None else jnp.take_along_axis(x_BTD, positions_BN[:, :, None], axis=1)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def analytic_param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of `DecoderLM(cfg)`; a test checks it against the built model."""
    D, F, V, L = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_layers
    NH, KH = cfg.n_heads * cfg.d_head, cfg.kv_heads * cfg.d_head
    bias = cfg.use_bias
    norm = D * (2 if bias and cfg.norm == "layernorm" else 1)
    attn = 2 * D * NH + 2 * D * KH + (NH + 2 * KH if bias or cfg.qkv_bias else 0) + (D if bias else 0)
    mlp = (3 if cfg.activation == "swiglu" else 2) * D * F
    if bias:
        mlp += D + (0 if cfg.activation == "swiglu" else F)
    block = attn + mlp + 2 * norm
    total = V * D + L * block
    total += cfg.max_len * D if cfg.positions == "learned" else 0
    total += norm if cfg.norm_position == "pre" else 0
    total += 0 if cfg.tie_embeddings else D * V
    return total
