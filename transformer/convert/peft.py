"""LoRA adapters in the PEFT format (`adapter_config.json` + `adapter_model.safetensors`), the form `peft` loads onto
a Hugging Face model: for decoders that export as the Llama family (llama / mistral / qwen2 module names).

PEFT keeps A as lora_A.weight (r x inputs) and B as lora_B.weight (outputs x r) of each adapted nn.Linear, named
`base_model.model.model.layers.{i}.self_attn.q_proj` ..., and scales by lora_alpha / r as we do.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from transformer.config import ConfigError, ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MODULES = {"q": ("attn", "self_attn.q_proj"), "k": ("attn", "self_attn.k_proj"), "v": ("attn", "self_attn.v_proj"),
           "o": ("attn", "self_attn.o_proj"), "gate": ("mlp", "mlp.gate_proj"), "up": ("mlp", "mlp.up_proj"),
           "down": ("mlp", "mlp.down_proj")}
PREFIX = "base_model.model.model.layers"


def _check(cfg: ModelConfig) -> None:
    if cfg.arch != "decoder" or cfg.lora_rank == 0:
        raise ConfigError("only a decoder run trained with LoRA (model.lora_rank > 0) has adapters to export")
    if cfg.activation != "swiglu" or cfg.norm != "rmsnorm" or cfg.positions != "rotary":
        raise ConfigError("PEFT adapters are written for Llama-family decoders (SwiGLU, RMSNorm, rotary); merge this "
                          "run instead (python -m transformer.export without --peft)")


def export_peft(cfg: ModelConfig, params: dict, out_dir: str, base: str = "") -> int:
    """Write the adapters of a LoRA run's params (a pure dict) to out_dir (which must not exist): returns how many
    adapted matrices were written. Nothing is left behind on failure."""
    _check(cfg)
    if os.path.exists(out_dir):
        raise ConfigError(f"{out_dir} exists; give a new directory")
    from safetensors.numpy import save_file

    tensors = {}
    for i in range(cfg.n_layers):
        for name in cfg.lora_target_names:
            part, module = MODULES[name]
            adapter = params["blocks"][i][part]["lora"][name]
            a_IR, b_RO = np.asarray(adapter["a_IR"], np.float32), np.asarray(adapter["b_RO"], np.float32)
            r = a_IR.shape[1]
            tensors[f"{PREFIX}.{i}.{module}.lora_A.weight"] = np.ascontiguousarray(a_IR.T)
            tensors[f"{PREFIX}.{i}.{module}.lora_B.weight"] = np.ascontiguousarray(b_RO.reshape(r, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": sorted(MODULES[n][1].split(".")[1] for n in cfg.lora_target_names),
              "base_model_name_or_path": base}
    tmp = tempfile.mkdtemp(prefix=".peft-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(tensors) // 2


def import_peft(cfg: ModelConfig, path: str) -> tuple[ModelConfig, dict]:
    """PEFT adapters for a model of config `cfg` (without LoRA): the config with LoRA set as the adapters say, and
    the adapters as {"blocks": {i: {"attn" | "mlp": {"lora": {name: {"a_IR", "b_RO"}}}}}}, to lay over the model's
    params. Adapters for matrices the model lacks, or of the wrong shape, are refused."""
    import dataclasses

    from safetensors.numpy import load_file

    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a PEFT adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE}): {e}") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    by_module = {module.split(".")[1]: name for name, (_, module) in MODULES.items()}
    targets = [by_module.get(m) for m in config.get("target_modules", [])]
    if None in targets:
        raise ConfigError(f"{path}: target_modules {config.get('target_modules')} name a module these models lack "
                          f"(known: {', '.join(by_module)})")
    cfg = dataclasses.replace(cfg, lora_rank=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                              lora_targets=",".join(n for n in MODULES if n in targets),
                              lora_dropout=float(config.get("lora_dropout") or 0.0))
    _check(cfg)
    shapes = cfg.lora_shapes()
    out, r = {"blocks": {}}, cfg.lora_rank
    out_dims = {"q": (cfg.n_heads, cfg.d_head), "k": (cfg.kv_heads, cfg.d_head), "v": (cfg.kv_heads, cfg.d_head)}
    for i in range(cfg.n_layers):
        for name in cfg.lora_target_names:
            part, module = MODULES[name]
            key = f"{PREFIX}.{i}.{module}"
            try:
                a, b = tensors.pop(f"{key}.lora_A.weight"), tensors.pop(f"{key}.lora_B.weight")
            except KeyError:
                raise ConfigError(f"{path}: no adapter for layer {i}'s {module}") from None
            d_in, d_out = shapes[name]
            if a.shape != (r, d_in) or b.shape != (d_out, r):
                raise ConfigError(f"{path}: layer {i}'s {module} adapter is {a.shape} / {b.shape}, this model needs "
                                  f"{(r, d_in)} / {(d_out, r)}")
            b_RO = np.ascontiguousarray(b.T).reshape(r, *out_dims.get(name, (d_out,)))
            layer = out["blocks"].setdefault(i, {}).setdefault(part, {"lora": {}})
            layer["lora"][name] = {"a_IR": np.ascontiguousarray(a.T), "b_RO": b_RO}
    if tensors:
        raise ConfigError(f"{path}: {len(tensors)} tensor(s) this model has no place for, e.g. {next(iter(tensors))}")
    return cfg, out
