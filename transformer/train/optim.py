"""The optimizer: AdamW with a learning-rate schedule, global-norm clipping and a decay mask; the weights' moving
average."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer.config import OptimConfig


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = max(o.warmup_steps, 1)
    if o.schedule == "cosine":
        decay = o.decay_steps or total_steps
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(decay, warmup + 1), o.min_lr)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)],
                                    [warmup])
    if o.schedule == "inverse_sqrt":  # the original Transformer's schedule, peaking at o.lr after warmup
        return lambda step: o.lr * jnp.minimum((step + 1) / warmup, jnp.sqrt(warmup / jnp.maximum(step + 1, 1)))
    raise ValueError(o.schedule)


def decays(params):
    """The weight-decay mask: True for what a parameter is a matrix of (projections, embedding and position tables),
    False for biases and norm scales, whatever their rank (the fused q/k/v bias is (3, N, H)). Each weight says which
    it is where it is created (`layers.param(..., decay=...)`)."""
    return jax.tree.map(lambda v: v.replace(bool(v.get_metadata().get("decay", True))), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(o: OptimConfig, total_steps: int, mu_dtype=None) -> optax.GradientTransformation:
    """`mu_dtype`: the first moment's dtype (bf16 with model.param_dtype=bfloat16; None: the weights'). The second
    moment stays float32: with b2 = 0.999 a step moves it by 0.1%, under half of bf16's spacing (0.2-0.4%), so in
    bf16 it would stop following the gradients' scale."""
    # Decay matrices only (not norms, biases): the usual AdamW recipe (nanoGPT, GPT-2, BERT).
    adamw = optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decays, mu_dtype=mu_dtype)
    # Same chain structure with or without clipping, so a run can be resumed with clipping switched.
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def update_ema(ema, params, step, decay: float):
    """ema <- d * ema + (1 - d) * params, with d = min(decay, (1 + step) / (10 + step)) so that the first steps'
    (random) weights fade quickly."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema, 1.0 - d)
