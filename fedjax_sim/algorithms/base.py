"""What every algorithm shares: server state, the algorithm triple, client sampling
and per-round keys, weighted sums over stacked client updates, input checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.data import FederatedData

Params = Any


class ServerState(NamedTuple):
  params: Params
  opt_state: optax.OptState
  round: jax.Array
  key: jax.Array


class FederatedAlgorithm(NamedTuple):
  """`init(params, key) -> state`; `round(state, data) -> (state, metrics)`;
  `validate(state, data)` raises ValueError on the host, before anything compiles."""

  init: Callable[[Params, jax.Array], ServerState]
  round: Callable[[ServerState, FederatedData], tuple[ServerState, dict]]
  validate: Callable[[ServerState, FederatedData], None]


def sample_clients(key: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
  """Client ids drawn uniformly without replacement."""
  return jax.random.choice(key, num_clients, (clients_per_round,), replace=False)


def round_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits a round's key into (next state key, sampling key, training key)."""
  next_key, sample_key, train_key = jax.random.split(key, 3)
  return next_key, sample_key, train_key


def client_key(train_key: jax.Array, client_id: jax.Array) -> jax.Array:
  """A client's key depends on its id, not its position, so chunking cannot change it."""
  return jax.random.fold_in(train_key, client_id)


def weighted_sum(weights: jax.Array, stacked: Params) -> Params:
  """sum_c weights[c] * stacked[c] over the leading client axis of every leaf."""
  return jax.tree_util.tree_map(lambda d: jnp.tensordot(weights, d, axes=1), stacked)


def check_labels(apply, params, data: FederatedData) -> None:
  """Raises ValueError if a label is negative or not below the model's output size."""
  logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, *data.x.shape[2:]), data.x.dtype))
  num_classes = logits.shape[-1]
  y, counts = np.asarray(data.y), np.asarray(data.counts)
  real = np.arange(data.max_examples) < counts[:, None]
  bad = real.reshape(*real.shape, *([1] * (y.ndim - 2))) & ((y < 0) | (y >= num_classes))
  if bad.any():
    i = int(np.argwhere(bad)[0, 0])
    labels = y[i, :counts[i]]
    raise ValueError(f"client {i}: labels must lie in [0, {num_classes}) for this model, "
                     f"found {labels.min()}..{labels.max()}")
