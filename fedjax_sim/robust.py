"""Byzantine-robust aggregation of the stacked client updates.

- Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran, Bartlett 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
- Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent".
- Geometric median by the smoothed Weiszfeld algorithm (RFA): Pillutla, Kakade,
  Harchaoui 2022, "Robust Aggregation for Federated Learning".
- Norm bounding (clip each update to a norm, a per-client transform): Sun, Kairouz,
  Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?".

The median, trimmed mean and Krum ignore the example weights (each client counts
once, as in the papers' analyses); the geometric median uses them, as RFA does. Krum
and the geometric median measure distances between the updates alone, not the
scalars some algorithms send beside them (FedNova's gradient weight), and combine the
chosen clients' scalars as they combine their updates; norm bounding clips the update
alone.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators import (Aggregator, ClientTransform, no_state, ravel_clients,
                                    split_scalars)
from fedjax_sim import privacy
from fedjax_sim.tree import weighted_sum


def _median(values: jax.Array) -> jax.Array:
  """The median over axis 0, a NaN counted as +inf: an extreme value like any other
  that a Byzantine client may send, not one that makes the median NaN."""
  return jnp.median(jnp.where(jnp.isnan(values), jnp.inf, values), axis=0)


def coordinate_median() -> Aggregator:
  """The median over clients of every coordinate (the mean of the two middle ones
  when the number of clients is even)."""

  def aggregate(state, deltas, weights, ids, key):
    del weights, ids, key
    return jax.tree_util.tree_map(_median, deltas), state, {}

  return Aggregator(no_state, aggregate, ignores_weights=True, selects_rows=True)


def _num_trimmed(clients: int, trim_fraction: float | None, num_trim: int | None) -> int:
  # floor(beta m), rounded first: 0.29 * 100 is 28.999999999999996 in floats
  return num_trim if num_trim is not None else math.floor(round(trim_fraction * clients, 9))


def trimmed_mean(trim_fraction: float | None = None, *, num_trim: int | None = None
                 ) -> Aggregator:
  """Per coordinate, drops the k largest and k smallest client values and averages the rest.

  Args:
    trim_fraction: beta; k = floor(beta * clients_per_round) (default 0.1). Or
    num_trim: k directly (not both).
  """
  if num_trim is not None and trim_fraction is not None:
    raise ValueError(f"trimmed_mean: give trim_fraction or num_trim, not both (got "
                     f"{trim_fraction!r} and {num_trim!r})")
  if num_trim is None and trim_fraction is None:
    trim_fraction = 0.1
  if num_trim is not None:
    if not (isinstance(num_trim, int) and num_trim >= 0):
      raise ValueError(f"trimmed_mean: num_trim must be an integer >= 0, got {num_trim!r}")
  elif not (isinstance(trim_fraction, (int, float)) and 0.0 <= trim_fraction < 0.5):
    raise ValueError(f"trimmed_mean: trim_fraction must lie in [0, 0.5), got {trim_fraction!r}")

  def validate(clients_per_round, num_clients=None):
    k = _num_trimmed(clients_per_round, trim_fraction, num_trim)
    if 2 * k >= clients_per_round:
      raise ValueError(f"trimmed_mean drops {k} clients from each end, which leaves none of "
                       f"the {clients_per_round} clients per round")
    if k == 0 and num_trim is None and trim_fraction > 0:
      warnings.warn(f"trimmed_mean: trim_fraction {trim_fraction:g} of {clients_per_round} "
                    f"clients per round trims none (floor({trim_fraction:g} x "
                    f"{clients_per_round}) = 0): it is the unweighted mean, no defence; give "
                    f"num_trim or a larger fraction", stacklevel=2)

  def aggregate(state, deltas, weights, ids, key):
    del weights, ids, key
    m = jax.tree_util.tree_leaves(deltas)[0].shape[0]
    k = _num_trimmed(m, trim_fraction, num_trim)
    trim = lambda d: jnp.mean(jnp.sort(d, axis=0)[k:m - k], axis=0)
    return jax.tree_util.tree_map(trim, deltas), state, {}

  return Aggregator(no_state, aggregate, validate, ignores_weights=True, selects_rows=True)


def _update_rows(deltas):
  """The update as rows [C, d], and the scalars sent beside it (FedNova's gradient
  weight, q-FFL's h, FedExP's squared norm: `split_scalars`) as [C, s], with
  `join(unravel(row [d]), scalars [s])` giving one aggregated upload. Krum and the geometric
  median measure distances between updates only: a gradient weight of about the local
  step count would outweigh a whole update's distance, so the clients' step counts
  would choose. The chosen clients' scalars are combined as their updates are."""
  update, scalars, join_leaves = split_scalars(deltas)
  flat, unravel = ravel_clients(update)
  stacked = jnp.stack([s.astype(jnp.float32) for s in scalars], axis=1) if scalars else (
      jnp.zeros((flat.shape[0], 0), jnp.float32))

  def join(update_leaves, scalar_row):
    return join_leaves(update_leaves,
                       [scalar_row[i].astype(s.dtype) for i, s in enumerate(scalars)])

  return flat, unravel, stacked, join


def pairwise_sq_distances(flat: jax.Array) -> jax.Array:
  """||x_i - x_j||^2 for all pairs of rows of [m, d], one row at a time (memory m * d;
  differences rather than a Gram matrix, which loses precision for close updates)."""
  return jax.lax.map(lambda row: jnp.sum((flat - row) ** 2, axis=1), flat)


def krum_scores(flat: jax.Array, num_byzantine: int) -> jax.Array:
  """Each update's sum of squared distances to its m - f - 2 nearest other updates."""
  m = flat.shape[0]
  dist = pairwise_sq_distances(flat) + jnp.diag(jnp.full((m,), jnp.inf))
  return jnp.sum(jnp.sort(dist, axis=1)[:, :m - num_byzantine - 2], axis=1)


def krum(num_byzantine: int, *, num_selected: int = 1) -> Aggregator:
  """Krum (num_selected=1): the update with the lowest Krum score; Multi-Krum: the
  mean of the num_selected updates with the lowest scores.

  Args:
    num_byzantine: f, the number of Byzantine clients per round it must tolerate;
      needs clients_per_round >= 2 f + 3.
    num_selected: updates averaged (1 is Krum); at most clients_per_round - f.

  Returns:
    An Aggregator; metric `krum_selected` (per client: chosen or not).
  """
  if not (isinstance(num_byzantine, int) and num_byzantine >= 0):
    raise ValueError(f"krum: num_byzantine must be an integer >= 0, got {num_byzantine!r}")
  if not (isinstance(num_selected, int) and num_selected >= 1):
    raise ValueError(f"krum: num_selected must be a positive integer, got {num_selected!r}")

  def validate(clients_per_round, num_clients=None):
    if clients_per_round < 2 * num_byzantine + 3:
      raise ValueError(
          f"krum with num_byzantine={num_byzantine} needs at least 2*{num_byzantine}+3 = "
          f"{2 * num_byzantine + 3} clients per round, got {clients_per_round}")
    if num_selected > clients_per_round - num_byzantine:
      raise ValueError(f"multi-krum: num_selected={num_selected} exceeds clients_per_round - "
                       f"num_byzantine = {clients_per_round - num_byzantine}")

  def aggregate(state, deltas, weights, ids, key):
    del weights, ids, key
    flat, unravel, scalars, join = _update_rows(deltas)
    validate(flat.shape[0])
    scores = krum_scores(flat, num_byzantine)
    chosen = jnp.argsort(scores)[:num_selected]
    delta = join(unravel(jnp.mean(flat[chosen], axis=0)), jnp.mean(scalars[chosen], axis=0))
    selected = jnp.zeros(flat.shape[0], bool).at[chosen].set(True)
    return delta, state, {"krum_selected": selected}

  return Aggregator(no_state, aggregate, validate, ignores_weights=True, selects_rows=True)


def multi_krum(num_byzantine: int, num_selected: int | None = None) -> Aggregator:
  """Multi-Krum; num_selected None averages clients_per_round - num_byzantine updates."""
  if num_selected is not None:
    return krum(num_byzantine, num_selected=num_selected)
  base = krum(num_byzantine)  # for its argument checks

  def validate(clients_per_round, num_clients=None):
    base.validate(clients_per_round, num_clients)

  def aggregate(state, deltas, weights, ids, key):
    m = jax.tree_util.tree_leaves(deltas)[0].shape[0]
    return krum(num_byzantine, num_selected=m - num_byzantine).aggregate(
        state, deltas, weights, ids, key)

  return Aggregator(no_state, aggregate, validate, ignores_weights=True, selects_rows=True)


def weiszfeld(flat: jax.Array, weights: jax.Array, num_iterations: int,
              smoothing: float) -> jax.Array:
  """The smoothed Weiszfeld iteration (RFA, Algorithm 2):
  v <- sum_i b_i x_i / sum_i b_i with b_i = a_i / max(smoothing, ||v - x_i||).

  It starts from the coordinate-wise median rather than the mean: from the mean, f
  far outliers out of m lose only about a factor (m - f) / f of their pull per step
  (40 steps for outliers of size 1e12 with a third of the clients), while from a
  robust start a few steps converge whatever their size.
  """
  shares = weiszfeld_coefficients(flat, weights, num_iterations, smoothing)
  return _combine(shares, flat)


def _combine(shares: jax.Array, rows: jax.Array) -> jax.Array:
  """sum_i shares[i] rows[i], a row of share 0 left out (0 x inf would be NaN), by
  tree.weighted_sum (float32 arithmetic: an accelerator's default-precision dot would
  round the rows)."""
  return weighted_sum(shares, jnp.where((shares > 0)[:, None], rows, 0.0))


def weiszfeld_coefficients(flat: jax.Array, weights: jax.Array, num_iterations: int,
                           smoothing: float) -> jax.Array:
  """c [m], summing to 1, with `weiszfeld(...) = c @ flat`: the clients' shares of the
  geometric median, so that what they send beside the update combines the same way."""
  # A row with an inf or NaN is dropped (c = 0), as a server would reject it on
  # arrival: in the iteration it would make every step NaN (0 * inf, or NaN distances).
  finite = jnp.all(jnp.isfinite(flat), axis=1)
  alpha = jnp.where(finite, weights, 0.0)
  counted = alpha > 0
  rows = jnp.where(finite[:, None], flat, 0.0)

  def shares(v):
    # All zeros where no row counts (a round of clients without examples): no update,
    # where 0 / 0 made the model NaN.
    beta = alpha / jnp.maximum(smoothing, jnp.linalg.norm(rows - v, axis=1))
    total = jnp.sum(beta)
    return beta / jnp.where(total > 0, total, 1.0)

  # The start is the median of the rows that count: a client of weight 0 (no examples)
  # moved it, and so the result of the fixed number of steps.
  start = jnp.nanmedian(jnp.where(counted[:, None], flat, jnp.nan), axis=0)
  start = jnp.where(counted.any(), start, 0.0)
  v = jax.lax.fori_loop(0, num_iterations - 1, lambda _, v: weighted_sum(shares(v), rows),
                        start)
  return shares(v)


def geometric_median(num_iterations: int = 8, smoothing: float = 1e-6) -> Aggregator:
  """The weighted geometric median of the updates (RFA), by smoothed Weiszfeld; an
  update with an inf or NaN coordinate is dropped.

  Args:
    num_iterations: Weiszfeld steps from the coordinate-wise median (fixed, so
      every round costs the same; RFA reports a few suffice).
    smoothing: nu, the floor on distances that keeps the steps finite.
  """
  if not (isinstance(num_iterations, int) and num_iterations >= 1):
    raise ValueError(f"geometric_median: num_iterations must be a positive integer, "
                     f"got {num_iterations!r}")
  if not smoothing > 0:
    raise ValueError(f"geometric_median: smoothing must be > 0, got {smoothing!r}")

  def aggregate(state, deltas, weights, ids, key):
    del ids, key
    flat, unravel, scalars, join = _update_rows(deltas)
    # A client with a non-finite scalar is dropped with its update.
    flat = jnp.where(jnp.all(jnp.isfinite(scalars), axis=1)[:, None], flat, jnp.nan)
    shares = weiszfeld_coefficients(flat, weights, num_iterations, smoothing)
    return join(unravel(_combine(shares, flat)), _combine(shares, scalars)), state, {}

  return Aggregator(no_state, aggregate)


def norm_bound(max_norm: float) -> ClientTransform:
  """Clips every client's update to L2 norm `max_norm` before aggregation (Sun et al.
  2019), in float32. The norm is the update's alone: the scalars an algorithm sends
  beside it (`aggregators.split_scalars`) go as sent, or FedNova's gradient weight would
  count in the norm and be shrunk with the update, changing its step. (DP's
  `privacy.clip` clips them with the update: everything a client sends is bounded.)
  Metrics as `privacy.clip`'s."""
  clip = privacy.clip(max_norm)

  def apply(state, deltas, weights, ids, key):
    update, scalars, join = split_scalars(deltas)
    clipped, weights, state, metrics = clip.apply(state, update, weights, ids, key)
    return join(clipped, scalars), weights, state, metrics

  return ClientTransform(clip.init, apply)
