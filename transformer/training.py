"""Optimizer, learning-rate schedules, and the pure jitted train / eval steps.

The train state is a plain dict pytree: {"params", "opt_state", "step", "rng"}, plus "ema" (the weights' moving
average) when optim.ema_decay > 0. The model graph is split once; the steps merge it with the params inside the
traced function, so jit sees only arrays.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer import sharding
from transformer.config import TASK_OF_ARCH, Config, OptimConfig


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


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # Decay matrices only (not norms, biases): the usual AdamW recipe (nanoGPT, GPT-2, BERT).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask)
    # Same chain structure with or without clipping, so a run can be resumed with clipping switched.
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def cross_entropy(logits_BTV, labels_BT, weights_BT=None, label_smoothing: float = 0.0):
    """Mean token cross-entropy in float32; `weights_BT` (0/1) drops padding or unselected positions. With label
    smoothing the target puts 1 - s on the label and s spread evenly over the vocabulary."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    if label_smoothing:
        targets_BTV = optax.smooth_labels(jax.nn.one_hot(labels_BT, logits_BTV.shape[-1]), label_smoothing)
        losses_BT = optax.softmax_cross_entropy(logits_BTV, targets_BTV)
    else:
        losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, labels_BT)
    if weights_BT is None:
        return losses_BT.mean()
    return (losses_BT * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1.0)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, ema: bool = False):
    graphdef, params = nnx.split(model, nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed))}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, state


def inference_params(state: dict):
    """The weights to evaluate and sample with: the moving average when the run keeps one."""
    return state.get("ema", state["params"])


def update_ema(ema, params, step, decay: float):
    """ema <- d * ema + (1 - d) * params, with d = min(decay, (1 + step) / (10 + step)) so that the first steps'
    (random) weights fade quickly."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema, 1.0 - d)


def state_shardings(state, mesh):
    return sharding.tree_shardings(state, mesh)


def task_of(cfg: Config) -> str:
    """What a run trains: "lm" (decoder, next token), "mlm" (encoder, masked tokens) or "classify" (encoder + head)."""
    if cfg.train.task:
        return cfg.train.task
    return TASK_OF_ARCH[cfg.model.arch]


def task_loss(model, batch: dict, key, task: str, label_smoothing: float = 0.0):
    """(loss, metrics) of one batch. Batches are dicts: "inputs" and "targets" always; "valid" (real tokens) and
    "weights" (positions that count) for the encoder tasks."""
    if task == "lm":
        return cross_entropy(model(batch["inputs"], dropout_key=key), batch["targets"]), {}
    if task in ("seq2seq", "mlm"):  # token losses on the weighted positions only
        if task == "seq2seq":  # teacher forcing: decoder inputs are the targets shifted right behind BOS
            logits_BTV = model(batch["inputs"], batch["decoder_inputs"], src_valid_BS=batch["valid"],
                               dropout_key=key)
        else:
            logits_BTV = model(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)
            label_smoothing = 0.0
        weights_BT = batch["weights"]
        correct = (logits_BTV.argmax(-1) == batch["targets"]) * weights_BT
        return cross_entropy(logits_BTV, batch["targets"], weights_BT, label_smoothing), {
            "accuracy": correct.sum() / jnp.maximum(weights_BT.sum(), 1.0)}
    logits_BC = model.classify(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)
    labels_B = batch["targets"]
    return cross_entropy(logits_BC[:, None], labels_B[:, None]), {
        "accuracy": (logits_BC.argmax(-1) == labels_B).mean()}


def make_steps(graphdef, tx: optax.GradientTransformation, cfg: Config, mesh, shardings) -> tuple[Callable, Callable]:
    """Returns (train_step, eval_step), both jitted with explicit shardings; train_step donates the state.

    train_step(state, batch) takes arrays shaped (A, B, ...): A gradient-accumulation micro-batches of B rows;
    eval_step(params, batch) takes (B, ...) and returns {"loss", and "accuracy" for the encoder tasks}.
    """
    use_dropout = cfg.model.dropout > 0
    task = task_of(cfg)

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        return task_loss(model, batch, key if use_dropout else None, task, cfg.optim.label_smoothing)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @sharding.activation_mesh(mesh)
    def train_step(state, batch_A):
        # A: gradient-accumulation micro-batches, summed in a scan so one optimizer step is one jit call.
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        A = batch_A["inputs"].shape[0]
        if A == 1:
            (loss, _), grads = grad_fn(params, jax.tree.map(lambda a: a[0], batch_A), key)
        else:
            def micro(carry, inputs):
                batch, i = inputs
                (loss, _), grads = grad_fn(params, batch, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro, zero, (batch_A, jnp.arange(A)))
            loss, grads = jax.tree.map(lambda g: g / A, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1,
                     "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = update_ema(state["ema"], new_state["params"], step, cfg.optim.ema_decay)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    @sharding.activation_mesh(mesh)
    def eval_step(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return {"loss": loss, **metrics}

    repl = sharding.replicated(mesh)
    keys = BATCH_KEYS[task]
    train = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, repl),
                    in_shardings=(shardings, dict.fromkeys(keys, sharding.batch_sharding(mesh, lead_axes=1))))
    evaluate = jax.jit(eval_step, out_shardings=repl,
                       in_shardings=(shardings["params"], dict.fromkeys(keys, sharding.batch_sharding(mesh))))
    return train, evaluate


# The arrays in one batch of each task (every one has the batch axis first, after the accumulation axis).
BATCH_KEYS = {"lm": ("inputs", "targets"), "mlm": ("inputs", "targets", "weights", "valid"),
              "classify": ("inputs", "targets", "valid"),
              "seq2seq": ("inputs", "valid", "decoder_inputs", "targets", "weights")}


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N for the weights plus 12 L T D for attention scores."""
    m = cfg.model
    n_nonembed = n_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 0)
    n_nonembed -= m.max_len * m.d_model if m.positions == "learned" else 0
    # The tied unembedding is a real matmul every step: count it back in.
    return 6 * (n_nonembed + m.vocab_size * m.d_model) + 12 * m.n_layers * m.max_len * m.d_model


# Peak dense TFLOP/s per chip for MFU, bf16 unless noted; override with --train.peak_tflops.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "a10": 125.0, "v100": 125.0,
               "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0,
               "cpu": 0.5}  # cpu: ~fp32 matmul peak of a few-core VM, measured on this project's 2-core machines


def peak_tflops(cfg: Config) -> float:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    kind = jax.devices()[0].device_kind.lower()
    for name, value in PEAK_TFLOPS.items():
        if name in kind:
            return value
    return PEAK_TFLOPS["cpu"] if jax.devices()[0].platform == "cpu" else 0.0
