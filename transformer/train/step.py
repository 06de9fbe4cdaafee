"""The train state and the pure jitted train / eval steps.

The train state is a plain dict pytree: {"params", "opt_state", "step", "rng"}, plus "ema" (the weights' moving
average) when optim.ema_decay > 0 and "master" (the trained weights in float32) when model.param_dtype is bf16.
The model graph is split once; the steps merge it with the params inside the traced function, so jit sees only
arrays. What a batch holds and how its loss is taken is the task's (`tasks/`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer import sharding
from transformer.config import Config
from transformer.model import cast_params
from transformer.model.layers import DTYPES
from transformer.model.lora import LoRAParam
from transformer.tasks import task_of
from transformer.train.optim import update_ema


def trained(params, lora: bool):
    """(the params the optimizer trains, the frozen rest or None): with LoRA only the adapters train."""
    return nnx.split_state(params, LoRAParam, ...) if lora else (params, None)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, ema: bool = False,
               lora: bool = False, frozen_dtype=None, param_dtype=jnp.float32):
    """With `lora`, the optimizer state covers the adapters only: the base weights never enter the optimizer, and
    with `frozen_dtype` (bfloat16 when the matmuls take bf16 inputs) their matrices are stored in it, so no step
    converts them again (norm scales and biases stay float32). With a `param_dtype` other than float32 the trained
    weights are stored in it and their float32 master copy is the state's "master", which the optimizer updates
    (and the moving average follows)."""
    graphdef, params = nnx.split(model, nnx.Param)
    train, frozen = trained(params, lora)
    train = cast_params(train, jnp.float32)  # whatever dtype a source's weights came in
    if lora and frozen_dtype is not None:
        # matrices and tables, by what each weight says it is (a stacked layers' norm scale is 2-D too)
        frozen = jax.tree.map(lambda v: v.replace(v.get_value().astype(frozen_dtype))
                              if v.get_metadata().get("decay", True) else v,
                              frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
    state = {"opt_state": tx.init(train), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed))}
    if param_dtype != jnp.float32:
        state["master"] = train
    state["params"] = _with_frozen(cast_params(train, param_dtype), frozen)
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, _with_frozen(train, frozen))
    return graphdef, state


def _with_frozen(train, frozen):
    return train if frozen is None else nnx.merge_state(train, frozen)


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
    param_dtype = DTYPES[cfg.model.param_dtype]
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
            # summed in float32 whatever the weights' dtype
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            (loss_sum, grads), _ = jax.lax.scan(micro, zero, (batch_A, jnp.arange(A)))
            sums = {"loss": loss_sum}
        # the optimizer updates the float32 weights: the master copy when the trained ones are stored in bf16
        weights = state.get("master", params)
        grads = cast_params(grads, jnp.float32)
        updates, opt_state = tx.update(grads, state["opt_state"], weights)
        weights = optax.apply_updates(weights, updates)
        new_state = {"params": _with_frozen(cast_params(weights, param_dtype), frozen), "opt_state": opt_state,
                     "step": step + 1, "rng": state["rng"]}
        if "master" in state:
            new_state["master"] = weights
        if "ema" in state:
            new_state["ema"] = update_ema(state["ema"], _with_frozen(weights, frozen), step, cfg.optim.ema_decay)
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
