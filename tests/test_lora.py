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


@pytest.mark.parametrize("cfg", [GQA, S2S], ids=["gqa_swiglu", "seq2seq"])
def test_lora_dropout_drops_the_adapters_inputs_in_training_only(cfg):
    """With lora_dropout, a dropout key (training) changes the adapted model's output, differently per key; without
    a key (evaluation, sampling) it is the model; the base path never sees the dropout (model.dropout = 0)."""
    adapted = build_model(dataclasses.replace(with_lora(cfg), lora_dropout=0.5), nnx.Rngs(0))
    leaves, tree = jax.tree.flatten(nnx.state(adapted, LoRAParam))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(adapted, jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) * 0.1 for k, v in zip(keys, leaves)]))
    plain = build_model(with_lora(cfg), nnx.Rngs(0))  # the same weights, lora_dropout 0
    load(plain, nnx.to_pure_dict(nnx.state(adapted, nnx.Param)))
    x = tokens(cfg)
    valid = jnp.ones_like(x, bool)
    run = lambda m, key: (m(x, x, src_valid_BS=valid, dropout_key=key) if cfg.arch == "encoder_decoder"  # noqa: E731
                          else m(x, dropout_key=key))
    np.testing.assert_array_equal(run(adapted, None), run(plain, None))
    np.testing.assert_array_equal(run(plain, jax.random.key(1)), run(plain, None))  # no dropout anywhere else
    one, two = run(adapted, jax.random.key(1)), run(adapted, jax.random.key(2))
    assert not np.allclose(one, run(adapted, None), atol=1e-3) and not np.allclose(one, two, atol=1e-3)
    zero = build_model(dataclasses.replace(with_lora(cfg), lora_dropout=0.5), nnx.Rngs(0))  # fresh: B = 0
    np.testing.assert_allclose(run(zero, jax.random.key(1)), run(zero, None), rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("matmul_dtype, scan", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_a_step_trains_the_adapters_only_and_the_optimizer_holds_only_them(matmul_dtype, scan):
    from transformer import sharding
    from transformer.config import MeshConfig, OptimConfig
    from transformer.train import build_state
    from transformer.train.step import make_steps

    model_cfg = dataclasses.replace(with_lora(GQA), matmul_dtype=matmul_dtype, scan_layers=scan)
    cfg = Config(model=model_cfg, optim=OptimConfig(warmup_steps=1, lr=1e-2), preset="tiny").validate()
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    state = create()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
    x = np.asarray(tokens(GQA))
    batch = {"inputs": jnp.asarray(x[None]), "targets": jnp.asarray(np.roll(x, -1, 1)[None])}
    for _ in range(3):  # the first step's learning rate is 0 (warmup); B moves first, then A
        state, metrics = train_step(state, batch)
    after = nnx.to_pure_dict(state["params"])
    changed = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), b in
               zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))}
    assert any(changed.values()) and np.isfinite(float(metrics["loss"]))
    for path, moved in changed.items():
        assert moved == ("'lora'" in path), path  # every adapter trains; no base weight moves
    # with bf16 matmul inputs the frozen base's matrices are stored in bf16 (never converted again); adapters, norm
    # scales and biases stay float32
    for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
        name = jax.tree_util.keystr(path)
        frozen_matrix = "'lora'" not in name and leaf.ndim - ("'layers'" in name) >= 2  # stacked: one axis more
        assert leaf.dtype == (jnp.bfloat16 if frozen_matrix and matmul_dtype == "bfloat16" else jnp.float32), path
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(build_model(with_lora(GQA), nnx.Rngs(0)), LoRAParam)))
    moments = [x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(moments) == 2 * adapters  # Adam's two moments, of the adapters alone


def test_lora_chat_fine_tuning_end_to_end(tmp_path):
    """train.py --train.task=sft --model.lora_rank on a tiny Llama directory, then sample.py --chat on the run (the
    adapters applied unmerged); a target the model lacks is refused in one line."""
    import json
    import os

    from inproc import run
    from test_decoders import write_tiny

    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "tiny_decoders_reference.npz"))
    model = write_tiny(tmp_path / "llama", ref, "llama")
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the cat"},
                                                     {"role": "assistant", "content": "sat on the mat"}]}) + "\n"
                            for _ in range(20)))

    common = ["--train.task=sft", "--train.init_from", model, "--data.path", str(data), "--train.batch_size=4",
              "--optim.lr=1e-2", "--optim.warmup_steps=2", "--train.progress=false"]
    out = run("train.py", *common, "--train.run_dir", str(tmp_path / "run"), "--train.steps=60",
              "--train.eval_interval=60", "--model.lora_rank=8")
    assert out.returncode == 0, out.stderr
    chat = run("sample.py", "--checkpoint", str(tmp_path / "run"), "--chat", "--greedy", "--max-new-tokens", "8",
               stdin="the cat\n")
    assert chat.returncode == 0 and chat.stdout.strip().startswith("sat on the mat"), chat.stdout + chat.stderr
    # the checkpoint holds the adapters without the frozen base, which loads from train.init_from again
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    saved = size(tmp_path / "run" / "checkpoints" / "60" / "params")
    more = run("train.py", *common, "--train.run_dir", str(tmp_path / "run"), "--train.steps=62",
               "--train.eval_interval=60", "--model.lora_rank=8", "--resume")
    assert more.returncode == 0 and "resuming at step 60" in more.stdout, more.stdout + more.stderr
    os.rename(tmp_path / "llama", tmp_path / "moved")
    lost = run("sample.py", "--checkpoint", str(tmp_path / "run"), "--chat", stdin="the cat\n")
    assert lost.returncode == 2 and "LoRA adapters over the base model" in lost.stderr, lost.stderr
    assert len(lost.stderr.strip().splitlines()) == 1
    os.rename(tmp_path / "moved", tmp_path / "llama")
    exported = run("-m", "transformer.export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from transformer.infer.loading import load_run
    adapted, merged = load_run(str(tmp_path / "run")), load_run(str(tmp_path / "hf"))  # adapters folded in
    assert adapted.cfg.model.lora_rank == 8 and merged.cfg.model.lora_rank == 0
    from transformer.model.lora import lora_param_count
    adapter_bytes = 4 * lora_param_count(adapted.cfg.model)
    base_bytes = 4 * sum(x.size for x in jax.tree.leaves(adapted.params)) - adapter_bytes
    assert saved < adapter_bytes + base_bytes / 2, (saved, adapter_bytes, base_bytes)  # (and orbax's metadata)
    x = jnp.asarray([[1, 5, 9, 33, 70, 2]])
    from transformer.model import abstract_model
    f32 = nnx.graphdef(abstract_model(dataclasses.replace(adapted.cfg.model, matmul_dtype="float32")))
    np.testing.assert_allclose(nnx.merge(merged.graphdef, merged.params)(x),  # both multiplying in float32
                               nnx.merge(f32, adapted.params)(x), rtol=1e-4, atol=1e-5)
    peft = run("-m", "transformer.export", str(tmp_path / "run"), str(tmp_path / "peft"), "--peft")
    assert peft.returncode == 0 and "PEFT LoRA adapters of 14 matrices (rank 8)" in peft.stdout, peft.stderr
    again = run("-m", "transformer.export", str(tmp_path / "run"), str(tmp_path / "peft"), "--peft")
    assert again.returncode == 2 and "exists" in again.stderr  # the first export is left as it was
    bad = run("train.py", *common, "--train.run_dir", str(tmp_path / "bad"), "--model.lora_rank=8",
              "--model.lora_targets=q,w")
    assert bad.returncode == 2 and "'w' is not a matrix LoRA adapts" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    saved = tmp_path / "bad" / "checkpoints"
    assert not saved.exists() or not any(p.name.isdigit() for p in saved.iterdir())


def test_adapters_round_trip_through_the_peft_format(tmp_path):
    """Adapters written as PEFT files (adapter_config.json + adapter_model.safetensors) read back identically, and the
    base model plus the read adapters is the adapted model. (That `peft` itself loads them onto transformers with
    the same logits was checked with peft 0.x in the torch venv: see the issue note.)"""
    import json

    from transformer.checkpoint import overlay
    from transformer.convert.peft import export_peft, import_peft

    cfg = with_lora(GQA, 4, "q,v,o,down")
    adapted = build_model(cfg, nnx.Rngs(0))
    leaves, tree = jax.tree.flatten(nnx.state(adapted, LoRAParam))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    nnx.update(adapted, jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) * 0.1 for k, v in zip(keys, leaves)]))
    adapters = nnx.to_pure_dict(nnx.state(adapted, LoRAParam))
    assert export_peft(cfg, adapters, str(tmp_path / "peft")) == 4 * GQA.n_layers
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    back_cfg, back = import_peft(GQA, str(tmp_path / "peft"))
    assert (back_cfg.lora_rank, back_cfg.lora_alpha, set(back_cfg.lora_target_names)) == (4, cfg.lora_alpha,
                                                                                          {"q", "v", "o", "down"})
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(adapters)[0], jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    rebuilt = build_model(back_cfg, nnx.Rngs(9))
    pure = nnx.to_pure_dict(nnx.state(adapted, nnx.Param))
    overlay(pure, back)
    load(rebuilt, pure)
    x = tokens(GQA)
    np.testing.assert_array_equal(forward(rebuilt, x), forward(adapted, x))
    with pytest.raises(ConfigError, match="exists"):
        export_peft(cfg, adapters, str(tmp_path / "peft"))
    config["target_modules"] = ["q_proj", "c_attn"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="c_attn"):
        import_peft(GQA, str(tmp_path / "peft"))

