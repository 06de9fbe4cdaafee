"""GPT-2 (model type gpt2): its config.json as our ModelConfig, and the name-mapping table between our decoder's params
and its tensors.

GPT-2 is a pre-LayerNorm decoder with learned positions, biases everywhere, a tanh-approximated GELU and the output
layer tied to the token embeddings. Its projections are `Conv1D`s, stored [in, out] (no transpose), with q, k, v
fused head-major in `c_attn`, which is exactly our fused `w_qkv_DCNH` laid out flat.
"""
from __future__ import annotations

import numpy as np

from transformer.config import ConfigError, ModelConfig
from transformer.convert.mapping import Entry, entry

MODEL_TYPES = ("gpt2",)
ACTIVATION = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}


def ignored(name: str) -> bool:
    """Causal-mask constants older checkpoints store, and a tied output layer (checked equal separately)."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"


def import_table(cfg: ModelConfig, tensors: dict, what: str) -> list[Entry]:
    """The table for these tensors: GPT2LMHeadModel saves its body under "transformer.", the original checkpoints
    have no prefix; a stored output layer must be the embedding table it is tied to."""
    pre = "" if "wte.weight" in tensors else "transformer."
    head, embed = tensors.get("lm_head.weight"), tensors.get(pre + "wte.weight")
    if head is not None and embed is not None and not np.array_equal(head, embed):
        raise ConfigError(f"{what}: lm_head.weight differs from {pre}wte.weight, but GPT-2 ties them")
    return table(cfg, pre)


def model_config(hf: dict) -> ModelConfig:
    try:
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATION:
            raise ConfigError(f"unsupported gpt2 config: activation_function={act!r} (supported: "
                              f"{', '.join(ACTIVATION)})")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ConfigError(f"unsupported gpt2 config: {key}=true")
        if not hf.get("scale_attn_weights", True):
            raise ConfigError("unsupported gpt2 config: scale_attn_weights=false")
        if not hf.get("tie_word_embeddings", True):
            raise ConfigError("unsupported gpt2 config: tie_word_embeddings=false")
        D = int(hf["n_embd"])
        return ModelConfig(arch="decoder", vocab_size=int(hf["vocab_size"]), d_model=D, n_heads=int(hf["n_head"]),
                           n_layers=int(hf["n_layer"]), d_ff=int(hf.get("n_inner") or 4 * D),
                           max_len=int(hf["n_positions"]), positions="learned", norm="layernorm",
                           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), activation=ACTIVATION[act],
                           use_bias=True, tie_embeddings=True, dropout=0.0)
    except KeyError as e:
        raise ConfigError(f"gpt2 config.json lacks {e.args[0]!r}") from None


def hf_config(cfg: ModelConfig, model_type: str = "gpt2") -> dict:
    act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}[cfg.activation]
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": cfg.ff_dim,
            "n_positions": cfg.max_len, "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


def exportable(cfg: ModelConfig) -> str | None:
    """"gpt2" when GPT-2 represents this decoder (a model trained without biases exports them as zeros)."""
    ok = (cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.norm_position == "pre"
          and cfg.tie_embeddings and cfg.kv_heads == cfg.n_heads and cfg.d_head * cfg.n_heads == cfg.d_model
          and cfg.activation in ("gelu", "gelu_exact", "relu") and not cfg.scale_embeddings
          and not cfg.sliding_window)
    return "gpt2" if ok else None


def table(cfg: ModelConfig, pre: str = "transformer.") -> list[Entry]:
    D, N, H, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.ff_dim, cfg.vocab_size
    t = [entry(("embed", "table_VD"), pre + "wte.weight", (V, D)),
         entry(("positions", "table_TD"), pre + "wpe.weight", (cfg.max_len, D)),
         entry(("final_norm", "scale_D"), pre + "ln_f.weight", (D,)),
         entry(("final_norm", "bias_D"), pre + "ln_f.bias", (D,))]
    for i in range(cfg.n_layers):
        p, b = f"{pre}h.{i}.", ("blocks", i)
        t += [entry((*b, "attn_norm", "scale_D"), p + "ln_1.weight", (D,)),
              entry((*b, "attn_norm", "bias_D"), p + "ln_1.bias", (D,)),
              entry((*b, "attn", "w_qkv_DCNH"), p + "attn.c_attn.weight", (D, 3 * D)),
              entry((*b, "attn", "b_qkv_CNH"), p + "attn.c_attn.bias", (3 * D,)),
              entry((*b, "attn", "w_o_NHD"), p + "attn.c_proj.weight", (N * H, D)),
              entry((*b, "attn", "b_o_D"), p + "attn.c_proj.bias", (D,)),
              entry((*b, "mlp_norm", "scale_D"), p + "ln_2.weight", (D,)),
              entry((*b, "mlp_norm", "bias_D"), p + "ln_2.bias", (D,)),
              entry((*b, "mlp", "w_in_DF"), p + "mlp.c_fc.weight", (D, F)),
              entry((*b, "mlp", "b_in_F"), p + "mlp.c_fc.bias", (F,)),
              entry((*b, "mlp", "w_out_FD"), p + "mlp.c_proj.weight", (F, D)),
              entry((*b, "mlp", "b_out_D"), p + "mlp.c_proj.bias", (D,))]
    return t
