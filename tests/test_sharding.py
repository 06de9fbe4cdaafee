"""Sharding on 8 fake CPU devices: the same training on every mesh, weights split as the rules say, checkpoints
moving between meshes, sharded sampling, and a 2-process run."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import sharding
from transformer.checkpoint import Checkpointer, abstract_like
from transformer.cli import parse_args
from transformer.config import ConfigError, MeshConfig
from transformer.infer.loading import load_run
from transformer.infer.sampling import generate
from transformer.model import build_model
from transformer.train import METRICS_FILE, build_state, train
from transformer.train.step import make_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "".join(f"{i} little pigs went to market; {i * 7 % 13} came home.\n" for i in range(300))
MESHES = {"one device": (1, 1, 1), "data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "tensor=8": (1, 1, 8),
          "data=2 fsdp=2 tensor=2": (2, 2, 2)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def tiny_args(corpus, run_dir, steps, mesh=(8, 1, 1), *extra):
    d, f, t = mesh
    return ["--data.path", corpus, "--train.run_dir", str(run_dir), "--train.steps", str(steps),
            "--model.d_model=64", "--model.n_heads=8", "--model.n_layers=2", "--model.max_len=16",
            "--train.batch_size=8", "--train.log_interval=1", "--train.eval_interval=100", "--train.eval_batches=2",
            "--train.ckpt_interval=100", "--train.progress=false", "--optim.warmup_steps=2", "--model.dropout=0.1",
            "--train.sample_tokens=0", f"--mesh.data={d}", f"--mesh.fsdp={f}", f"--mesh.tensor={t}", *extra]


def mesh_for(sizes):
    return sharding.make_mesh(MeshConfig(*sizes), jax.devices()[:int(np.prod(sizes))])


def cfg_for(corpus, tmp_path):
    cfg, _ = parse_args(tiny_args(corpus, tmp_path, 5, (8, 1, 1), "--model.vocab_size=42", "--optim.lr=1e-2"))
    return cfg


def train_losses(cfg, sizes, steps=5):
    """Five jitted train steps on a mesh of `sizes`, from the same init and the same batches."""
    mesh = mesh_for(sizes)
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    state = create()
    train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    batch_A = sharding.batch_sharding(mesh, lead_axes=1)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = rng.integers(0, cfg.model.vocab_size, (1, 8, 16), dtype=np.int32)
        y = (x * 7 + 3) % cfg.model.vocab_size  # a learnable rule, so the loss moves
        state, metrics = train_step(state, {"inputs": jax.device_put(x, batch_A), "targets": jax.device_put(y, batch_A)})
        out.append(float(metrics["loss"]))
    return out, state


def test_same_losses_on_every_mesh(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    results = {name: train_losses(cfg, sizes)[0] for name, sizes in MESHES.items()}
    ref = results["one device"]
    assert ref[0] > ref[-1] + 0.1  # it trains
    for name, got in results.items():
        np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=name)


def test_a_scanned_rematerialised_stack_trains_alike_on_a_mesh(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    scanned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True, remat="full"))
    np.testing.assert_allclose(train_losses(scanned, (2, 2, 2))[0], train_losses(cfg, (1, 1, 1))[0], rtol=2e-5)


def test_bf16_matmuls_stay_bf16_and_agree_across_a_data_mesh(corpus, tmp_path):
    """matmul_dtype=bfloat16 on a data-parallel mesh: each device transposes its own block for the backward, so every
    weight matmul keeps bf16 operands (a transpose folded into the dot falls back to float32 on XLA:CPU), and the
    losses match one device."""
    cfg = dataclasses.replace(cfg_for(corpus, tmp_path), model=dataclasses.replace(
        cfg_for(corpus, tmp_path).model, matmul_dtype="bfloat16"))
    bf16_dots = {}
    for sizes in ((1, 1, 1), (2, 1, 1)):
        mesh = mesh_for(sizes)
        graphdef, tx, _, shardings, create = build_state(cfg, mesh)
        train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
        batch = {k: jax.device_put(np.zeros((1, 8, 16), np.int32), sharding.batch_sharding(mesh, lead_axes=1))
                 for k in ("inputs", "targets")}
        hlo = train_step.lower(create(), batch).compile().as_text()
        bf16_dots[sizes] = sum(_dot_operand_types(hlo, line) == ["bf16", "bf16"]
                               for line in hlo.splitlines() if " dot(" in line)
    # per layer: q/k/v, attention out, 2 MLP matmuls, 3 matmuls each (forward, dx, dW); then the tied output layer
    assert bf16_dots[(1, 1, 1)] == 3 * (4 * cfg.model.n_layers + 1)
    assert bf16_dots[(2, 1, 1)] == bf16_dots[(1, 1, 1)]
    np.testing.assert_allclose(train_losses(cfg, (2, 1, 1), steps=3)[0], train_losses(cfg, (1, 1, 1), steps=3)[0],
                               rtol=1e-4)


def _dot_operand_types(hlo: str, line: str) -> list[str]:
    """Element types of a compiled dot's operands (compiled HLO prints them by name only)."""
    names = re.findall(r"%[\w.\-]+", re.search(r" dot\(([^)]*)\)", line).group(1))
    return [re.search(rf"{re.escape(n)} = (\w+)\[", hlo).group(1) for n in names]


def test_param_shardings_follow_the_rules(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    _, state = train_losses(cfg, (2, 2, 2), steps=1)
    blk = state["params"]["blocks"][0]
    spec = lambda v: v[...].sharding.spec  # noqa: E731
    assert spec(blk["attn"]["w_qkv_DCNH"]) == P("fsdp", None, "tensor", None)
    assert spec(blk["attn"]["w_o_NHD"]) == P("tensor", None, "fsdp")
    assert spec(blk["mlp"]["w_in_DF"]) == P("fsdp", "tensor")
    assert spec(blk["mlp"]["w_out_FD"]) == P("tensor", "fsdp")
    assert spec(state["params"]["embed"]["table_VD"]) == P("tensor", "fsdp")  # vocab 42 divides by 2
    assert spec(blk["attn_norm"]["scale_D"]) == P("fsdp")
    # Adam moments are laid out like their weights, so FSDP shards the optimizer state too.
    mu = state["opt_state"][1][0].mu
    assert spec(mu["blocks"][0]["mlp"]["w_in_DF"]) == P("fsdp", "tensor")
    # Axes a mesh does not divide stay replicated instead of failing: 8 heads on tensor=8 split, vocab 42 does not.
    _, state8 = train_losses(cfg, (1, 1, 8), steps=1)
    assert spec(state8["params"]["blocks"][0]["attn"]["w_qkv_DCNH"]) == P("fsdp", None, "tensor", None)
    assert spec(state8["params"]["embed"]["table_VD"]) == P(None, "fsdp")


def test_fsdp_holds_an_eighth_of_the_state_per_device(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)

    def bytes_on_device0(sizes):
        mesh = mesh_for(sizes)
        _, _, _, _, create = build_state(cfg, mesh)
        state = create()
        dev = jax.devices()[0]
        return sum(s.data.nbytes for a in jax.tree.leaves(state) for s in a.addressable_shards if s.device == dev)

    dp, fsdp = bytes_on_device0((8, 1, 1)), bytes_on_device0((1, 8, 1))
    assert 0.12 < fsdp / dp < 0.16  # 1/8 of the sharded weights; norms of width 64 and scalars stay whole


def test_checkpoint_moves_between_meshes_and_training_continues(corpus, tmp_path):
    full, moved = tmp_path / "full", tmp_path / "moved"
    train(parse_args(tiny_args(corpus, full, 6))[0])
    train(parse_args(tiny_args(corpus, moved, 3, (8, 1, 1), "--optim.decay_steps=6"))[0])
    # The params restored onto another mesh are the saved values, laid out the new way.
    ckpt = Checkpointer(str(moved), read_only=True)
    saved = load_run(str(moved), mesh=mesh_for((8, 1, 1))).params
    one = load_run(str(moved), mesh=mesh_for((1, 1, 1))).params  # sample.py's single-device restore
    mesh = mesh_for((1, 4, 2))
    shardings = sharding.tree_shardings(saved, mesh)
    restored = ckpt.restore_params(3, abstract_like(saved, shardings))
    ckpt.close()
    for a, b, c in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), jax.tree.leaves(one)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert restored["blocks"][0]["mlp"]["w_in_DF"][...].sharding.spec == P("fsdp", "tensor")
    # Resuming on fsdp=4 x tensor=2 continues the data=8 run: steps 4-6 match the uninterrupted run.
    train(parse_args(tiny_args(corpus, moved, 6, (1, 4, 2)))[0])
    read = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / METRICS_FILE)) if "loss" in r}  # noqa
    ref, got = read(full), read(moved)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=2e-5)


def test_sharded_sampler_matches_single_device(corpus, tmp_path):
    run = tmp_path / "run"
    train(parse_args(tiny_args(corpus, run, 4))[0])
    prompts = [[3, 5, 7], [9], [4, 4, 4, 4, 4], [11, 2]]
    outs = {}
    for sizes in ((1, 1, 1), (4, 1, 2), (1, 1, 8)):
        loaded = load_run(str(run), mesh=mesh_for(sizes))
        outs[sizes] = generate(loaded.graphdef, loaded.params, prompts, max_new_tokens=12,
                               max_len=loaded.cfg.model.max_len).tokens
    assert outs[(4, 1, 2)] == outs[(1, 1, 1)] == outs[(1, 1, 8)]
    assert any(len(set(row)) > 1 for row in outs[(1, 1, 1)])


def test_grouped_query_model_trains_and_samples_sharded(corpus, tmp_path):
    """8 query heads over 2 key/value heads: the kv projection splits its heads over tensor like the query heads,
    the losses of a 2x2x2 mesh are one device's, and sampling on it gives the one-device tokens."""
    gqa = ("--model.n_kv_heads=2", "--model.positions=rotary", "--model.qkv_bias=true")
    cfg, _ = parse_args(tiny_args(corpus, tmp_path, 5, (8, 1, 1), "--model.vocab_size=42", "--optim.lr=1e-2", *gqa))
    ref, _ = train_losses(cfg, (1, 1, 1), steps=3)
    got, state = train_losses(cfg, (2, 2, 2), steps=3)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    attn = state["params"]["blocks"][0]["attn"]
    assert attn["w_kv_DCKH"][...].shape == (64, 2, 2, 8)
    assert attn["w_kv_DCKH"][...].sharding.spec == P("fsdp", None, "tensor", None)
    assert attn["w_q_DNH"][...].sharding.spec == P("fsdp", "tensor", None)
    assert attn["b_kv_CKH"][...].sharding.spec == P(None, "tensor", None)
    graphdef = nnx.graphdef(build_model(cfg.model, nnx.Rngs(0)))
    prompts = [[3, 5, 7], [9], [4, 4, 4, 4, 4], [11, 2]]
    sharded = state["params"]  # on the 2x2x2 mesh
    whole = jax.device_put(sharded, jax.devices()[0])
    outs = {sizes: generate(graphdef, params, prompts, max_new_tokens=8, max_len=cfg.model.max_len).tokens
            for sizes, params in (((1, 1, 1), whole), ((2, 2, 2), sharded))}
    assert outs[(2, 2, 2)] == outs[(1, 1, 1)]


def test_decoding_moves_replicated_weights_onto_one_cpu_device():
    """The devices of a split CPU host share its cores: replicated weights are decoded with on one of them; weights
    sharded by fsdp stay where they are."""
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    replicated = jax.device_put({"w": x}, NamedSharding(mesh_for((2, 1, 1)), P()))
    moved = sharding.one_cpu_device(replicated)
    assert moved["w"].sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(moved["w"], x)
    split = jax.device_put({"w": x}, NamedSharding(mesh_for((1, 2, 1)), P("fsdp")))
    assert len(sharding.one_cpu_device(split)["w"].sharding.device_set) == 2


def test_mesh_errors_are_config_errors():
    with pytest.raises(ConfigError, match="needs 12 devices but 8"):
        sharding.make_mesh(MeshConfig(4, 3, 1))
    assert sharding.make_mesh(MeshConfig(2, 3, 1)).devices.size == 6  # fewer than the host has: the first six
    with pytest.raises(ConfigError, match="only one of"):
        sharding.make_mesh(MeshConfig(-1, -1, 1))
    with pytest.raises(ConfigError, match="cannot be split"):
        sharding.make_mesh(MeshConfig(-1, 3, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(corpus, tmp_path):
    """2 processes x 4 CPU devices on localhost (jax.distributed, gloo) train like 1 process with 8 devices."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    mesh = (2, 2, 2)
    train(parse_args(tiny_args(corpus, single, 4, mesh, "--train.eval_interval=2"))[0])
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
               "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "train.py"), *tiny_args(corpus, multi, 4, mesh,
                                                                       "--train.eval_interval=2")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "8 cpu device(s)" in outs[0] and "step 4" in outs[0]
    assert "step" not in outs[1]  # logging happens once
    read = lambda d: [json.loads(l) for l in open(d / METRICS_FILE)]  # noqa: E731,E741
    ref, got = read(single), read(multi)
    for key in ("loss", "val_loss"):
        a = [r[key] for r in ref if key in r]
        b = [r[key] for r in got if key in r]
        assert len(a) == len(b) > 1
        np.testing.assert_allclose(b, a, rtol=2e-5, err_msg=key)
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
