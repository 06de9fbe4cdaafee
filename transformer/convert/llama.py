"""The Llama family (model types llama, mistral, qwen2): their config.json as our ModelConfig, and the name-mapping
table between our decoder's params and their tensors.

All three are pre-RMSNorm decoders with rotary positions (rotating the two halves of each head, which is our
`rotary`), grouped-query attention and a SwiGLU MLP; they differ in q/k/v biases (Qwen2), a sliding attention window
(Mistral), rotary frequency scaling (Llama 3) and whether the output layer is tied to the embeddings.
"""
from __future__ import annotations

from transformer.config import ConfigError, ModelConfig
from transformer.convert.mapping import Entry, entry

MODEL_TYPES = ("llama", "mistral", "qwen2")


def ignored(name: str) -> bool:
    """Buffers some checkpoints carry that are not weights: rotary frequencies."""
    return name.endswith("rotary_emb.inv_freq")


def _rope(hf: dict) -> dict:
    """theta and scaling from `rope_theta` / `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    src = scaling if scaling else params
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind == "llama3":
        return {"rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(src["factor"]),
                "rope_low_freq_factor": float(src["low_freq_factor"]),
                "rope_high_freq_factor": float(src["high_freq_factor"]),
                "rope_original_max_len": int(src["original_max_position_embeddings"])}
    raise ConfigError(f"unsupported rotary scaling {kind!r}: only plain rotary and 'llama3' scaling are supported")


def model_config(hf: dict) -> ModelConfig:
    kind = hf["model_type"]
    try:
        D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported {kind} config: hidden_act={act!r} (only 'silu', i.e. SwiGLU)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"unsupported {kind} config: {key}=true (only the q/k/v biases of qwen2 are "
                                  "supported)")
        if kind == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError("unsupported qwen2 config: use_sliding_window=true (a window on some layers only)")
        window = hf.get("sliding_window") if kind == "mistral" else None
        head_dim = int(hf.get("head_dim") or D // N)
        return ModelConfig(
            arch="decoder", vocab_size=int(hf["vocab_size"]), d_model=D, n_heads=N,
            n_kv_heads=int(hf.get("num_key_value_heads") or N), head_dim=0 if head_dim * N == D else head_dim,
            n_layers=int(hf["num_hidden_layers"]), d_ff=int(hf["intermediate_size"]),
            max_len=int(hf.get("max_position_embeddings", 2048)), positions="rotary", norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu", use_bias=False,
            qkv_bias=kind == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "qwen2")),
            sliding_window=int(window or 0), dropout=0.0, **_rope(hf))
    except KeyError as e:
        raise ConfigError(f"{kind} config.json lacks {e.args[0]!r}") from None


def hf_config(cfg: ModelConfig, model_type: str = "llama") -> dict:
    """config.json fields for `cfg` (what `model_config` reads back)."""
    out = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head, "num_hidden_layers": cfg.n_layers,
           "intermediate_size": cfg.ff_dim, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
           "attention_bias": False, "torch_dtype": "float32"}
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_len}
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    if model_type == "qwen2":
        out.pop("attention_bias")
        out["use_sliding_window"] = False
    return out


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def exportable(cfg: ModelConfig) -> str | None:
    """The model type a decoder config exports as, or None when no member of this family represents it."""
    if not (cfg.positions == "rotary" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu"
            and cfg.norm_position == "pre" and not cfg.use_bias and not cfg.scale_embeddings):
        return None
    if cfg.qkv_bias:
        return None if cfg.sliding_window else "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def import_table(cfg: ModelConfig, tensors: dict, what: str) -> list[Entry]:
    return table(cfg)


def table(cfg: ModelConfig) -> list[Entry]:
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.ff_dim, cfg.vocab_size
    t = [entry(("embed", "table_VD"), "model.embed_tokens.weight", (V, D)),
         entry(("final_norm", "scale_D"), "model.norm.weight", (D,))]
    if not cfg.tie_embeddings:
        t.append(entry(("unembed_DV",), "lm_head.weight", (V, D), "linear"))
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        proj = {c: f"{p}self_attn.{c}_proj" for c in "qkvo"}
        t += [entry((*b, "attn_norm", "scale_D"), f"{p}input_layernorm.weight", (D,)),
              entry((*b, "mlp_norm", "scale_D"), f"{p}post_attention_layernorm.weight", (D,)),
              entry((*b, "attn", "w_o_NHD"), proj["o"] + ".weight", (D, N * H), "linear"),
              entry((*b, "mlp", "w_in_DCF"), [f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"],
                    [(F, D), (F, D)], "linear"),
              entry((*b, "mlp", "w_out_FD"), f"{p}mlp.down_proj.weight", (D, F), "linear")]
        weights = [proj[c] + ".weight" for c in "qkv"]
        biases = [proj[c] + ".bias" for c in "qkv"]
        shapes = [(N * H, D), (K * H, D), (K * H, D)]
        if K == N:  # fused q/k/v
            t.append(entry((*b, "attn", "w_qkv_DCNH"), weights, shapes, "linear"))
            if cfg.qkv_bias:
                t.append(entry((*b, "attn", "b_qkv_CNH"), biases, [(N * H,)] * 3, axis=0))
        else:
            t += [entry((*b, "attn", "w_q_DNH"), weights[0], shapes[0], "linear"),
                  entry((*b, "attn", "w_kv_DCKH"), weights[1:], shapes[1:], "linear")]
            if cfg.qkv_bias:
                t += [entry((*b, "attn", "b_q_NH"), biases[0], (N * H,)),
                      entry((*b, "attn", "b_kv_CKH"), biases[1:], [(K * H,)] * 2, axis=0)]
    return t
