"""Per-example losses and accuracy for classification, by integer label."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(apply):
  """Per-example softmax cross-entropy of `apply(params, x)` against integer labels.

  Labels with extra axes (one label per token) are averaged over those axes.
  """

  def loss(params, x, y):
    per_label = optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)
    return per_label.reshape(per_label.shape[0], -1).mean(axis=1)

  return loss


def correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example fraction of labels predicted right (1 or 0 for one label)."""
  hits = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  return hits.reshape(hits.shape[0], -1).mean(axis=1)
