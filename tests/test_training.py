import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import sharding
from transformer.cli import parse_args
from transformer.config import Config, MeshConfig, ModelConfig, OptimConfig
from transformer.model import DecoderLM
from transformer.tasks.losses import cross_entropy
from transformer.train import METRICS_FILE, TrainingDiverged, build_state, train
from transformer.train.evaluation import evaluate
from transformer.train.optim import lr_schedule, make_optimizer
from transformer.train.step import make_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "".join(f"{i} little pigs went to market; {i * 7 % 13} came home.\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def tiny_args(corpus, run_dir, steps, *extra):
    return ["--data.path", corpus, "--train.run_dir", str(run_dir), "--train.steps", str(steps),
            "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2", "--model.max_len=16",
            "--train.batch_size=8", "--train.log_interval=1", "--train.eval_interval=3", "--train.eval_batches=2",
            "--train.ckpt_interval=100", "--train.progress=false", "--optim.warmup_steps=2", "--model.dropout=0.1",
            "--mesh.data=1", *extra]  # one of the 8 test devices: sharding has its own tests


def losses(run_dir):
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, {r["step"]: r["val_loss"] for r in records
                                                                      if "val_loss" in r}


@pytest.fixture(scope="module")
def resumed_pair(tmp_path_factory):
    """An 8-step run, and the same run stopped after 4 steps and resumed to 8 (as a new process would), both keeping
    a moving average of the weights."""
    tmp = tmp_path_factory.mktemp("resume")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    ema = "--optim.ema_decay=0.9"
    full, half = tmp / "full", tmp / "half"
    train(parse_args(tiny_args(str(corpus), full, 8, ema))[0])
    train(parse_args(tiny_args(str(corpus), half, 4, ema, "--optim.decay_steps=8"))[0])
    out = train(parse_args(tiny_args(str(corpus), half, 8, ema))[0], resume=True)
    return full, half, out


def test_resumed_run_equals_uninterrupted_run(resumed_pair):
    full, half, out = resumed_pair
    (full_loss, full_val), (half_loss, half_val) = losses(full), losses(half)
    assert sorted(full_loss) == sorted(half_loss) == list(range(1, 9))
    assert [full_loss[s] for s in range(1, 9)] == [half_loss[s] for s in range(1, 9)]  # exact on CPU
    assert full_val[6] == half_val[6] and full_val[8] == half_val[8] == out["val_loss"]
    assert full_loss[1] != full_loss[8]


def test_weight_average_resumes_exactly_and_is_what_eval_and_loading_use(resumed_pair):
    from transformer.checkpoint import Checkpointer, abstract_like
    from transformer.infer.loading import load_run
    from transformer.train.optim import update_ema
    full, half, _ = resumed_pair
    (full_loss, full_val), (half_loss, half_val) = losses(full), losses(half)
    assert full_loss == half_loss and full_val == {s: half_val[s] for s in full_val}  # exactly (val: the average's)
    run = load_run(str(full))
    ckpt = Checkpointer(str(full), read_only=True)
    shardings = jax.tree.map(lambda a: a.sharding, run.params)
    raw = ckpt.restore_params(8, abstract_like(run.params, shardings), "params")
    average = ckpt.restore_params(8, abstract_like(run.params, shardings), "ema")
    ckpt.close()
    leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]  # noqa: E731
    for a, b in zip(leaves(run.params), leaves(average)):
        np.testing.assert_array_equal(a, b)  # inference loads the average ...
    assert any(not np.allclose(a, b) for a, b in zip(leaves(raw), leaves(average)))  # ... not the last weights
    # the val loss logged at step 8 is the average's
    from transformer.data.blocks import eval_batches
    val = eval_batches(np.load(full / "tokens" / "val.npy"), 16, 8, 2)
    forward = jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x))
    val_loss = lambda p: np.mean([cross_entropy(forward(p, x), y) for x, y in val])  # noqa: E731
    logged = losses(full)[1][8]
    np.testing.assert_allclose(val_loss(average), logged, rtol=1e-5)
    assert abs(val_loss(raw) - logged) > 1e-4
    # the update rule: d = min(decay, (1 + step) / (10 + step))
    e, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(update_ema(e, p, 0, 0.9)["w"], 0.9)  # d = 0.1 at step 0
    np.testing.assert_allclose(update_ema(e, p, 1000, 0.9)["w"], 0.1, rtol=1e-6)  # d = 0.9 later


def test_resume_without_checkpoint_is_an_error(corpus, tmp_path):
    from transformer.config import ConfigError
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(parse_args(tiny_args(corpus, tmp_path / "none", 2))[0], resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "nan"
    train(parse_args(tiny_args(corpus, run, 3, "--train.ckpt_interval=3"))[0])
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) by step (\d+).*checkpoint \(step (\d+)\) is"
                       ) as err:
        train(parse_args(tiny_args(corpus, run, 12, "--optim.lr=1e30", "--optim.grad_clip=0",
                                   "--train.ckpt_interval=2", "--train.log_interval=100"))[0])
    bad, good = map(int, re.search(r"step (\d+).*step (\d+)", str(err.value)).groups())
    assert good < bad <= 12
    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    assert steps[0] == 3 and steps[-1] == good  # nothing written after the divergence, the old run kept


def test_gradient_accumulation_matches_one_big_batch():
    cfg = dataclasses.replace(parse_args([])[0].model, vocab_size=17, d_model=16, n_heads=2, n_layers=1, max_len=8)
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    x = jax.random.randint(jax.random.key(0), (4, 8), 0, 17)
    y = jnp.roll(x, -1, 1)
    loss = lambda p, x, y: cross_entropy(nnx.merge(graphdef, p)(x), y)
    grad = jax.jit(jax.grad(loss))
    g_full = grad(params, x, y)
    g_half = jax.tree.map(lambda a, b: (a + b) / 2, grad(params, x[:2], y[:2]), grad(params, x[2:], y[2:]))
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_half)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_train_with_grad_accum_runs_and_learns(corpus, tmp_path):
    out = train(parse_args(tiny_args(corpus, tmp_path / "acc", 20, "--train.grad_accum=2", "--model.dropout=0",
                                     "--optim.lr=1e-2"))[0])
    first, _ = losses(tmp_path / "acc")
    assert out["loss"] < first[1] - 0.5


def test_schedules():
    cos = lr_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine"), 2000)
    assert float(cos(0)) == 0.0
    np.testing.assert_allclose(float(cos(100)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(cos(2000)), 1e-4, rtol=1e-5)
    assert 1e-4 < float(cos(1000)) < 1e-3
    inv = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=100, schedule="inverse_sqrt"), 2000)
    np.testing.assert_allclose(float(inv(99)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(inv(399)), 5e-4, rtol=1e-6)  # 1/sqrt decay: 4x the steps, half the lr
    const = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=10, schedule="constant"), 2000)
    assert float(const(5)) < 1e-3 and float(const(1500)) == pytest.approx(1e-3)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    run = tmp_path / "preempt"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *tiny_args(corpus, run, 100000)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = run / METRICS_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved a checkpoint" in out and "Traceback" not in out
    steps = [int(s) for s in os.listdir(run / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 5


def seq2seq_steps(**optim):
    """A tiny encoder-decoder's (graphdef, create_state, train_step, eval_step, mesh) on one device."""
    model = ModelConfig(arch="encoder_decoder", vocab_size=29, d_model=16, n_heads=2, n_layers=1, max_len=24,
                        positions="sinusoidal")
    cfg = Config(model=model, optim=OptimConfig(warmup_steps=1, **optim), preset="tiny").validate()
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    return (graphdef, create, *make_steps(graphdef, tx, cfg, mesh, shardings), mesh)


def test_gradient_accumulation_weights_micro_batches_by_their_tokens():
    """16 target tokens in one row, 2 in the other: split into two micro-batches, the step must equal the one-batch
    step (a mean of micro-batch means would count the 2 tokens as much as the 16)."""
    _, create, train_step, _, _ = seq2seq_steps(label_smoothing=0.1)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(3, 29, (2, 24)).astype(np.int32) for k in ("inputs", "decoder_inputs", "targets")}
    batch["valid"] = np.zeros((2, 24), bool)
    batch["valid"][0, :20] = batch["valid"][1, :5] = True
    batch["weights"] = np.zeros((2, 24), np.float32)
    batch["weights"][0, :16] = batch["weights"][1, :2] = 1.0
    one, m_one = train_step(create(), {k: jnp.asarray(a[None]) for k, a in batch.items()})  # A=1, B=2
    two, m_two = train_step(create(), {k: jnp.asarray(a[:, None]) for k, a in batch.items()})  # A=2, B=1
    np.testing.assert_allclose(m_two["loss"], m_one["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_two["grad_norm"], m_one["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert int(m_one["tokens"]) == int(m_two["tokens"]) == 20 + 5 + 16 + 2  # real source + target tokens


def test_evaluation_is_a_per_token_mean_over_the_whole_validation_set():
    """11 pairs of assorted lengths in length-sorted batches of 4: the validation loss is the sum over every target
    token divided by their count, not a mean of batch means (nor of the first batches only)."""
    from transformer.tasks.seq2seq import Seq2SeqPipeline
    graphdef, create, _, eval_step, mesh = seq2seq_steps()
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(3, 29, n).tolist(), rng.integers(3, 29, m).tolist())
             for n, m in zip((1, 3, 20, 7, 2, 9, 15, 4, 11, 6, 18), (2, 1, 19, 5, 8, 3, 12, 22, 6, 9, 14))]
    pipe = Seq2SeqPipeline(pairs, pairs, T=24, batch_rows=4, eval_rows=4, n_eval=1, seed=0, encode=lambda s: s,
                           bos=1, eos=2, pad=0)
    params = create()["params"]
    val = evaluate(eval_step, params, pipe.val, sharding.batch_sharding(mesh))

    @jax.jit
    def loss_sum(src, valid, dec_in, tgt, weights):  # one pair, padded to 24 (padding is masked: test_seq2seq)
        logits = nnx.merge(graphdef, params)(src, dec_in, src_valid_BS=valid)
        return cross_entropy(logits, tgt, weights) * weights.sum()

    total = count = 0.0
    for src, tgt in pairs:  # each pair alone
        row = lambda ids: jnp.asarray([ids + [0] * (24 - len(ids))])  # noqa: E731
        weights = row([1] * (len(tgt) + 1)).astype(jnp.float32)
        total += float(loss_sum(row(src), row([1] * len(src)) > 0, row([1] + tgt), row(tgt + [2]), weights))
        count += len(tgt) + 1
    np.testing.assert_allclose(val["loss"], total / count, rtol=1e-5)


@pytest.mark.parametrize("model_cfg", [
    ModelConfig(arch="encoder_decoder", vocab_size=11, d_model=8, n_heads=2, n_layers=1, use_bias=True, max_len=8),
    ModelConfig(arch="encoder", vocab_size=11, d_model=8, n_heads=2, n_layers=1, use_bias=True, max_len=8,
                type_vocab_size=2, embed_norm=True, n_classes=3, activation="swiglu"),
], ids=["encoder_decoder", "encoder"])
def test_weight_decay_reaches_weight_matrices_and_tables_only(model_cfg):
    """With zero gradients AdamW moves exactly the decayed parameters: every weight matrix and embedding / position
    table, never a bias (the fused q/k/v bias is 3-D) or a norm scale."""
    from transformer.model import build_model
    _, params = nnx.split(build_model(model_cfg, nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases start at 0, where decay would not show
    tx = make_optimizer(OptimConfig(weight_decay=0.5, warmup_steps=1), 10)
    opt_state, zero = tx.init(params), jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):  # the learning rate is 0 at step 0
        updates, opt_state = jax.jit(tx.update)(zero, opt_state, params)
    name = lambda path: jax.tree_util.keystr(path).split("'")[-2]  # noqa: E731  the attribute, e.g. b_qkv_CNH
    moved = {name(p) for p, u in jax.tree_util.tree_leaves_with_path(updates) if float(jnp.abs(u).max()) > 0}
    kept = {name(p) for p, u in jax.tree_util.tree_leaves_with_path(updates)} - moved
    matrices = {"w_qkv_DCNH", "w_o_NHD", "table_VD", "table_TD"}
    if model_cfg.arch == "encoder_decoder":
        assert moved == matrices | {"w_q_DNH", "w_kv_DCKH", "w_in_DF", "w_out_FD"}
    else:
        assert moved == matrices | {"w_in_DCF", "w_out_FD", "segment_SD", "w_DD", "w_pool_DD", "w_out_DC"}
    assert kept == {"b_qkv_CNH", "b_o_D", "b_out_D", "scale_D", "bias_D"} | (
        {"b_in_F", "b_q_NH", "b_kv_CKH"} if model_cfg.arch == "encoder_decoder" else {"b_D", "b_V", "b_pool_D", "b_out_C"})
