"""Losses in float32, as sums: a task's loss over a batch is a weighted sum and a weight count, divided once over
every batch that shares a step (gradient accumulation) or an evaluation, so a batch counts by its tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def loss_sums(logits, targets, weights, label_smoothing: float = 0.0) -> dict:
    """{"loss": weighted sum of the token (or row) losses, "correct": weighted count of argmax hits, "count": the sum
    of the weights}."""
    losses = token_losses(logits, targets, label_smoothing)
    correct = logits.argmax(-1) == targets
    return {"loss": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": weights.sum()}


def means(sums: dict) -> dict:
    """{"loss", "accuracy"} from summed terms."""
    count = jnp.maximum(sums["count"], 1.0)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
