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


def decays(params):
    """The weight-decay mask: True for what a parameter is a matrix of (projections, embedding and position tables),
    False for biases and norm scales, whatever their rank (the fused q/k/v bias is (3, N, H)). Each weight says which
    it is where it is created (`layers.param(..., decay=...)`)."""
    return jax.tree.map(lambda v: v.replace(bool(v.get_metadata().get("decay", True))), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # Decay matrices only (not norms, biases): the usual AdamW recipe (nanoGPT, GPT-2, BERT).
    adamw = optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decays)
    # Same chain structure with or without clipping, so a run can be resumed with clipping switched.
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def token_losses(logits_BTV, labels_BT, label_smoothing: float = 0.0):
    """Cross-entropy of every position in float32. With label smoothing the target puts 1 - s on the label and s
    spread evenly over the vocabulary."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    if label_smoothing:
        targets_BTV = optax.smooth_labels(jax.nn.one_hot(labels_BT, logits_BTV.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits_BTV, targets_BTV)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, labels_BT)


def cross_entropy(logits_BTV, labels_BT, weights_BT=None, label_smoothing: float = 0.0):
    """Mean token cross-entropy in float32; `weights_BT` (0/1) drops padding or unselected positions."""
    losses_BT = token_losses(logits_BTV, labels_BT, label_smoothing)
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


def loss_weights(batch: dict, task: str):
    """How much each loss term of a batch counts: target tokens (seq2seq), selected tokens (mlm), every position
    (lm), every row (classify). Shaped like the batch's targets."""
    if task in ("seq2seq", "mlm"):
        return batch["weights"].astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


def real_tokens(batch: dict, task: str):
    """Non-padding tokens a batch trains on (tokens/s): source + target tokens for seq2seq, the real tokens of the
    inputs otherwise."""
    if task == "seq2seq":
        return batch["valid"].sum() + batch["weights"].sum()
    if "valid" in batch:
        return batch["valid"].sum()
    return jnp.asarray(batch["inputs"].size)


def task_loss(model, batch: dict, key, task: str, label_smoothing: float = 0.0):
    """Sums over one batch: {"loss": weighted sum of the token (or row) losses, "correct": weighted count of argmax
    hits, "count": the sum of the weights}. Means are taken once over every batch that shares a step (gradient
    accumulation) or an evaluation, so a batch counts by its tokens, not as one batch among others. Batches are
    dicts: "inputs" and "targets" always; "valid" (real tokens) and "weights" (positions that count) for the
    encoder tasks."""
    weights = loss_weights(batch, task)
    if task == "lm":
        logits = model(batch["inputs"], dropout_key=key)
    elif task == "seq2seq":  # teacher forcing: decoder inputs are the targets shifted right behind BOS
        logits = model(batch["inputs"], batch["decoder_inputs"], src_valid_BS=batch["valid"], dropout_key=key)
    elif task == "mlm":
        logits = model(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)
    else:
        logits = model.classify(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)
    losses = token_losses(logits, batch["targets"], label_smoothing if task == "seq2seq" else 0.0)  # translation only
    correct = logits.argmax(-1) == batch["targets"]
    return {"loss": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": weights.sum()}


def means(sums: dict) -> dict:
    """{"loss", "accuracy"} from summed `task_loss` terms."""
    count = jnp.maximum(sums["count"], 1.0)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}


def make_steps(graphdef, tx: optax.GradientTransformation, cfg: Config, mesh, shardings) -> tuple[Callable, Callable]:
    """Returns (train_step, eval_step), both jitted with explicit shardings; train_step donates the state.

    train_step(state, batch) takes arrays shaped (A, B, ...): A gradient-accumulation micro-batches of B rows, and
    returns the new state and {"loss", "grad_norm", "tokens"}; eval_step(params, batch) takes (B, ...) and returns
    the summed terms of `task_loss` ("loss", "correct", "count"), which `means` turns into per-token figures.
    """
    use_dropout = cfg.model.dropout > 0
    task = task_of(cfg)

    def sums_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        return task_loss(model, batch, key if use_dropout else None, task, cfg.optim.label_smoothing)

    def loss_fn(params, batch, key, count):
        sums = sums_fn(params, batch, key)
        return sums["loss"] / count, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    @sharding.activation_mesh(mesh)
    def train_step(state, batch_A):
        # A: gradient-accumulation micro-batches, summed in a scan so one optimizer step is one jit call. Every
        # micro-batch's loss sum is divided by the weight count of the whole step, so the accumulated gradient is
        # the gradient of the step's mean over tokens, whatever the split.
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        A = batch_A["inputs"].shape[0]
        count = jnp.maximum(loss_weights(batch_A, task).sum(), 1.0)
        if A == 1:
            grads, sums = grad_fn(params, jax.tree.map(lambda a: a[0], batch_A), key, count)
        else:
            def micro(carry, inputs):
                batch, i = inputs
                grads, sums = grad_fn(params, batch, jax.random.fold_in(key, i), count)
                return jax.tree.map(jnp.add, carry, (sums["loss"], grads)), None
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss_sum, grads), _ = jax.lax.scan(micro, zero, (batch_A, jnp.arange(A)))
            sums = {"loss": loss_sum}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1,
                     "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = update_ema(state["ema"], new_state["params"], step, cfg.optim.ema_decay)
        return new_state, {"loss": sums["loss"] / count, "grad_norm": optax.tree.norm(grads),
                           "tokens": real_tokens(batch_A, task)}

    @sharding.activation_mesh(mesh)
    def eval_step(params, batch):
        return sums_fn(params, batch, None)

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
