"""The files of a Hugging Face model directory, read and written: config.json, the weights (model.safetensors, or
shards listed by model.safetensors.index.json), the tokenizer (tokenizer.json, with tokenizer_config.json's special
tokens and chat template, or chat_template.jinja) and generation_config.json. Every failure is a one-line
ConfigError naming the file."""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", so bf16 safetensors load through the numpy API)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from transformer.config import ConfigError, first_line
from transformer.data.tokenizer import HFTokenizer

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
GENERATION_FILE = "generation_config.json"


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and (
        os.path.isfile(os.path.join(path, WEIGHTS_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE)))


def read_json(file: str, required: bool = True) -> dict:
    if not os.path.isfile(file):
        if required:
            raise ConfigError(f"{file} not found")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file} is unreadable ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{file} is not a JSON object")
    return obj


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ConfigError(f"Hugging Face model directory {path} not found")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ConfigError(f"{path} is not a Hugging Face model directory ({CONFIG_FILE} not found)")
    return read_json(os.path.join(path, CONFIG_FILE))


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(file, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header or an unknown dtype
        raise ConfigError(f"{file} is not a readable safetensors file ({type(e).__name__}: "
                          f"{first_line(e)[:200]})") from None


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the directory's weights, from model.safetensors or the shards its index names."""
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return _read_safetensors(single)
    index_file = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index_file):
        raise ConfigError(f"{path} has no weights: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index_file} has no weight_map")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise ConfigError(f"{index_file} names shard {shard}, which is not in {path}")
        tensors.update(_read_safetensors(file))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ConfigError(f"{index_file} lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]!r}")
    return tensors


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with its "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(path: str, generation: dict | None = None) -> HFTokenizer:
    """tokenizer.json with the special tokens and chat template of tokenizer_config.json (or chat_template.jinja).
    The tokens that end a reply: the eos token, and the generation config's eos_token_id(s)."""
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
        raise ConfigError(f"{path} has no {TOKENIZER_FILE}; only directories with a fast (tokenizers) tokenizer load")
    tc = read_json(os.path.join(path, TOKENIZER_CONFIG_FILE), required=False)
    template = tc.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(path, TEMPLATE_FILE)
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    with open(file, encoding="utf-8") as f:
        text = f.read()
    eos = generation.get("eos_token_id") if generation else None
    stop_ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    try:
        return HFTokenizer(text, bos=_token_text(tc.get("bos_token")), eos=_token_text(tc.get("eos_token")),
                           pad=_token_text(tc.get("pad_token")), chat_template=template, stop_ids=stop_ids)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def read_generation_config(path: str) -> dict:
    return read_json(os.path.join(path, GENERATION_FILE), required=False)


def write_hf_dir(out_dir: str, config: dict, tensors: dict[str, np.ndarray], tokenizer=None,
                 generation: dict | None = None) -> None:
    """config.json, model.safetensors and, for a Hugging Face tokenizer, tokenizer.json + tokenizer_config.json.
    Written into a fresh temporary directory renamed into place at the end, so a failed export leaves nothing
    half-written and an existing directory is never touched."""
    if os.path.exists(out_dir):
        raise ConfigError(f"{out_dir} already exists; export writes a new directory (remove it or pick another)")
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        _dump(os.path.join(tmp, CONFIG_FILE), config)
        if generation:
            _dump(os.path.join(tmp, GENERATION_FILE), generation)
        if isinstance(tokenizer, HFTokenizer):
            with open(os.path.join(tmp, TOKENIZER_FILE), "w", encoding="utf-8") as f:
                f.write(tokenizer.tokenizer_json)
            _dump(os.path.join(tmp, TOKENIZER_CONFIG_FILE), tokenizer.tokenizer_config())
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dump(file: str, obj: dict) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
