"""LoRA adapters (transformer/model/lora.py): the parameter count the formula gives, identity at initialisation,
merged weights equal base + adapters, and the bad configurations refused in one line."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import Config, ConfigError, ModelConfig
from transformer.model import build_model
from transformer.model.decoder import count_params
from transformer.model.lora import LoRAParam, lora_param_count, merged_params

GQA = ModelConfig(vocab_size=31, d_model=24, n_heads=6, n_kv_heads=2, n_layers=2, max_len=13, positions="rotary",
                  norm="rmsnorm", activation="swiglu", tie_embeddings=False, d_ff=40)
MHA = ModelConfig(vocab_size=29, d_model=16, n_heads=2, n_layers=3, max_len=11, use_bias=True)  # fused q/k/v, gelu
ENC = ModelConfig(arch="encoder", vocab_size=29, d_model=16, n_heads=2, n_layers=2, max_len=11, norm_position="post")
S2S = ModelConfig(arch="encoder_decoder", vocab_size=29, d_model=16, n_heads=2, n_layers=2, n_decoder_layers=1,
                  max_len=11, positions="sinusoidal")


def with_lora(cfg, rank=4, targets="q,k,v,o,gate,up,down"):
    if cfg.activation != "swiglu":
        targets = ",".join(t for t in targets.split(",") if t != "gate")
    return dataclasses.replace(cfg, lora_rank=rank, lora_targets=targets)


def tokens(cfg, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, cfg.max_len), 0, cfg.vocab_size)


def load(model, pure: dict) -> None:
    _, params = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)


def forward(model, x):
    return model(x, valid_BT=jnp.ones_like(x, bool)) if model.cfg.arch == "encoder" else model(x)


@pytest.mark.parametrize("cfg", [GQA, MHA, ENC, S2S], ids=["gqa_swiglu", "mha_fused_gelu", "encoder", "seq2seq"])
@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "q,v", "o,down"])
def test_adapter_parameter_count_is_rank_times_inputs_plus_outputs(cfg, targets):
    adapted = with_lora(cfg, 3, targets)
    model = build_model(adapted, nnx.Rngs(0))
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    D, F = cfg.d_model, cfg.ff_dim
    NH, KH = cfg.n_heads * cfg.d_head, cfg.kv_heads * cfg.d_head
    by_hand = {"q": D + NH, "k": D + KH, "v": D + KH, "o": NH + D, "gate": D + F, "up": D + F, "down": F + D}
    attention, mlp = (2 + 2 * 1, 2 + 1) if cfg.arch == "encoder_decoder" else (cfg.n_layers, cfg.n_layers)
    want = 3 * sum(by_hand[t] * (attention if t in "qkvo" else mlp) for t in adapted.lora_target_names)
    assert adapters == want == lora_param_count(adapted)
    assert count_params(model) == count_params(build_model(cfg, nnx.Rngs(0))) + want


@pytest.mark.parametrize("cfg", [GQA, MHA, ENC], ids=["gqa_swiglu", "mha_fused_gelu", "encoder"])
def test_an_adapted_model_starts_as_the_model_and_merges_into_it(cfg):
    adapted = build_model(with_lora(cfg), nnx.Rngs(0))
    base = build_model(cfg, nnx.Rngs(1))
    pure = nnx.to_pure_dict(nnx.state(adapted, nnx.Param))
    strip = lambda d: {k: strip(v) for k, v in d.items() if k != "lora"} if isinstance(d, dict) else d  # noqa: E731
    load(base, strip(pure))
    x = tokens(cfg)
    np.testing.assert_array_equal(forward(adapted, x), forward(base, x))  # B = 0: exactly the base model
    # trained adapters: B no longer zero; folding them in gives the same function
    state = nnx.state(adapted, LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(adapted, jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) * 0.1 for k, v in zip(keys, leaves)]))
    moved = forward(adapted, x)
    assert not np.allclose(moved, forward(base, x), atol=1e-3)
    merged = build_model(cfg, nnx.Rngs(2))
    load(merged, merged_params(adapted))
    np.testing.assert_allclose(forward(merged, x), moved, rtol=1e-4, atol=1e-4)
    assert nnx.state(adapted, LoRAParam)  # merging left the adapted model as it was


@pytest.mark.parametrize("change, message", [
    (dict(lora_targets="q,w"), "'w' is not a matrix LoRA adapts"),
    (dict(lora_targets="gate", activation="gelu"), "does not have"),
    (dict(lora_rank=25), "larger than the 'q' matrix"),
    (dict(lora_alpha=0.0), "lora_alpha > 0"),
])
def test_bad_lora_settings_are_config_errors(change, message):
    cfg = dataclasses.replace(GQA, lora_rank=4, lora_targets="q")
    with pytest.raises(ConfigError, match=message):
        Config(model=dataclasses.replace(cfg, **change)).validate()
