"""User-level differential privacy for FedAvg: clipping, Gaussian noise, adaptive
clipping, and accounting of the sampling the simulation really does.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (DP-FedAvg: clip each client's update to L2 norm C, add Gaussian
noise of standard deviation z*C to the sum, divide by the number of clients).
Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping" (C follows a private estimate of a quantile of update norms).

Accounting uses Google's dp-accounting library. The simulation samples a fixed
number m of the N clients each round, uniformly without replacement, so the
neighbouring relation under which that sampling amplifies privacy is "replace one
client" (Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential Privacy
and Analytical Moments Accountant"): dp-accounting's RDP accountant has that event
(`SampledWithoutReplacementDpEvent`, `NeighboringRelation.REPLACE_ONE`). Replacing
one client's clipped update moves the sum by up to 2C, so the Gaussian event of
that accountant gets noise multiplier z/2. Its PLD accountant has no event for
fixed-size sampling; `accountant="pld"` composes the Gaussian mechanism without
amplification by sampling (it doubles the sensitivity for REPLACE_ONE itself):
exact when every client takes part each round (m = N), an upper bound otherwise.

Weights: the DP mean is the unweighted mean over the m sampled clients (the
fixed-denominator estimator of McMahan et al. with equal weights); example-count
weights would make the sensitivity depend on the largest client.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.aggregators import (Aggregator, ClientTransform, ServerTransform, mean_over_clients,
                                    no_state)
from fedjax_sim.checks import is_concrete

ACCOUNTANTS = ("rdp", "pld")

# The clipping norm and noise multiplier may be traced (a sweep builds the aggregator
# inside its program): their host checks run on concrete values only, and `fs.sweep`
# validates one concrete configuration before compiling.


def _finite_number(value) -> bool:
  """A real scalar (a Python or NumPy number, or a concrete 0-d array), finite."""
  if isinstance(value, bool) or np.ndim(value) != 0:
    return False
  v = np.asarray(value)
  return np.issubdtype(v.dtype, np.number) and bool(np.isfinite(v))


def _check_clip(clip_norm) -> None:
  if is_concrete(clip_norm) and not (_finite_number(clip_norm) and clip_norm > 0):
    raise ValueError(f"clipping norm must be a positive number, got {clip_norm!r}")


def _check_noise(noise_multiplier) -> None:
  if is_concrete(noise_multiplier) and not (_finite_number(noise_multiplier)
                                            and noise_multiplier >= 0):
    raise ValueError(f"noise multiplier must be a number >= 0, got {noise_multiplier!r}")


def clip_updates(deltas, clip_norm):
  """Scales each client's update (stacked, leading axis) to L2 norm at most `clip_norm`,
  in float32 whatever the leaves' dtype (bfloat16's rounding would leave norms above
  the bound, and the clipping norm is a float32 array in DP's state).

  Returns:
    (clipped deltas in float32, norms [C] before clipping).
  """
  deltas = jax.tree_util.tree_map(lambda d: d.astype(jnp.float32), deltas)
  clip = optax.clip_by_global_norm(clip_norm)
  clipped = jax.vmap(lambda d: clip.update(d, optax.EmptyState())[0])(deltas)
  return clipped, jax.vmap(optax.tree.norm)(deltas)


def _like(tree, reference):
  """`tree`'s leaves cast to the dtypes of `reference`'s."""
  return jax.tree_util.tree_map(lambda a, r: a.astype(r.dtype), tree, reference)


def clip(clip_norm: float) -> ClientTransform:
  """Per-client L2 clipping of updates to norm `clip_norm` (optax's global-norm clip),
  in float32 (bfloat16 updates come back as float32, so the bound holds exactly).

  Also the norm bounding defence against model poisoning (Sun et al. 2019,
  `robust.norm_bound`). Metrics: `clipped_fraction`, `mean_client_norm` (before), over
  the clients whose update counts (`aggregators.mean_over_clients`).
  """
  _check_clip(clip_norm)

  def apply(state, deltas, weights, ids, key):
    del ids, key
    clipped, norms = clip_updates(deltas, clip_norm)
    metrics = {"clipped_fraction": mean_over_clients(norms > clip_norm, weights),
               "mean_client_norm": mean_over_clients(norms, weights)}
    return clipped, weights, state, metrics

  return ClientTransform(no_state, apply)


def normal_like(key: jax.Array, tree):
  """Standard normal noise shaped like `tree`: one draw of all its coordinates, split
  over the leaves in tree order. (optax.tree.random_like draws per leaf; on XLA:CPU
  every random op adds about half a second of compile time.)"""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  sizes = [int(np.prod(leaf.shape)) for leaf in leaves]
  draw = jax.random.normal(key, (sum(sizes),), jnp.float32)
  parts = jnp.split(draw, np.cumsum(sizes)[:-1])
  return jax.tree_util.tree_unflatten(
      treedef, [p.reshape(leaf.shape).astype(leaf.dtype) for p, leaf in zip(parts, leaves)])


def gaussian_noise(stddev: float) -> ServerTransform:
  """Adds N(0, stddev^2) to every coordinate of the aggregated update.

  Not DP by itself (the sensitivity depends on what came before); with norm
  bounding it is the "weak DP" defence of Sun et al. 2019. For DP-FedAvg use
  `dp_mean`, which ties the noise to the clipping norm.
  """
  _check_noise(stddev)

  def apply(state, delta, key):
    noise = normal_like(key, delta)
    return jax.tree_util.tree_map(lambda d, n: d + stddev * n, delta, noise), state, {}

  return ServerTransform(no_state, apply)


class AdaptiveClipping(NamedTuple):
  """Andrew et al. 2021: C <- C * exp(-learning_rate * (b - target_quantile)), where b is
  the noisy fraction of clients whose update norm was at most C.

  count_stddev: std of the noise on the count of unclipped clients; None is the
  paper's clients_per_round / 20.
  """

  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_stddev: float | None = None


def count_stddev(adaptive: AdaptiveClipping, clients_per_round: int) -> float:
  return (adaptive.count_stddev if adaptive.count_stddev is not None
          else clients_per_round / 20.0)


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
  """Andrew et al. 2021, Thm. 1: the update's share z_delta of a total multiplier z
  when the count of unclipped clients gets noise `count_noise`:
  z_delta = (z^-2 - (2 count_noise)^-2)^(-1/2), so that together they spend z."""
  if noise_multiplier == 0:
    return 0.0
  if not count_noise > 0:
    raise ValueError(f"adaptive clipping with noise (noise_multiplier {noise_multiplier:g}) "
                     f"needs count noise > 0, got count_stddev {count_noise!r}: the count of "
                     f"unclipped clients is released too")
  rest = noise_multiplier ** -2 - (2.0 * count_noise) ** -2
  if rest <= 0:
    raise ValueError(
        f"adaptive clipping: the count noise (stddev {count_noise:g}) must exceed "
        f"noise_multiplier / 2 = {noise_multiplier / 2:g}, or it alone spends more privacy "
        f"than the total; raise count_stddev or clients_per_round")
  return rest ** -0.5


class DPState(NamedTuple):
  """Arrays, so that a sweep can set them in the ServerState without recompiling."""

  clip_norm: jax.Array         # the clipping norm the next round uses
  noise_multiplier: jax.Array  # z (the total with adaptive clipping, where it must stay
                               # below 2 x the count noise: checked only at construction)


# When the noise drowns the signal: the DP mean adds noise of standard deviation z*C/m to
# every coordinate of the averaged update (z the noise multiplier, C the clipping norm, m
# the clients per round), while C bounds the L2 norm of the whole clipped average. Above
# NOISE_RATIO_LIMIT * C (z/m > 0.1) a run is warned. Measured (benchmarks/results/
# privacy_epsilon.json, logistic regression on Synthetic-IID, 100 rounds): z/m = 0.08
# reaches test accuracy 0.75 against 0.82 without noise, 0.16 reaches 0.64; the default
# task's 10 of 30 clients calibrated to epsilon 4 (z = 16, z/m = 1.6) ended below chance.
NOISE_RATIO_LIMIT = 0.1


class DPNoiseWarning(UserWarning):
  """The DP noise on the averaged update dwarfs the clipped signal (`noise_warning`)."""


def noise_warning(noise_multiplier, clients_per_round: int,
                  num_clients: int | None = None,
                  adaptive: AdaptiveClipping | None = None) -> str | None:
  """The warning for DP noise that dwarfs the clipped updates, or None.

  The rule: the noise on the averaged update has standard deviation z*C/m per
  coordinate; warn when that is above `NOISE_RATIO_LIMIT` * C (z/m > 0.1), and say how
  many clients per round would bring it to 0.1 * C at this z (ceil(10 z)). Under
  `adaptive` clipping the update's noise is z_delta's (`update_noise_multiplier`),
  larger than the total z.
  """
  if not is_concrete(noise_multiplier) or not noise_multiplier > 0:
    return None
  total, m, name = float(noise_multiplier), int(clients_per_round), "z"
  z = total
  if adaptive is not None:
    z, name = update_noise_multiplier(total, count_stddev(adaptive, m)), "z_delta"
  ratio = z / m
  if ratio <= NOISE_RATIO_LIMIT:
    return None
  needed = math.ceil(z / NOISE_RATIO_LIMIT - 1e-9)
  if adaptive is not None:
    # z_delta itself shrinks with more clients (their count noise, m/20 by default, grows):
    # the first m at which the rule passes, at most the bound above.
    def passes(k):
      try:
        return update_noise_multiplier(total, count_stddev(adaptive, k)) / k <= NOISE_RATIO_LIMIT
      except ValueError:  # count noise too small for this z at k
        return False
    needed = next((k for k in range(m + 1, needed) if passes(k)), needed)
  text = (f"the DP noise dwarfs the clipped updates: the noise on the averaged update has "
          f"standard deviation {name}*C/m = {z:.4g}*C/{m} = {ratio:.3g}*C per coordinate, while the "
          f"clipping norm C bounds the norm of the whole averaged update; the rule: warn above "
          f"{NOISE_RATIO_LIMIT:g}*C ({name}/m > {NOISE_RATIO_LIMIT:g}), where a model learns "
          f"little. {needed} clients per round would bring it to {NOISE_RATIO_LIMIT:g}*C at this "
          f"noise multiplier")
  if num_clients is not None and needed > num_clients:
    text += f", more than the {num_clients} clients there are"
  return text + "."


def dp_mean(clip_norm: float, noise_multiplier: float, *,
            adaptive: AdaptiveClipping | None = None) -> Aggregator:
  """DP-FedAvg's reducer: clip each update, sum, add N(0, (z C)^2), divide by m.

  Args:
    clip_norm: C, the L2 clipping norm (the initial one with adaptive clipping).
    noise_multiplier: z, noise standard deviation over C; 0 clips without noise.
      With adaptive clipping it is the total: the update gets z_delta (see
      `update_noise_multiplier`) and the count of unclipped clients the rest.
    adaptive: AdaptiveClipping to track a quantile of the update norms.

  Returns:
    An Aggregator (ignoring the example weights: see the module docstring) with
    metrics `clip_norm` (used this round), `clipped_fraction` and
    `noise_stddev` (of the mean's coordinates). `clipped_fraction` is a diagnostic
    of the simulation: a real server sees only the noisy count. Its `validate`, given
    the data's number of clients (by `fs.run`, `fs.sweep`), warns (`DPNoiseWarning`)
    when the noise dwarfs the clipped signal (`noise_warning`: z/m > 0.1).
  """
  _check_clip(clip_norm)
  _check_noise(noise_multiplier)
  if adaptive is not None:
    if not 0.0 < adaptive.target_quantile < 1.0:
      raise ValueError(f"adaptive target_quantile must lie in (0, 1), got "
                       f"{adaptive.target_quantile!r}")
    if not adaptive.learning_rate > 0:
      raise ValueError(f"adaptive learning_rate must be > 0, got {adaptive.learning_rate!r}")
    if adaptive.count_stddev is not None:
      _check_noise(adaptive.count_stddev)

  def init(params, num_clients):
    del params, num_clients
    return DPState(jnp.asarray(clip_norm, jnp.float32), jnp.asarray(noise_multiplier, jnp.float32))

  def validate(clients_per_round, num_clients=None):
    if adaptive is not None and is_concrete(noise_multiplier) and noise_multiplier > 0:
      update_noise_multiplier(noise_multiplier, count_stddev(adaptive, clients_per_round))
    if num_clients is not None:  # against the data (not at construction): warned once per run
      message = noise_warning(noise_multiplier, clients_per_round, num_clients, adaptive)
      if message is not None:
        warnings.warn(message, DPNoiseWarning, stacklevel=2)

  def aggregate(state, deltas, weights, ids, key):
    del weights, ids
    m = jax.tree_util.tree_leaves(deltas)[0].shape[0]
    c, z = state.clip_norm, state.noise_multiplier
    if adaptive is not None:  # update_noise_multiplier, on arrays
      sigma_b = count_stddev(adaptive, m)
      rest = jnp.maximum(z, 1e-30) ** -2 - ((2.0 * sigma_b) ** -2 if sigma_b > 0 else math.inf)
      z = jnp.where(z > 0, jnp.where(rest > 0, rest, jnp.nan) ** -0.5, 0.0)
    noise_key, count_key = jax.random.split(key)
    clipped, norms = clip_updates(deltas, c)
    total = jax.tree_util.tree_map(lambda d: jnp.sum(d, axis=0), clipped)
    noise = normal_like(noise_key, total)
    # summed and noised in float32 (what the sensitivity bound is of), then cast back
    delta = _like(jax.tree_util.tree_map(lambda s, n: (s + z * c * n) / m, total, noise),
                  jax.tree_util.tree_map(lambda d: d[0], deltas))
    new_state = state
    if adaptive is not None:
      unclipped = jnp.sum(norms <= c) + count_stddev(adaptive, m) * jax.random.normal(count_key)
      fraction = unclipped / m
      new_state = state._replace(clip_norm=c * jnp.exp(
          -adaptive.learning_rate * (fraction - adaptive.target_quantile)))
    metrics = {"clip_norm": c, "clipped_fraction": jnp.mean(norms > c),
               "noise_stddev": z * c / m}
    return delta, new_state, metrics

  return Aggregator(init, aggregate, validate, ignores_weights=True,
                    distinct_clients=True)


# ---------------------------------------------------------------------------------------
# Accounting (host side, with dp-accounting).


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # an optional dependency
    raise ImportError("privacy accounting needs dp-accounting: pip install "
                      "'fedjax_sim[privacy]' (or dp-accounting)") from e
  return dp_accounting


def _check_accounting(noise_multiplier, clients_per_round, num_clients, delta, accountant):
  _check_noise(noise_multiplier)
  if not (isinstance(num_clients, int) and num_clients > 0):
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if not (isinstance(clients_per_round, int) and 0 < clients_per_round <= num_clients):
    raise ValueError(f"clients_per_round must be an integer in [1, num_clients={num_clients}], "
                     f"got {clients_per_round!r}")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def round_event(noise_multiplier: float, clients_per_round: int, num_clients: int,
                accountant: str = "rdp"):
  """The dp-accounting event of one DP-FedAvg round, for `accountant`.

  rdp: `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`
  (REPLACE_ONE; sensitivity 2C). pld: `GaussianDpEvent(z)` (its REPLACE_ONE
  accounts for the doubled sensitivity; no amplification by sampling).
  """
  dpa = _dp_accounting()
  if accountant == "pld":
    return dpa.GaussianDpEvent(noise_multiplier)
  return dpa.SampledWithoutReplacementDpEvent(
      num_clients, clients_per_round, dpa.GaussianDpEvent(noise_multiplier / 2.0))


def make_accountant(accountant: str = "rdp", *, orders=None, pld_discretization: float = 1e-3):
  """A fresh dp-accounting accountant with the REPLACE_ONE relation.

  Args:
    accountant: 'rdp' or 'pld'.
    orders: RDP orders (None: dp-accounting's defaults; fewer orders are faster and
      give a slightly larger epsilon).
    pld_discretization: the PLD's value discretization interval (an upper bound on
      epsilon either way; smaller is slower).
  """
  dpa = _dp_accounting()
  relation = dpa.NeighboringRelation.REPLACE_ONE
  if accountant == "pld":
    return dpa.pld.PLDAccountant(relation, value_discretization_interval=pld_discretization)
  return dpa.rdp.RdpAccountant(orders, neighboring_relation=relation)


class DPAccountant:
  """The privacy spent by DP-FedAvg after each round, at a fixed delta.

  Use `epsilon(rounds)`, or pass the object to `runner.run(..., round_metrics=...)`
  to get `epsilon` in every round's metrics.

  Args:
    noise_multiplier: z (the total, with adaptive clipping).
    clients_per_round: m, sampled uniformly without replacement each round.
    num_clients: N.
    delta: the target delta (e.g. below 1 / N).
    accountant: 'rdp' (amplification by sampling; default) or 'pld' (see the
      module docstring).
    orders: RDP orders (None: dp-accounting's defaults).
  """

  def __init__(self, noise_multiplier: float, clients_per_round: int, num_clients: int,
               delta: float, accountant: str = "rdp", orders=None):
    _check_accounting(noise_multiplier, clients_per_round, num_clients, delta, accountant)
    self.noise_multiplier, self.delta, self.accountant = noise_multiplier, delta, accountant
    self.orders = orders
    self.clients_per_round, self.num_clients = clients_per_round, num_clients
    self._event = round_event(noise_multiplier, clients_per_round, num_clients, accountant)
    self._rdp_one_round = None

  def epsilon(self, rounds: int) -> float:
    """Epsilon at `self.delta` after `rounds` rounds."""
    if rounds <= 0:
      return 0.0
    if self.noise_multiplier == 0:
      return math.inf
    if self.accountant == "rdp":
      return self._rdp_epsilon(rounds)
    return self._pld_epsilon(rounds)

  def _rdp_epsilon(self, rounds: int) -> float:
    # RDP composes by addition: compose one round once, then scale (what the accountant's
    # own compose(event, count) does), instead of recomputing the subsampled RDP per round.
    dpa = _dp_accounting()
    if self._rdp_one_round is None:
      acc = make_accountant("rdp", orders=self.orders)
      acc.compose(self._event)
      self._rdp_one_round = (np.asarray(acc.orders), np.asarray(acc.rdp))
    orders, rdp = self._rdp_one_round
    return float(dpa.rdp.compute_epsilon(orders, rounds * rdp, self.delta)[0])

  @functools.lru_cache(maxsize=None)
  def _pld_epsilon(self, rounds: int) -> float:
    acc = make_accountant("pld")
    acc.compose(self._event, rounds)
    return float(acc.get_epsilon(self.delta))

  def check(self, data, algorithm=None) -> None:
    """Raises ValueError if the accountant's N is not the training data's number of
    clients, or its m not the algorithm's clients_per_round (`runner.run` calls it
    before compiling): epsilon would be another run's. Its z is the caller's to match to
    the algorithm's `dp_mean`."""
    if self.num_clients != data.num_clients:
      raise ValueError(f"the DPAccountant counts num_clients={self.num_clients} but the "
                       f"training data has {data.num_clients} clients: its epsilon would "
                       f"be another run's")
    per_round = getattr(algorithm, "clients_per_round", None)
    if per_round is not None and per_round != self.clients_per_round:
      raise ValueError(f"the DPAccountant counts clients_per_round={self.clients_per_round} "
                       f"but the algorithm aggregates {per_round} a round: its epsilon would "
                       f"be another run's")

  def __call__(self, round_number: int) -> dict[str, float]:
    """Metrics of round `round_number` (rounds done so far): {'epsilon': ...}."""
    return {"epsilon": self.epsilon(round_number)}

  def max_rounds(self, target_epsilon: float, limit: int = 100_000) -> int:
    """The most rounds whose epsilon stays within `target_epsilon` (up to `limit`)."""
    if not target_epsilon > 0:
      raise ValueError(f"target epsilon must be > 0, got {target_epsilon!r}")
    if self.epsilon(1) > target_epsilon:
      return 0
    # Doubling then bisection: epsilon(lo) <= target < epsilon(hi). Large round counts
    # are expensive for the PLD accountant, so never ask for more than needed.
    lo, hi = 1, 2
    while hi <= limit and self.epsilon(hi) <= target_epsilon:
      lo, hi = hi, 2 * hi
    if hi > limit:
      if self.epsilon(limit) <= target_epsilon:
        return limit
      hi = limit
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self.epsilon(mid) <= target_epsilon else (lo, mid)
    return lo


def calibrate_noise_multiplier(target_epsilon: float, *, rounds: int, clients_per_round: int,
                               num_clients: int, delta: float, accountant: str = "rdp",
                               orders=None, tol: float = 1e-3) -> float:
  """The noise multiplier z whose epsilon after `rounds` rounds is at most
  `target_epsilon`, within `tol` of the smallest such (dp-accounting's
  `calibrate_dp_mechanism`)."""
  _check_accounting(1.0, clients_per_round, num_clients, delta, accountant)
  if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
    # inf halved the multiplier to 0 for a minute, then failed inside dp-accounting
    raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
  if not (isinstance(rounds, int) and rounds > 0):
    raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
  dpa = _dp_accounting()

  def event(z):
    return dpa.SelfComposedDpEvent(
        round_event(z, clients_per_round, num_clients, accountant), rounds)

  def epsilon(z):
    acc = make_accountant(accountant, orders=orders)
    acc.compose(event(z))
    return acc.get_epsilon(delta)

  # Bracket the answer by doubling or halving from 1: tiny multipliers would make the
  # PLD accountant build enormous distributions (as its own bracket search does).
  lo, hi = 1.0, 1.0
  if epsilon(1.0) > target_epsilon:
    while epsilon(hi) > target_epsilon:
      lo, hi = hi, 2 * hi
  else:
    while epsilon(lo) <= target_epsilon:
      lo, hi = lo / 2, lo
  # It returns a point within tol of the boundary, on its private side.
  return float(dpa.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, orders=orders), event, target_epsilon, delta,
      bracket_interval=dpa.ExplicitBracketInterval(lo, hi), tol=tol))
