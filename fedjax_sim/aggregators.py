"""Aggregators: how the server turns the stacked client updates of a round into one.

An `Aggregator` is a pair of pure functions, as an optax transformation is:
`init(params, num_clients) -> state` and
`aggregate(state, deltas, weights, ids, key) -> (delta, state, metrics)`, where
`deltas` is a pytree whose leaves have a leading axis over the C sampled clients,
`weights [C]` are their aggregation weights (example counts or ones), and `ids [C]`
their client ids (for per-client state such as error feedback). `fedavg` without
an aggregator uses the weighted mean below through a fused path that never stacks
all C updates (so chunked rounds keep only one chunk alive); any other aggregator
sees the stacked updates. An optional `validate(clients_per_round, num_clients)`
raises ValueError for a configuration that cannot work (Krum with too few
clients...); `fedavg` calls it before anything compiles.

Aggregators compose with `chain(*stages)`, in the order a round runs them:

- per-client transforms (`ClientTransform`): stacked updates in, stacked updates
  out: attacks, clipping, norm bounding, compression;
- one reducer (an `Aggregator`): `mean()`, `privacy.dp_mean`, a robust one from
  `robust`, or `secure_aggregation.secure_mean`;
- server-side transforms (`ServerTransform`): one update in, one out (noise).

For example `chain(attacks.sign_flip(malicious), compression.quantize(8),
robust.coordinate_median())`. Each stage gets its own key, split from the round's
aggregation key; a per-client transform derives each client's key from it by the
client's id (`client_keys`), so a loop over clients can draw the same numbers and
chunking cannot change them. Metrics of all stages are merged; a later stage's
metric of the same name replaces an earlier one's (so the last encoder's
`uplink_bytes` is what is reported as sent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.tree import weighted_sum

Params = Any
# validate(clients_per_round, num_clients or None) -> None, raising ValueError.
Validate = Callable[[int, "int | None"], None]


# A metric a reducer may report: bool [C], the clients whose uploads its result holds
# (secure aggregation's survivors; none where it aborts). The engine takes it out of the
# metrics and counts only those clients as aggregated: their weights in the round's
# weight sum (an aborted round then leaves model and optimizer as they were), and only
# their per-client state rows change.
SURVIVORS = "_survivors"


class Aggregator(NamedTuple):
  """A reducer: `aggregate(state, deltas [C, ...], weights [C], ids [C], key)
  -> (delta, state, metrics)`.

  `weighted`: the reduction is the weights-respecting mean, so a row of weight 0 does
  not count (what `systems` needs for clients that are not aggregated). `stages`: for
  a `chain`, its stages in order; empty for a single reducer. `ignores_weights`: the
  reduction does not read the weights at all (order statistics, DP's and secure
  aggregation's plain means), so the round weighs every client with examples 1 wherever
  it reads weights (`engine.compose`). `selects_rows`: it ranks or picks rows (median,
  trimmed mean, Krum), so a zero row, a client without examples, is a vote for no
  change (a plain mean's fixed denominator counts it by design). `distinct_clients`: what
  it guarantees holds only if no client fills two rows (DP's sensitivity of one
  client's clipped update, secure aggregation's pairwise masks by id), which FedBuff's
  buffer cannot promise.
  """

  init: Callable[[Params, int], Any]
  aggregate: Callable[[Any, Params, jax.Array, jax.Array, jax.Array],
                      tuple[Params, Any, dict]]
  validate: Validate | None = None
  weighted: bool = False
  stages: tuple = ()
  ignores_weights: bool = False
  distinct_clients: bool = False
  selects_rows: bool = False


class ClientTransform(NamedTuple):
  """A per-client stage: `apply(state, deltas [C, ...], weights [C], ids [C], key)
  -> (deltas, weights, state, metrics)`.

  `wire_bits(d)`: for a compressor, the bits one client sends for a d-parameter
  update, known statically (simulated upload times in `systems`); else None.
  """

  init: Callable[[Params, int], Any]
  apply: Callable[[Any, Params, jax.Array, jax.Array, jax.Array],
                  tuple[Params, jax.Array, Any, dict]]
  validate: Validate | None = None
  wire_bits: Callable[[int], int] | None = None


class ServerTransform(NamedTuple):
  """A server-side stage on the reduced update: `apply(state, delta, key)
  -> (delta, state, metrics)`."""

  init: Callable[[Params, int], Any]
  apply: Callable[[Any, Params, jax.Array], tuple[Params, Any, dict]]
  validate: Validate | None = None


def no_state(params, num_clients):
  """`init` of a stateless stage."""
  del params, num_clients
  return None


def check(stage, clients_per_round: int, num_clients: int | None = None) -> None:
  """Runs a stage's `validate`, if it has one (ValueError on a bad configuration)."""
  validate = getattr(stage, "validate", None)
  if validate is not None:
    validate(clients_per_round, num_clients)


def mean() -> Aggregator:
  """The weighted mean sum_c w_c delta_c / sum_c w_c (FedAvg's aggregation)."""

  def aggregate(state, deltas, weights, ids, key):
    del ids, key
    total, weight = weighted_sum(weights, deltas), jnp.sum(weights)
    # no weight at all (every client without examples): a zero update, as the fused mean
    return jax.tree_util.tree_map(lambda d: d / jnp.where(weight > 0, weight, 1.0),
                                  total), state, {}

  return Aggregator(no_state, aggregate, weighted=True)


def stages_of(aggregator: Aggregator) -> tuple:
  """The stages of a `chain`, or `(aggregator,)` for a single reducer."""
  return aggregator.stages or (aggregator,)


def check_clients_have_examples(aggregator: "Aggregator | None", data) -> None:
  """Raises ValueError if no client has examples, or if a reducer that ranks or picks
  rows (`selects_rows`) would meet clients without examples: their update is zero, and
  it would count as a client's vote for no change."""
  counts = np.asarray(data.counts)
  if not counts.any():  # every round would divide by a total weight of 0
    raise ValueError("the training data has no examples: every client is empty")
  if aggregator is not None and any(getattr(s, "selects_rows", False)
                                    for s in stages_of(aggregator)):
    refuse_empty_clients(data, "the aggregator ranks or picks updates (a median, trimmed "
                               "mean or Krum), and their zero updates would count as votes "
                               "for no change")


def refuse_empty_clients(data, why: str, prefix: str = "") -> None:
  """Raises ValueError if any of `data`'s clients has no examples, saying `why` none may."""
  empty = np.flatnonzero(np.asarray(data.counts) == 0)
  if empty.size:
    raise ValueError(f"{prefix}{empty.size} of the data's clients have no examples (client "
                     f"{int(empty[0])} first): {why}. Leave them out of the training data")


def ignores_weights(aggregator: "Aggregator | None") -> bool:
  """Whether `aggregator` counts every client once (its reducer ignores the weights:
  median, Krum, DP's and secure mean...), so that a round weights its clients uniformly."""
  return aggregator is not None and any(getattr(s, "ignores_weights", False)
                                        for s in stages_of(aggregator))


def chain(*stages) -> Aggregator:
  """Composes per-client transforms, one reducer and server transforms into one Aggregator.

  Args:
    *stages: zero or more `ClientTransform`s, then exactly one `Aggregator`,
      then zero or more `ServerTransform`s.

  Returns:
    An Aggregator whose state is the tuple of the stages' states.
  """
  kinds = [type(s) for s in stages]
  reducers = [i for i, k in enumerate(kinds) if k is Aggregator]
  if len(reducers) != 1:
    raise ValueError(f"chain needs exactly one reducer (an Aggregator such as mean()), "
                     f"got {len(reducers)} among {[k.__name__ for k in kinds]}")
  r = reducers[0]
  for i, kind in enumerate(kinds):
    expected = ClientTransform if i < r else (ServerTransform if i > r else Aggregator)
    if kind is not expected:
      raise ValueError(f"chain stage {i} is a {kind.__name__}; per-client transforms come "
                       f"before the reducer and server transforms after it")

  def init(params, num_clients):
    return tuple(s.init(params, num_clients) for s in stages)

  def aggregate(state, deltas, weights, ids, key):
    keys = jax.random.split(key, len(stages))
    new_state, metrics = list(state), {}
    for i in range(r):
      deltas, weights, new_state[i], m = stages[i].apply(state[i], deltas, weights, ids, keys[i])
      metrics.update(m)
    delta, new_state[r], m = stages[r].aggregate(state[r], deltas, weights, ids, keys[r])
    metrics.update(m)
    for i in range(r + 1, len(stages)):
      delta, new_state[i], m = stages[i].apply(state[i], delta, keys[i])
      metrics.update(m)
    return delta, tuple(new_state), metrics

  def validate(clients_per_round, num_clients=None):
    for stage in stages:
      check(stage, clients_per_round, num_clients)

  return Aggregator(init, aggregate, validate,
                    weighted=stages[r].weighted, stages=tuple(stages))


def mean_over_clients(values: jax.Array, weights: jax.Array) -> jax.Array:
  """The mean of per-client `values` [C] over the clients whose update counts (weight
  > 0): a diagnostic of the round's aggregate, not diluted by the zero updates of
  clients that dropped out or missed the deadline (`systems=`) or had no examples."""
  counts = weights > 0
  return jnp.sum(jnp.where(counts, values, 0.0)) / jnp.maximum(jnp.sum(counts), 1)


def client_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """One key per client, from its id (not its position in the round). An id that comes
  again in `ids` (FedBuff's buffer may hold two updates of one fast client) gets another
  key each time, its repeat count folded in: the same key would draw the same noise."""
  by_id = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  # How many earlier rows have the same id, by a stable sort (not a [C, C] comparison).
  order = jnp.argsort(ids, stable=True)
  ranked = ids[order]
  rank = jnp.arange(ids.shape[0]) - jnp.searchsorted(ranked, ranked, side="left")
  repeat = jnp.zeros_like(rank).at[order].set(rank)
  return jnp.where(repeat > 0, jax.vmap(jax.random.fold_in)(by_id, repeat), by_id)


def stateful_client_stage(aggregator: "Aggregator | None", state: Any):
  """The first per-client transform of `aggregator` that keeps state (top-k's error
  feedback residuals) in `state` (the aggregator's), or None."""
  if aggregator is None or not aggregator.stages:
    return None  # a lone reducer has no per-client transforms
  return next((stage for stage, stage_state in zip(aggregator.stages, state)
               if isinstance(stage, ClientTransform) and jax.tree_util.tree_leaves(stage_state)),
              None)


def split_scalars(deltas: Params) -> tuple[list, list, Callable[[list, list], Params]]:
  """The stacked upload's leaves as (the update's, the scalars'), with the inverse
  `join(update_leaves, scalar_leaves)`. Scalars (one value per client) are what an
  algorithm sends beside its update: FedNova's gradient weight, q-FFL's h, FedExP's
  squared norm; a compressor codes the update and leaves them exact.

  They are told by shape alone: a model parameter of shape () counts as one too (none
  of the package's models has one), except where every leaf has that shape: then the
  upload is all update."""
  leaves, treedef = jax.tree_util.tree_flatten(deltas)
  scalar = [leaf.ndim == 1 for leaf in leaves]  # [C]: stacked 0-d values
  if all(scalar):  # a model of 0-d parameters: no update would be left to code or bound
    scalar = [False] * len(leaves)

  def join(update_leaves: list, scalar_leaves: list) -> Params:
    update_leaves, scalar_leaves = iter(update_leaves), iter(scalar_leaves)
    return jax.tree_util.tree_unflatten(
        treedef, [next(scalar_leaves) if s else next(update_leaves) for s in scalar])

  return ([leaf for leaf, s in zip(leaves, scalar) if not s],
          [leaf for leaf, s in zip(leaves, scalar) if s], join)


def ravel_clients(deltas: Params) -> tuple[jax.Array, Callable[[jax.Array], Params]]:
  """Flattens stacked updates to `[C, d]` (leaves in tree order), with the inverse.

  Compressors and robust aggregators work on each client's update as one vector,
  as the papers define them.
  """
  leaves, treedef = jax.tree_util.tree_flatten(deltas)
  num = leaves[0].shape[0]
  shapes = [leaf.shape[1:] for leaf in leaves]
  sizes = [int(np.prod(s)) for s in shapes]
  flat = jnp.concatenate([leaf.reshape(num, -1).astype(jnp.float32) for leaf in leaves], axis=1)

  def unravel(x: jax.Array) -> Params:
    """`[C, d] -> stacked pytree`, or `[d] -> one update`."""
    lead = x.shape[:-1]
    parts = jnp.split(x, np.cumsum(sizes)[:-1], axis=-1)
    out = [p.reshape(*lead, *s).astype(leaf.dtype) for p, s, leaf in zip(parts, shapes, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)

  return flat, unravel
