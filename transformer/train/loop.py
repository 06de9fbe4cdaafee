"""The training loop. Everything with side effects lives in this wing (files, signals, progress); the maths is in
`step.py` and the tasks."""
from __future__ import annotations

import math
import os
import time

import jax

from transformer import platform, sharding
from transformer.checkpoint import Checkpointer
from transformer.config import Config, ConfigError
from transformer.train.evaluation import evaluation_record
from transformer.train.feeder import BatchFeeder
from transformer.train.optim import lr_schedule
from transformer.train.progress import Progress, StopFlag
from transformer.train.setup import (
    build_state,
    check_run_dir,
    checkpoint_meta,
    checkpoint_state,
    init_or_restore,
    prepare_run,
    run_dir_of,
)
from transformer.train.step import inference_params, make_steps
from transformer.train.throughput import Throughput


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message says which step and which checkpoint is intact."""


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train (or continue) the run in `cfg.train.run_dir`. Returns the final metrics."""
    cfg = platform.resolve(cfg)  # the "auto" fields; splits a CPU host before the first device query below
    run_dir = run_dir_of(cfg)
    check_run_dir(cfg, run_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.train.batch_size % sharding.batch_shards(mesh):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the data x fsdp mesh size "
                          f"{sharding.batch_shards(mesh)}")
    ckpt = Checkpointer(run_dir, cfg.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}; drop --resume to start a new run there")
    os.makedirs(run_dir, exist_ok=True)

    cfg, task, data, pipeline, source = prepare_run(cfg, run_dir, mesh)
    graphdef, tx, abstract, shardings, create = build_state(cfg, mesh)
    train_step, eval_step = make_steps(graphdef, tx, cfg, mesh, shardings)
    state = init_or_restore(cfg, ckpt, latest, run_dir, abstract, shardings, create, pipeline, source)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    start = int(jax.device_get(state["step"]))

    progress = Progress(cfg, run_dir, start, jax.process_index() == 0)
    progress.write(f"{cfg.preset}: {n_params:,} parameters, vocab {cfg.model.vocab_size}, {len(data.train):,} train / "
                   f"{len(data.val):,} val {task.unit}, {mesh.size} {jax.devices()[0].platform} device(s) "
                   f"mesh {dict(mesh.shape)}, run dir {run_dir}"
                   + (f", resuming at step {start}" if latest is not None else ""))
    feeder = BatchFeeder(mesh, cfg.train.grad_accum)
    throughput = Throughput(cfg, n_params, mesh)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)  # optax applies schedule(k - 1) at step k
    last_good, pending, result = latest, [], {"step": start}

    def checked_metrics(step) -> list[dict]:
        """The metrics of the steps since the last check (one device fetch), or TrainingDiverged."""
        nonlocal pending
        fetched, pending = jax.device_get(pending), []
        throughput.add(sum(int(m["tokens"]) for m in fetched))
        if not all(math.isfinite(float(m["loss"])) for m in fetched):
            where = f"the last good checkpoint (step {last_good}) is intact" if last_good is not None else \
                "no checkpoint was written"
            raise TrainingDiverged(f"loss became {float(fetched[-1]['loss'])} by step {step}; stopping: {where}. "
                                   "Lower optim.lr, raise optim.warmup_steps or check the data")
        return fetched

    with StopFlag() as stop:
        try:
            for step in range(start + 1, cfg.train.steps + 1):
                state, metrics = train_step(state, feeder.next(pipeline, step))
                pending.append(metrics)
                final = step == cfg.train.steps
                if step % cfg.train.log_interval == 0 or final or stop.signal:
                    last = checked_metrics(step)[-1]
                    loss = float(last["loss"])
                    tok_s, mfu = throughput.read()
                    record = {"step": step, "loss": loss, "grad_norm": float(last["grad_norm"]),
                              "lr": float(schedule(step - 1)), "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()}
                    result.update(record)
                    progress.log(record, f"loss {loss:.4f} {tok_s:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu else ""))
                val_loss = None
                if step % cfg.train.eval_interval == 0 or final:
                    with throughput.excluded():  # evaluation time is not training throughput
                        record, message = evaluation_record(step, cfg, task, data, graphdef, inference_params(state),
                                                            eval_step, pipeline.val, sharding.batch_sharding(mesh))
                    val_loss = record["val_loss"]
                    result.update(record)
                    progress.log(record, message, permanent=True)
                if step % cfg.train.ckpt_interval == 0 or final or stop.signal:
                    checked_metrics(step)
                    meta = checkpoint_meta(cfg, pipeline, data.tokenizer, data.labels)
                    ckpt.save(step, checkpoint_state(state, cfg), meta, val_loss)
                    last_good = step
                progress.advance(1)
                result["step"] = step
                if stop.signal:
                    progress.write(f"{stop.signal}: saved a checkpoint at step {step} in {run_dir}; "
                                   "re-run the same command to resume")
                    result["stopped_by"] = stop.signal
                    break
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
    return result
