"""Evaluation on a central test set and on per-client test splits, jitted once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import checks
from fedjax_sim import compile as compile_lib
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import IGNORE_LABEL, label_sums


def _sums(apply, params, x, y, mask):
  """Summed loss, summed correct, and number of labels over the real examples of a batch.

  Sums are over labels (tokens), so sequence metrics are per token, padding
  tokens excluded; with one label per example they are per example.
  """
  loss, hits, count = label_sums(apply(params, x), y)
  # where, not a product: a padding slot's output may be NaN, and NaN x 0 is NaN.
  real = lambda v: jnp.sum(jnp.where(mask, v, 0).astype(jnp.float32))
  return real(loss), real(hits), real(count)


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
    `evaluate.check(params)` raises ValueError if the model cannot take the test data's
    examples or its outputs do not fit their labels (`fs.run` and `fs.sweep` call it
    before compiling; `evaluate` calls it once, before its first evaluation).
    `evaluate.prepare(params)` compiles it without evaluating (`fs.run` does, in a
    thread, while the round compiles).

  Raises:
    ValueError: test features that hold NaN or inf, naming the example or client.
  """
  if test is None and client_test is None:
    raise ValueError("give a central test set, per-client test splits, or both")
  if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
    raise ValueError(f"make_evaluator: batch_size must be a positive integer, got "
                     f"{batch_size!r}")
  central = None
  if test is not None:
    x, y = np.asarray(test[0]), np.asarray(test[1])
    if len(x) != len(y) or len(x) == 0:
      raise ValueError(f"test set: x has {len(x)} examples and y has {len(y)}; need equal, > 0")
    checks.check_finite_array(x, "the test set")
    if np.issubdtype(y.dtype, np.integer) and not np.any(y != IGNORE_LABEL):
      raise ValueError("the test set has no labels to score: every label is IGNORE_LABEL "
                       f"({IGNORE_LABEL})")
    size = min(batch_size, len(x))
    num_batches = -(-len(x) // size)
    pad = num_batches * size - len(x)
    # device_put, not jnp.asarray, which compiles a staging program per array (8-23 ms).
    xb = jax.device_put(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                        .reshape(num_batches, size, *x.shape[1:]))
    yb = jax.device_put(np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
                        .reshape(num_batches, size, *y.shape[1:]))
    mb = jax.device_put((np.arange(num_batches * size) < len(x)).reshape(num_batches, size))

    @compile_lib.jit
    def central(params, xb, yb, mb):
      sums = jax.lax.map(lambda b: _sums(apply, params, *b), (xb, yb, mb))
      loss, hits, count = (s.sum() for s in sums)
      return loss / count, hits / count

    central_data = (xb, yb, mb)

  per_client = None
  if client_test is not None:
    _check_client_test(client_test)

    @compile_lib.jit
    def per_client(params, data: FederatedData):
      def one(args):
        x, y, n = args
        return _sums(apply, params, x, y, jnp.arange(x.shape[0]) < n)
      return jax.lax.map(one, (data.x, data.y, data.counts), batch_size=64)

  checked = []

  def check(params) -> None:
    """Raises ValueError if the model cannot take the test data or their labels."""
    if central is not None:
      logits = checks.model_output(apply, params, x.shape[1:], xb.dtype,
                                   "the test set's examples")
      checks.check_token_ids(apply, x, np.ones(len(x), bool), "the test set", client_axis=False)
      checks.check_label_values(logits, y, np.ones(len(y), bool), "the test set",
                                client_axis=False)
    if client_test is not None:
      checks.check_labels(apply, params, client_test, "the client test splits")
    checked.append(True)

  def prepare(params) -> None:
    """Compiles the evaluation for parameters shaped like `params` (arrays or
    `jax.ShapeDtypeStruct`s), so that the first `evaluate` finds it compiled; `fs.run`
    calls it in a thread while the round's program compiles."""
    if central is not None:
      central.lower(params, *central_data).compile()
    if per_client is not None:
      per_client.lower(params, client_test).compile()

  def evaluate(params) -> dict[str, float]:
    if not checked:
      check(params)
    out = {}
    if central is not None:
      loss, acc = central(params, *central_data)
      out["test_loss"], out["test_accuracy"] = float(loss), float(acc)
    if per_client is not None:
      out.update(_client_metrics("client_test", *per_client(params, client_test)))
    return out

  evaluate.check = check
  evaluate.prepare = prepare
  return evaluate


def _check_client_test(client_test: FederatedData) -> None:
  """Raises ValueError if the client test splits have nothing to score (no example, or
  only IGNORE_LABEL tokens) or hold NaN/inf: their metrics would be 0/0."""
  checks.check_counts(client_test, "the client test splits")
  if not int(np.asarray(client_test.counts).sum()):
    raise ValueError("the client test splits hold no example: there is nothing to evaluate")
  labels = checks.real_labels(client_test)
  if np.issubdtype(labels.dtype, np.integer) and not np.any(labels != IGNORE_LABEL):
    raise ValueError("the client test splits have no labels to score: every label is "
                     f"IGNORE_LABEL ({IGNORE_LABEL})")
  checks.check_finite_features(client_test, "the client test splits")


def _leading_axes(tree) -> list:
  """Every leaf's leading axis length (None for a 0-d leaf, e.g. a whole ServerState's
  round counter passed where its client_states were meant)."""
  return sorted({a.shape[0] if np.ndim(a) else None
                 for a in jax.tree_util.tree_leaves(tree)}, key=str)


def _client_metrics(prefix: str, loss, hits, count) -> dict[str, float]:
  """Example-weighted loss and accuracy, and the 10th percentile of accuracy over the
  clients with test data, from per-client sums."""
  loss, hits, count = (np.asarray(a) for a in (loss, hits, count))
  has = count > 0
  return {f"{prefix}_loss": float(loss.sum() / count.sum()),
          f"{prefix}_accuracy": float(hits.sum() / count.sum()),
          f"{prefix}_accuracy_p10": float(np.percentile(hits[has] / count[has], 10))}


def make_personalized_evaluator(
    apply: Callable, client_test: FederatedData) -> Callable[..., dict[str, float]]:
  """Builds `evaluate(client_params) -> metrics`: each client's own model on its own
  test split (Ditto's personalized models).

  Args:
    apply: the model's pure apply function.
    client_test: per-client test splits; row i is client i's.

  Returns:
    evaluate(client_params), where every leaf of `client_params` has a leading
    axis over the clients of `client_test` (as `ServerState.client_states` of
    `ditto`), -> {"personal_client_test_loss", "personal_client_test_accuracy",
    "personal_client_test_accuracy_p10"}, aggregated as `make_evaluator` does. The
    first call checks client 0's model against the test splits (ValueError naming both
    sides, before compiling).
  """
  _check_client_test(client_test)
  checked = []

  @compile_lib.jit
  def per_client(client_params, data: FederatedData):
    def one(args):
      params, x, y, n = args
      return _sums(apply, params, x, y, jnp.arange(x.shape[0]) < n)
    return jax.lax.map(one, (client_params, data.x, data.y, data.counts), batch_size=64)

  def evaluate(client_params) -> dict[str, float]:
    rows = _leading_axes(client_params)
    if rows != [client_test.num_clients]:
      raise ValueError(f"client_params has models for {rows} clients but the test "
                       f"splits have {client_test.num_clients} (pass state.client_states)")
    if not checked:
      checks.check_labels(apply, jax.tree_util.tree_map(lambda a: a[0], client_params),
                          client_test, "the client test splits")
      checked.append(True)
    return _client_metrics("personal_client_test", *per_client(client_params, client_test))

  return evaluate


def make_merged_personalized_evaluator(
    apply: Callable, client_test: FederatedData,
    merge: Callable[[Any, Any], Any]) -> Callable[..., dict[str, float]]:
  """Builds `evaluate(shared, client_rows) -> metrics`: client i evaluated on its own
  test split with the model `merge(shared, rows[i])` (FedRep's shared body and
  personal head), built one client at a time, so the clients' full models are never
  all held at once.

  Args:
    apply: the model's pure apply function.
    client_test: per-client test splits; row i is client i's.
    merge: `(shared, row) -> params`.

  Returns:
    evaluate(shared, client_rows), where every leaf of `client_rows` has a leading
    axis over the clients of `client_test`, -> the metrics of
    `make_personalized_evaluator`. The first call checks client 0's model against the
    test splits (ValueError naming both sides, before compiling).
  """
  _check_client_test(client_test)
  checked = []

  @compile_lib.jit
  def per_client(shared, rows, data: FederatedData):
    def one(args):
      row, x, y, n = args
      return _sums(apply, merge(shared, row), x, y, jnp.arange(x.shape[0]) < n)
    return jax.lax.map(one, (rows, data.x, data.y, data.counts), batch_size=64)

  def evaluate(shared, client_rows) -> dict[str, float]:
    rows = _leading_axes(client_rows)
    if rows != [client_test.num_clients]:
      raise ValueError(f"client_rows has rows for {rows} clients but the test "
                       f"splits have {client_test.num_clients}")
    if not checked:
      first = merge(shared, jax.tree_util.tree_map(lambda a: a[0], client_rows))
      checks.check_labels(apply, first, client_test, "the client test splits")
      checked.append(True)
    return _client_metrics("personal_client_test", *per_client(shared, client_rows, client_test))

  return evaluate
