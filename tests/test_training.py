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

from transformer.cli import parse_args
from transformer.config import OptimConfig
from transformer.model import DecoderLM
from transformer.trainer import METRICS_FILE, TrainingDiverged, train
from transformer.training import cross_entropy, lr_schedule

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
            *extra]


def losses(run_dir):
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, {r["step"]: r["val_loss"] for r in records
                                                                      if "val_loss" in r}


def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(parse_args(tiny_args(corpus, full, 8))[0])
    train(parse_args(tiny_args(corpus, half, 4, "--optim.decay_steps=8"))[0])
    out = train(parse_args(tiny_args(corpus, half, 8))[0], resume=True)  # a new process would do the same
    (full_loss, full_val), (half_loss, half_val) = losses(full), losses(half)
    assert sorted(full_loss) == sorted(half_loss) == list(range(1, 9))
    assert [full_loss[s] for s in range(1, 9)] == [half_loss[s] for s in range(1, 9)]  # exact on CPU
    assert full_val[6] == half_val[6] and full_val[8] == half_val[8] == out["val_loss"]
    assert full_loss[1] != full_loss[8]


def test_weight_average_resumes_exactly_and_is_what_eval_and_loading_use(corpus, tmp_path):
    from transformer.checkpoint import Checkpointer, abstract_like
    from transformer.loading import load_run
    from transformer.training import update_ema
    ema = "--optim.ema_decay=0.9"
    full, half = tmp_path / "full", tmp_path / "half"
    train(parse_args(tiny_args(corpus, full, 6, ema))[0])
    train(parse_args(tiny_args(corpus, half, 3, ema, "--optim.decay_steps=6"))[0])
    train(parse_args(tiny_args(corpus, half, 6, ema))[0], resume=True)
    assert losses(full) == losses(half)  # train and val losses, steps 1-6, exactly
    run = load_run(str(full))
    ckpt = Checkpointer(str(full), read_only=True)
    shardings = jax.tree.map(lambda a: a.sharding, run.params)
    raw = ckpt.restore_params(6, abstract_like(run.params, shardings), "params")
    average = ckpt.restore_params(6, abstract_like(run.params, shardings), "ema")
    ckpt.close()
    leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]  # noqa: E731
    for a, b in zip(leaves(run.params), leaves(average)):
        np.testing.assert_array_equal(a, b)  # inference loads the average ...
    assert any(not np.allclose(a, b) for a, b in zip(leaves(raw), leaves(average)))  # ... not the last weights
    # the val loss logged at step 6 is the average's
    from transformer.data import eval_batches
    val = eval_batches(np.load(full / "tokens" / "val.npy"), 16, 8, 2)
    val_loss = lambda p: np.mean([cross_entropy(nnx.merge(run.graphdef, p)(x), y) for x, y in val])  # noqa: E731
    logged = losses(full)[1][6]
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
    g_full = jax.grad(loss)(params, x, y)
    g_half = jax.tree.map(lambda a, b: (a + b) / 2, jax.grad(loss)(params, x[:2], y[:2]),
                          jax.grad(loss)(params, x[2:], y[2:]))
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
