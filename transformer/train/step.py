"""The train state and the pure jitted train / eval steps.

The train state is a plain dict pytree: {"params", "opt_state", "step", "rng"}, plus "ema" (the weights' moving
average) when optim.ema_decay > 0. The model graph is split once; the steps merge it with the params inside the
traced function, so jit sees only arrays. What a batch holds and how its loss is taken is the task's (`tasks/`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer import sharding
from transformer.config import Config
from transformer.model.lora import LoRAParam
from transformer.tasks import task_of
from transformer.train.optim import update_ema


def trained(params, lora: bool):
    """(the params the optimizer trains, the frozen rest or None): with LoRA only the adapters train."""
    return nnx.split_state(params, LoRAParam, ...) if lora else (params, None)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, ema: bool = False,
               lora: bool = False, frozen_dtype=None):
    """With `lora`, the optimizer state covers the adapters only: the base weights never enter the optimizer, and
    with `frozen_dtype` (bfloat16 when the matmuls take bf16 inputs) their matrices are stored in it, so no step
    converts them again (norm scales and biases stay float32)."""
    graphdef, params = nnx.split(model, nnx.Param)
    if lora and frozen_dtype is not None:
        adapters, frozen = trained(params, lora)
        # matrices and tables, by what each weight says it is (a stacked layers' norm scale is 2-D too)
        frozen = jax.tree.map(lambda v: v.replace(v.get_value().astype(frozen_dtype))
                              if v.get_metadata().get("decay", True) else v,
                              frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
        params = nnx.merge_state(adapters, frozen)
    state = {"params": params, "opt_state": tx.init(trained(params, lora)[0]), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed))}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, state


def inference_params(state: dict):
    """The weights to evaluate and sample with: the moving average when the run keeps one."""
    return state.get("ema", state["params"])


def make_steps(graphdef, tx: optax.GradientTransformation, cfg: Config, mesh, shardings) -> tuple[Callable, Callable]:
    """Returns (train_step, eval_step), both jitted with explicit shardings; train_step donates the state.

    train_step(state, batch) takes arrays shaped (A, B, ...): A gradient-accumulation micro-batches of B rows, and
    returns the new state and {"loss", "grad_norm", "tokens"}; eval_step(params, batch) takes (B, ...) and returns
    the summed terms of the task's loss ("loss", "correct", "count"), which `tasks.losses.means` turns into
    per-token figures.
    """
    use_dropout = cfg.model.dropout > 0 or (cfg.model.lora_rank > 0 and cfg.model.lora_dropout > 0)
    lora = cfg.model.lora_rank > 0
    task = task_of(cfg)

    def sums_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        return task.sums(model, batch, key if use_dropout else None, cfg.optim.label_smoothing)

    def loss_fn(train_params, frozen, batch, key, count):
        """Differentiated with respect to the trained params only: no gradient is computed for frozen weights."""
        sums = sums_fn(nnx.merge_state(train_params, frozen) if lora else train_params, batch, key)
        return sums["loss"] / count, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    @sharding.activation_mesh(mesh)
    def train_step(state, batch_A):
        # A: gradient-accumulation micro-batches, summed in a scan so one optimizer step is one jit call. Every
        # micro-batch's loss sum is divided by the weight count of the whole step, so the accumulated gradient is
        # the gradient of the step's mean over tokens, whatever the split.
        step = state["step"]
        params, frozen = trained(state["params"], lora)
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        A = batch_A["inputs"].shape[0]
        count = jnp.maximum(task.weights(batch_A).sum(), 1.0)
        if A == 1:
            grads, sums = grad_fn(params, frozen, jax.tree.map(lambda a: a[0], batch_A), key, count)
        else:
            def micro(carry, inputs):
                batch, i = inputs
                grads, sums = grad_fn(params, frozen, batch, jax.random.fold_in(key, i), count)
                return jax.tree.map(jnp.add, carry, (sums["loss"], grads)), None
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss_sum, grads), _ = jax.lax.scan(micro, zero, (batch_A, jnp.arange(A)))
            sums = {"loss": loss_sum}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {"params": nnx.merge_state(params, frozen) if lora else params, "opt_state": opt_state,
                     "step": step + 1, "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = update_ema(state["ema"], new_state["params"], step, cfg.optim.ema_decay)
        return new_state, {"loss": sums["loss"] / count, "grad_norm": optax.tree.norm(grads),
                           "tokens": task.real_tokens(batch_A)}

    @sharding.activation_mesh(mesh)
    def eval_step(params, batch):
        return sums_fn(params, batch, None)

    repl = sharding.replicated(mesh)
    # one sharding for every array of the batch (a pytree prefix), whichever arrays the task's batches hold
    train = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, repl),
                    in_shardings=(shardings, sharding.batch_sharding(mesh, lead_axes=1)))
    evaluate = jax.jit(eval_step, out_shardings=repl, in_shardings=(shardings["params"], sharding.batch_sharding(mesh)))
    return train, evaluate
