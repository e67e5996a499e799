"""Per-example losses and accuracy for classification, by integer label.

Labels may have extra axes (one label per token, as in next-character prediction);
positions labelled `IGNORE_LABEL` (padding past the end of a text) count for
nothing: a per-example value is the mean over that example's other labels. With
one label per example this is plain softmax cross-entropy and 0/1 accuracy.
Training (`cross_entropy`) and evaluation (`evaluation.make_evaluator`, through
`label_sums`) build on `_loss_sums`, so they share one definition of the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_LABEL = -1  # a per-token label that is padding, not a target


def label_sums(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example sums over the labels that are not `IGNORE_LABEL`.

  Args:
    logits: `[batch, ..., num_classes]`.
    y: integer labels `[batch, ...]`.

  Returns:
    (summed cross-entropy, number predicted right, number of labels), each `[batch]`.
  """
  valid, safe = _labels(y)
  loss_sum, count = _loss_sums(logits, valid, safe)
  hits = jnp.argmax(logits, axis=-1) == safe
  return loss_sum, _per_example_sum(hits, valid), count


def _labels(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which labels count (not `IGNORE_LABEL`), and the labels with those set to class 0."""
  valid = y != IGNORE_LABEL
  return valid, jnp.where(valid, y, 0)  # a real class index, so no NaN reaches the gradient


def _per_example_sum(a: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.where(valid, a, 0).astype(jnp.float32).reshape(a.shape[0], -1).sum(axis=1)


def _loss_sums(logits: jax.Array, valid: jax.Array, safe: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy, number of labels) per example. Training takes only this,
  not the accuracy: XLA drops an unused argmax from the program, but the round's first
  trace and lowering still paid for it."""
  per_label = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return _per_example_sum(per_label, valid), _per_example_sum(jnp.ones_like(per_label), valid)


def cross_entropy(apply):
  """Per-example softmax cross-entropy of `apply(params, x)` against integer labels.

  Labels with extra axes (one label per token) are averaged over those axes,
  skipping `IGNORE_LABEL` positions.
  """

  def loss(params, x, y):
    loss_sum, count = _loss_sums(apply(params, x), *_labels(y))
    return loss_sum / jnp.maximum(count, 1.0)

  return loss


def correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example fraction of labels predicted right (1 or 0 for one label)."""
  _, hits, count = label_sums(logits, y)
  return hits / jnp.maximum(count, 1.0)
