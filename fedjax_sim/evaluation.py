"""Evaluation on a central test set and on per-client test splits, jitted once."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import compile as compile_lib
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import label_sums


def _sums(apply, params, x, y, mask):
  """Summed loss, summed correct, and number of labels over the real examples of a batch.

  Sums are over labels (tokens), so sequence metrics are per token, padding
  tokens excluded; with one label per example they are per example.
  """
  loss, hits, count = label_sums(apply(params, x), y)
  mask = mask.astype(jnp.float32)
  return jnp.sum(loss * mask), jnp.sum(hits * mask), jnp.sum(count * mask)


def make_evaluator(
    apply: Callable,
    *,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    client_test: FederatedData | None = None,
    batch_size: int = 1024,
) -> Callable[..., dict[str, float]]:
  """Builds `evaluate(params) -> metrics` over the given held-out data.

  Args:
    apply: the model's pure apply function.
    test: a central test set (x, y), evaluated in fixed-size padded batches.
    client_test: per-client test splits; reports the example-weighted mean and
      the 10th percentile over clients (with test data) of accuracy.
    batch_size: examples per evaluation batch.

  Returns:
    evaluate(params) -> {"test_loss", "test_accuracy", "client_test_loss",
    "client_test_accuracy", "client_test_accuracy_p10"} (those that apply).
  """
  if test is None and client_test is None:
    raise ValueError("give a central test set, per-client test splits, or both")
  central = None
  if test is not None:
    x, y = np.asarray(test[0]), np.asarray(test[1])
    if len(x) != len(y) or len(x) == 0:
      raise ValueError(f"test set: x has {len(x)} examples and y has {len(y)}; need equal, > 0")
    size = min(batch_size, len(x))
    num_batches = -(-len(x) // size)
    pad = num_batches * size - len(x)
    xb = jnp.asarray(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                     .reshape(num_batches, size, *x.shape[1:]))
    yb = jnp.asarray(np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
                     .reshape(num_batches, size, *y.shape[1:]))
    mb = jnp.asarray((np.arange(num_batches * size) < len(x)).reshape(num_batches, size))

    @compile_lib.jit
    def central(params, xb, yb, mb):
      sums = jax.lax.map(lambda b: _sums(apply, params, *b), (xb, yb, mb))
      loss, hits, count = (s.sum() for s in sums)
      return loss / count, hits / count

    central_data = (xb, yb, mb)

  per_client = None
  if client_test is not None:
    @compile_lib.jit
    def per_client(params, data: FederatedData):
      def one(args):
        x, y, n = args
        return _sums(apply, params, x, y, jnp.arange(x.shape[0]) < n)
      return jax.lax.map(one, (data.x, data.y, data.counts), batch_size=64)

  def evaluate(params) -> dict[str, float]:
    out = {}
    if central is not None:
      loss, acc = central(params, *central_data)
      out["test_loss"], out["test_accuracy"] = float(loss), float(acc)
    if per_client is not None:
      loss, hits, count = (np.asarray(a) for a in per_client(params, client_test))
      has = count > 0
      out["client_test_loss"] = float(loss.sum() / count.sum())
      out["client_test_accuracy"] = float(hits.sum() / count.sum())
      out["client_test_accuracy_p10"] = float(np.percentile(hits[has] / count[has], 10))
    return out

  return evaluate
