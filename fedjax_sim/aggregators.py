"""Aggregators: how the server turns the stacked client updates of a round into one.

An `Aggregator` is a pair of pure functions, as an optax transformation is:
`init(params, num_clients) -> state` and
`aggregate(state, deltas, weights, ids, key) -> (delta, state, metrics)`, where
`deltas` is a pytree whose leaves have a leading axis over the C sampled clients,
`weights [C]` are their aggregation weights (example counts or ones), and `ids [C]`
their client ids (for per-client state such as error feedback). `fedavg` without
an aggregator uses the weighted mean below through a fused path that never stacks
all C updates (so chunked rounds keep only one chunk alive); any other aggregator
sees the stacked updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import weighted_sum

Params = Any


class Aggregator(NamedTuple):
  init: Callable[[Params, int], Any]
  aggregate: Callable[[Any, Params, jax.Array, jax.Array, jax.Array],
                      tuple[Params, Any, dict]]


def mean() -> Aggregator:
  """The weighted mean sum_c w_c delta_c / sum_c w_c (FedAvg's aggregation)."""

  def init(params, num_clients):
    del params, num_clients
    return None

  def aggregate(state, deltas, weights, ids, key):
    del ids, key
    total = weighted_sum(weights, deltas)
    return jax.tree_util.tree_map(lambda d: d / jnp.sum(weights), total), state, {}

  return Aggregator(init, aggregate)
