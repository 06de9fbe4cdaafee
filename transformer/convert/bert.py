"""The BERT family (model types bert, roberta, xlm-roberta): a Hugging Face directory (config.json +
model.safetensors + tokenizer.json) as an `EncoderLM`: the config, the params as an nnx.State, and the tokenizer.

BERT and RoBERTa (also XLM-RoBERTa) share one layout: learned positions + segment embeddings + a norm, then post-norm
blocks. Torch `Linear` weights are stored [out, in], so every one is transposed to our [in, out]; q, k, v are fused
into `w_qkv_DCNH` with the head-major split of the output features that HF's `view(B, T, N, H)` uses. RoBERTa
numbers positions from `pad_token_id + 1` (right-padded real tokens get 2, 3, ...), so its table is sliced to start
at row 0. Anything this mapping cannot represent (relative positions, an untied decoder, tensors left over) is a
`ConfigError` rather than a silently different model.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from transformer.config import ConfigError, ModelConfig
from transformer.convert.hf_files import TOKENIZER_FILE, read_hf_config, read_tensors
from transformer.convert.mapping import check_complete
from transformer.data.tokenizer import HFTokenizer
from transformer.model import abstract_model
from transformer.model.encoder import MLMHead


def _after_pad(hf: dict) -> int:
    """RoBERTa's first position id: pad_token_id + 1 (its default pad id is 1)."""
    pad = hf.get("pad_token_id")
    return (1 if pad is None else int(pad)) + 1


# model_type -> the row of the position table that position 0 uses
POSITION_OFFSET = {"bert": lambda hf: 0, "roberta": _after_pad, "xlm-roberta": _after_pad}
# HF's "gelu" is the exact erf form; "gelu_new" / "gelu_pytorch_tanh" the tanh approximation (our "gelu").
ACTIVATION = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
PREFIXES = ("", "bert.", "roberta.")
# Not weights of our model: a buffer, BERT's next-sentence head, and the pooler when there is no classifier on it.
IGNORED = ("embeddings.position_ids", "cls.seq_relationship.", "pooler.dense.")


def model_config(hf: dict, n_classes: int = 0) -> ModelConfig:
    """Our ModelConfig for a HF config dict; raises ConfigError naming the first thing it cannot represent."""
    kind = hf.get("model_type")
    if kind not in POSITION_OFFSET:
        raise ConfigError(f"unsupported Hugging Face model_type {kind!r}: only BERT-family encoders "
                          f"({', '.join(POSITION_OFFSET)}) can be imported")
    checks = {
        "position_embedding_type": (hf.get("position_embedding_type", "absolute"), "absolute"),
        "is_decoder": (hf.get("is_decoder", False), False),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ConfigError(f"unsupported {kind} config: {key}={value!r} (only {wanted!r} is supported)")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATION:
        raise ConfigError(f"unsupported {kind} config: hidden_act={act!r} (supported: {', '.join(ACTIVATION)})")
    try:
        D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        cfg = ModelConfig(
            arch="encoder", vocab_size=int(hf["vocab_size"]), d_model=D, n_heads=N,
            n_layers=int(hf["num_hidden_layers"]), d_ff=int(hf["intermediate_size"]),
            max_len=int(hf["max_position_embeddings"]) - POSITION_OFFSET[kind](hf), positions="learned",
            norm="layernorm", norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            activation=ACTIVATION[act], use_bias=True, dropout=float(hf.get("hidden_dropout_prob", 0.0)),
            tie_embeddings=True, type_vocab_size=int(hf.get("type_vocab_size", 2)), embed_norm=True,
            n_classes=n_classes, matmul_dtype="float32")  # the checkpoint's own precision
    except KeyError as e:
        raise ConfigError(f"unsupported {kind} config: {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} config.json has a malformed value ({e})") from None
    if D % N:
        raise ConfigError(f"unsupported {kind} config: hidden_size={D} is not divisible by num_attention_heads={N}")
    return cfg


class _Tensors:
    """The checkpoint's tensors, each checked against the shape the config implies; remembers which were used."""

    def __init__(self, tensors: dict):
        self.arrays = {_canonical(k): v for k, v in tensors.items()}
        self.prefix = next((p for p in PREFIXES if f"{p}embeddings.word_embeddings.weight" in self.arrays), None)
        if self.prefix is None:
            raise ConfigError("the checkpoint holds no BERT-family encoder (no embeddings.word_embeddings.weight)")
        self.used = {k for k in self.arrays if any(part in k for part in IGNORED)}

    def key(self, name: str, body: bool) -> str:
        """`name` under the encoder's prefix ("bert.", ...) when `body`, else at the top level (the heads)."""
        return self.prefix + name if body else name

    def has(self, name: str, body: bool = True) -> bool:
        return self.key(name, body) in self.arrays

    def has_any(self, start: str) -> bool:
        return any(k.startswith(start) for k in self.arrays)

    def get(self, name: str, shape: tuple[int, ...], body: bool = True) -> np.ndarray:
        key = self.key(name, body)
        if key not in self.arrays:
            raise ConfigError(f"unsupported checkpoint: tensor {key!r} is missing")
        if self.arrays[key].shape != shape:
            raise ConfigError(f"unsupported checkpoint: {key} has shape {self.arrays[key].shape}, config.json "
                              f"implies {shape}")
        self.used.add(key)
        return self.arrays[key].astype(np.float32)

    def linear(self, name: str, n_in: int, n_out: int, body: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A torch Linear (weight [out, in]) as (w [in, out], b [out])."""
        return self.get(f"{name}.weight", (n_out, n_in), body).T, self.get(f"{name}.bias", (n_out,), body)

    def norm(self, name: str, D: int, body: bool = True) -> dict:
        return {"scale_D": self.get(f"{name}.weight", (D,), body), "bias_D": self.get(f"{name}.bias", (D,), body)}


def _canonical(key: str) -> str:
    # Checkpoints converted from TF name LayerNorm's parameters gamma / beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _encoder(t: _Tensors, cfg: ModelConfig, offset: int) -> dict:
    V, D, N, H, F = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.ff_dim
    table_VD = t.get("embeddings.word_embeddings.weight", (V, D))
    positions = t.get("embeddings.position_embeddings.weight", (offset + cfg.max_len, D))
    out = {"embed": {"table_VD": table_VD}, "positions": {"table_TD": positions[offset:]},
           "embed_norm": t.norm("embeddings.LayerNorm", D), "blocks": {}}
    if cfg.type_vocab_size:
        out["segment_SD"] = t.get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D))
    for i in range(cfg.n_layers):
        p = f"encoder.layer.{i}."
        qkv = [t.linear(f"{p}attention.self.{name}", D, D) for name in ("query", "key", "value")]
        w_o, b_o = t.linear(f"{p}attention.output.dense", D, D)
        w_in, b_in = t.linear(f"{p}intermediate.dense", D, F)
        w_out, b_out = t.linear(f"{p}output.dense", F, D)
        out["blocks"][i] = {
            "attn": {"w_qkv_DCNH": np.stack([w for w, _ in qkv], axis=1).reshape(D, 3, N, H),
                     "b_qkv_CNH": np.stack([b for _, b in qkv]).reshape(3, N, H),
                     "w_o_NHD": w_o.reshape(N, H, D), "b_o_D": b_o},
            "attn_norm": t.norm(f"{p}attention.output.LayerNorm", D),
            "mlp": {"w_in_DF": w_in, "b_in_F": b_in, "w_out_FD": w_out, "b_out_D": b_out},
            "mlp_norm": t.norm(f"{p}output.LayerNorm", D),
        }
    return out


def _mlm_head(t: _Tensors, cfg: ModelConfig, table_VD: np.ndarray) -> dict | None:
    """BERT's cls.predictions.* or RoBERTa's lm_head.*; None when the checkpoint has no MLM head."""
    if t.has_any("cls.predictions."):
        dense, norm, bias = "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions"
    elif t.has_any("lm_head."):
        dense, norm, bias = "lm_head.dense", "lm_head.layer_norm", "lm_head"
    else:
        return None
    D, V = cfg.d_model, cfg.vocab_size
    w, b = t.linear(dense, D, D, body=False)
    # The vocabulary bias may be stored twice (the decoder's is tied to it), the decoder's weight as well (tied to the
    # word embeddings); our head is tied, so copies must be equal.
    decoder = f"{bias}.decoder"
    b_V = t.get(f"{bias}.bias" if t.has(f"{bias}.bias", body=False) else f"{decoder}.bias", (V,), body=False)
    if t.has(f"{decoder}.bias", body=False) and not np.array_equal(t.get(f"{decoder}.bias", (V,), body=False), b_V):
        raise ConfigError("unsupported checkpoint: the MLM decoder bias differs from the prediction bias")
    if t.has(f"{decoder}.weight", body=False) and not np.array_equal(
            t.get(f"{decoder}.weight", (V, D), body=False), table_VD):
        raise ConfigError("unsupported checkpoint: the MLM decoder is not tied to the word embeddings")
    return {"w_DD": w, "b_D": b, "norm": t.norm(norm, D, body=False), "b_V": b_V}


def _n_classes(t: _Tensors) -> int:
    for key in ("classifier.weight", "classifier.out_proj.weight"):
        if key in t.arrays:
            return t.arrays[key].shape[0]
    return 0


def _classifier(t: _Tensors, cfg: ModelConfig) -> dict | None:
    """BERT's pooler + classifier, or RoBERTa's classification head (dense + tanh on <s>, then out_proj): both are
    our Classifier. None when there is no classification head (a bare pooler is dropped)."""
    D, C = cfg.d_model, cfg.n_classes
    if "classifier.out_proj.weight" in t.arrays:
        w_pool, b_pool = t.linear("classifier.dense", D, D, body=False)
        w_out, b_out = t.linear("classifier.out_proj", D, C, body=False)
    elif C:
        w_pool, b_pool = t.linear("pooler.dense", D, D)
        w_out, b_out = t.linear("classifier", D, C, body=False)
    else:
        return None
    return {"w_pool_DD": w_pool, "b_pool_D": b_pool, "w_out_DC": w_out, "b_out_C": b_out}


def load_hf_encoder(path: str, seed: int = 0) -> tuple[ModelConfig, nnx.State, HFTokenizer]:
    """(config, params, tokenizer) of a Hugging Face BERT-family directory. Params are an nnx.State of float32
    numpy arrays matching `nnx.split(EncoderLM(cfg, ...), nnx.Param)`; a checkpoint without an MLM head gets a
    freshly initialised one (from `seed`)."""
    path = os.fspath(path)
    hf = read_hf_config(path)
    model_config(hf)  # the architecture is checked before the weights are read
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise ConfigError(f"{path} has no {TOKENIZER_FILE}; only directories with a fast (tokenizers) tokenizer load")
    t = _Tensors(read_tensors(path))
    cfg = model_config(hf, n_classes=_n_classes(t))
    encoder = _encoder(t, cfg, POSITION_OFFSET[hf["model_type"]](hf))
    head = _classifier(t, cfg)
    mlm = _mlm_head(t, cfg, encoder["embed"]["table_VD"])
    if mlm is None:
        mlm = nnx.to_pure_dict(nnx.state(MLMHead(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    left = sorted(set(t.arrays) - t.used)
    if left:
        raise ConfigError(f"unsupported checkpoint: {len(left)} tensor(s) this importer does not know, e.g. "
                          f"{left[0]!r}")
    pure = {"encoder": encoder, "mlm": mlm, **({"classifier": head} if head is not None else {})}
    _, params = nnx.split(abstract_model(cfg), nnx.Param)
    check_complete(pure, nnx.to_pure_dict(params))  # the mapping above fills every param of the model
    nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: np.asarray(x, np.float32), pure))
    return cfg, params, HFTokenizer.from_file(os.path.join(path, TOKENIZER_FILE))
