"""model.param_dtype=bfloat16: bf16 weights, a float32 master copy in the train state, AdamW's moments."""
import jax
import jax.numpy as jnp
import numpy as np

from transformer import sharding
from transformer.cli import parse_args
from transformer.config import MeshConfig
from transformer.train import build_state, train
from transformer.train.step import make_steps

TEXT = "".join(f"{i} little pigs went to market; {i * 7 % 13} came home.\n" for i in range(400))


def _steps(param_dtype: str, lr: float, n: int):
    """(initial state, state after n steps, the n losses) of a tiny decoder on fixed random tokens."""
    cfg, _ = parse_args(["--model.vocab_size=64", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2",
                         "--model.max_len=16", "--train.batch_size=4", "--model.matmul_dtype=float32",
                         f"--model.param_dtype={param_dtype}", f"--optim.lr={lr}", "--optim.warmup_steps=1",
                         "--optim.weight_decay=0", "--optim.grad_clip=0"])
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    x = jax.random.randint(jax.random.key(1), (1, 4, 16), 0, 64)
    batch = {"inputs": x, "targets": jnp.roll(x, -1, -1)}
    first = jax.tree.map(np.asarray, create())
    state, losses = create(), []
    for _ in range(n):
        state, out = step(state, batch)
        losses.append(float(out["loss"]))
    return first, jax.tree.map(np.asarray, state), losses


def test_bf16_weights_keep_a_float32_master_that_holds_updates_too_small_for_bf16():
    first, state, _ = _steps("bfloat16", lr=1e-7, n=2)  # the first step's learning rate is 0 (warm-up)
    params, master = jax.tree.leaves(state["params"]), jax.tree.leaves(state["master"])
    assert {p.dtype for p in params} == {np.dtype(jnp.bfloat16)} and {m.dtype for m in master} == {np.dtype(np.float32)}
    moments = state["opt_state"][1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    assert {m.dtype for m in jax.tree.leaves(moments.mu)} == {np.dtype(jnp.bfloat16)}
    assert {m.dtype for m in jax.tree.leaves(moments.nu)} == {np.dtype(np.float32)}
    for p, m in zip(params, master):
        np.testing.assert_array_equal(p, m.astype(jnp.bfloat16))  # the weights are the master, rounded
    # ~1e-7 per weight of ~0.02: far under half a bf16 step (0.4%): the bf16 weights round back to what they were,
    # the master keeps the update
    before_p, before_m = jax.tree.leaves(first["params"]), jax.tree.leaves(first["master"])
    moved_m = np.mean(np.concatenate([(a != b).ravel() for a, b in zip(master, before_m)]))
    moved_p = np.mean(np.concatenate([(a != b).ravel() for a, b in zip(params, before_p)]))
    assert moved_m > 0.9 and moved_p < 0.05, (moved_m, moved_p)


def test_bf16_weights_train_like_float32_ones():
    _, _, f32 = _steps("float32", lr=1e-2, n=12)
    _, _, bf16 = _steps("bfloat16", lr=1e-2, n=12)
    assert f32[-1] < f32[0] - 1.0  # it learns (the same 4 rows over and over)
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


def test_a_bf16_run_resumes_exactly_and_loads_in_bf16(tmp_path):
    from transformer.infer.loading import load_run
    from transformer.infer.sampling import generate
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def args(run_dir, steps, *extra):
        return parse_args(["--data.path", str(corpus), "--train.run_dir", str(run_dir), "--train.steps", str(steps),
                           "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2", "--model.max_len=16",
                           "--train.batch_size=8", "--train.eval_interval=3", "--train.eval_batches=1",
                           "--train.progress=false", "--train.sample_tokens=0", "--model.param_dtype=bfloat16",
                           "--mesh.data=1", *extra])[0]
    full = train(args(tmp_path / "full", 6))
    train(args(tmp_path / "half", 3, "--optim.decay_steps=6"))
    resumed = train(args(tmp_path / "half", 6), resume=True)
    assert resumed["loss"] == full["loss"] and resumed["val_loss"] == full["val_loss"]
    run = load_run(str(tmp_path / "half"))
    assert {p.dtype for p in jax.tree.leaves(run.params)} == {np.dtype(jnp.bfloat16)}  # inference holds half the bytes
    out = generate(run.graphdef, run.params, [run.tokenizer.encode("3 little").tolist()], max_new_tokens=5,
                   max_len=16, key=jax.random.key(0))
    assert len(out.tokens[0]) == 5
