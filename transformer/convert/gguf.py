"""Import a GGUF file (llama.cpp's format; llama architecture): the model config from its metadata, its tensors
dequantised to float32 by the `gguf` package and renamed to Hugging Face's Llama names (so convert/llama.py's table
maps them), and its byte-level BPE tokenizer rebuilt with `tokenizers` from the file's tokens and merges, with its
chat template and special tokens.

llama.cpp's converter reorders the rows of each head of the q and k projections from the two-halves rotary layout
(rotate x[:H/2] with x[H/2:], Hugging Face's and ours) to interleaved pairs (rotate x[2i] with x[2i+1]); `_unpermute`
puts them back, which the parity tests against transformers' own GGUF loader check. Llama 3.1 / 3.2 files carry
their rotary scaling as per-frequency divisors (rope_freqs.weight); the importer turns them back into the
`rope_scaling` they were computed from, so the model is an ordinary Llama 3 config (and exports as one).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from transformer.config import ConfigError, first_line
from transformer.convert import llama
from transformer.convert.gguf_file import TensorInfo, read_gguf
from transformer.convert.hf import decoder_config, import_decoder
from transformer.convert.mapping import Pretrained
from transformer.data.tokenizer import HFTokenizer

ARCHITECTURES = ("llama",)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")
# GGUF tensor name -> Hugging Face Llama name ({i}: the layer)
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
# How text is split before BPE, by the file's tokenizer.ggml.pre (llama.cpp's names for the pre-tokenizers).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool = True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"), _byte_level(False)]),
}
CONTROL, USER_DEFINED = 3, 4  # token types


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class _Fields:
    def __init__(self, meta: dict, path: str):
        self.meta, self.path = meta, path

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.path}: GGUF metadata {key!r} is missing")
        return value


def hf_config(f: _Fields, tensor_names: set[str]) -> dict:
    arch = f.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{f.path}: unsupported GGUF architecture {arch!r} (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    if f.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise ConfigError(f"{f.path}: rotary scaling {f.get(f'{arch}.rope.scaling.type')!r} is not supported "
                          "(supported: none, and Llama 3's as rope_freqs.weight)")
    if f.get(f"{arch}.rope.scaling.type") == "linear" and f.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise ConfigError(f"{f.path}: linear rotary scaling is not supported")
    n_heads = int(f.need(f"{arch}.attention.head_count"))
    D = int(f.need(f"{arch}.embedding_length"))
    tokens = f.get("tokenizer.ggml.tokens") or []
    return {"model_type": "llama", "hidden_size": D, "num_attention_heads": n_heads,
            "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv", n_heads)),
            "head_dim": int(f.get(f"{arch}.attention.key_length", D // n_heads)),
            "num_hidden_layers": int(f.need(f"{arch}.block_count")),
            "intermediate_size": int(f.need(f"{arch}.feed_forward_length")),
            "max_position_embeddings": int(f.get(f"{arch}.context_length", 2048)),
            "rms_norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10_000.0)),
            "vocab_size": int(f.get(f"{arch}.vocab_size", len(tokens))),
            "tie_word_embeddings": "output.weight" not in tensor_names}


def _hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return name  # left as it is: the import reports it as a tensor the model does not account for


def _unpermute(w, n_heads: int):
    """Rows of each head from llama.cpp's interleaved rotary pairs back to the two-halves layout."""
    rows = w.shape[0]
    H = rows // n_heads
    return w.reshape(n_heads, H // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(infos: list[TensorInfo], path: str, hf: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its Hugging Face name, on all cores (numpy releases the GIL)."""
    from gguf import GGMLQuantizationType

    for t in infos:
        kind = GGMLQuantizationType(t.type_id).name
        if kind not in TENSOR_TYPES:
            raise ConfigError(f"{path}: tensor {t.name} is {kind}, which this importer does not read (supported: "
                              f"{', '.join(TENSOR_TYPES)})")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(pool.map(lambda t: _read_tensor(t, path, hf), infos))


def _read_tensor(t: TensorInfo, path: str, hf: dict) -> tuple[str, np.ndarray]:
    from gguf import GGMLQuantizationType, quants

    try:
        w = np.asarray(quants.dequantize(t.data, GGMLQuantizationType(t.type_id)), np.float32)
    except Exception as e:  # a damaged block fails inside gguf's numpy code
        raise ConfigError(f"{path}: tensor {t.name} could not be dequantised ({first_line(e)[:120]})") from None
    w = w.reshape(t.shape)
    name = _hf_name(t.name)
    if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
        w = _unpermute(w, hf["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
        w = _unpermute(w, hf["num_key_value_heads"])
    return name, w


def read_tokenizer(f: _Fields) -> HFTokenizer:
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"{f.path}: unsupported GGUF tokenizer {kind!r} (supported: 'gpt2', byte-level BPE)")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{f.path}: unsupported GGUF pre-tokenizer {pre!r} (supported: "
                          f"{', '.join(PRE_TOKENIZERS)})")
    tokens = list(f.need("tokenizer.ggml.tokens"))
    types = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])

    def token(key):
        i = f.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if f.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    stop_ids = [int(f.get(k)) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                if f.get(k) is not None]
    return HFTokenizer(tok.to_str(), bos=bos, eos=eos, pad=token("tokenizer.ggml.padding_token_id"),
                       chat_template=f.get("tokenizer.chat_template"), stop_ids=stop_ids)


def llama3_rope_scaling(factors: np.ndarray, hf: dict, original_max_len: int, path: str) -> dict:
    """Llama 3's rotary scaling (Hugging Face's rope_scaling) recovered from the per-frequency divisors llama.cpp
    stores as rope_freqs.weight (Llama 3.1 / 3.2 files). Its converter computes them from rope_scaling: 1 for
    wavelengths under original_max_len / high_freq_factor, `factor` above original_max_len / low_freq_factor, and
    between them 1 / ((1 - s) / factor + s) with s = (original_max_len / wavelength - low) / (high - low). So
    `factor` is the largest divisor and s, recovered from each divisor in between, is a line in 1 / wavelength
    whose slope and intercept give low and high. The scaling found must give back every divisor."""
    from transformer.model.layers import rope_frequencies

    H = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    factors = np.asarray(factors, np.float64).reshape(-1)
    bad = ConfigError(f"{path}: rope_freqs.weight does not follow Llama 3's rotary scaling, the only per-frequency "
                      "scaling supported")
    if factors.shape != (H // 2,) or not np.all(np.isfinite(factors)) or np.any(factors < 1 - 1e-6):
        raise bad
    factor = float(factors.max())
    if factor < 1 + 1e-6:
        return {}
    inv_freq = 1.0 / float(hf["rope_theta"]) ** (np.arange(0, H, 2) / H)
    wavelen = 2 * np.pi / inv_freq
    between = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if between.sum() < 2:
        raise bad
    s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(original_max_len / wavelen[between], s, 1)
    low = -intercept / slope
    scaling = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": round(low, 5),
               "high_freq_factor": round(low + 1 / slope, 5), "original_max_position_embeddings": original_max_len}
    cfg = llama.model_config(dict(hf, rope_scaling=scaling))
    if not np.allclose(rope_frequencies(cfg) * factors, inv_freq, rtol=1e-4):
        raise bad
    return scaling


def open_gguf(path: str) -> Pretrained:
    """A GGUF file as (config, tokenizer, params read when first asked for)."""
    path = os.fspath(path)
    meta, infos = read_gguf(path)
    f = _Fields(meta, path)
    hf = hf_config(f, {t.name for t in infos})
    rope = [t for t in infos if t.name == "rope_freqs.weight"]
    if rope:  # not a weight: it becomes the config's rotary scaling
        infos = [t for t in infos if t is not rope[0]]
        arch = f.need("general.architecture")
        original = int(f.get(f"{arch}.rope.scaling.original_context_length", 8192))
        hf["rope_scaling"] = llama3_rope_scaling(_read_tensor(rope[0], path, hf)[1], hf, original, path) or None
    what = f"{path} (GGUF)"
    cfg = decoder_config(llama, hf, what)
    tok = read_tokenizer(f)
    return Pretrained(cfg, tok, "gguf:llama", lambda: import_decoder(llama, hf, read_tensors(infos, path, hf), what)[1])


def load_gguf(path: str) -> Pretrained:
    """`open_gguf` with the weights read now."""
    pre = open_gguf(path)
    pre.params  # noqa: B018
    return pre
