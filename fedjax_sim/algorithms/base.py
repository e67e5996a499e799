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
  """The whole state of a simulation between rounds (a pytree).

  `client_states` holds per-client arrays with a leading axis over all clients
  (SCAFFOLD's control variates, FedDyn's gradients, error feedback...): a round
  gathers the sampled clients' rows and scatters them back. `algorithm_state` and
  `aggregator_state` hold server-side extras (a server control variate, an
  adaptive clipping norm...).
  """

  params: Params
  opt_state: optax.OptState
  round: jax.Array
  key: jax.Array
  client_states: Any = None
  algorithm_state: Any = None
  aggregator_state: Any = None


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


# Local training folds small epoch numbers into a client's key; this one is out of their way.
_DATA_FOLD = 0x7FFFFFFF


def client_data_key(train_key: jax.Array, client_id: jax.Array) -> jax.Array:
  """The key a `client_data_transform` (e.g. a data-poisoning attack) gets for a client."""
  return jax.random.fold_in(client_key(train_key, client_id), _DATA_FOLD)


def aggregation_key(sample_key: jax.Array) -> jax.Array:
  """The aggregator's key for a round, independent of every client's training key."""
  return jax.random.fold_in(sample_key, 1)


def check_clients_per_round(clients_per_round: int, data: FederatedData) -> None:
  if clients_per_round > data.num_clients:
    raise ValueError(f"clients_per_round={clients_per_round} but the data has only "
                     f"{data.num_clients} clients")


def map_clients(fn: Callable, args: Any, chunk_size: int | None = None) -> Any:
  """Maps `fn` over the leading client axis of `args`: one vmap, or `chunk_size`
  clients at a time (a lax.map of vmaps) to bound the memory of training."""
  num = jax.tree_util.tree_leaves(args)[0].shape[0]
  if chunk_size is None or chunk_size >= num:
    return jax.vmap(fn)(args)
  return jax.lax.map(fn, args, batch_size=chunk_size)


def gather_rows(tree: Any, ids: jax.Array) -> Any:
  """The rows `ids` of every leaf (per-client state of the sampled clients)."""
  return jax.tree_util.tree_map(lambda a: a[ids], tree)


def scatter_rows(tree: Any, ids: jax.Array, rows: Any) -> Any:
  """`tree` with the rows `ids` of every leaf replaced by `rows`."""
  return jax.tree_util.tree_map(lambda a, r: a.at[ids].set(r), tree, rows)


def model_bytes(params: Params) -> int:
  """Bytes of one model or update as stored (4 per float32 parameter): what goes on the
  wire each way per client when nothing is compressed."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(params))


def weighted_sum(weights: jax.Array, stacked: Params) -> Params:
  """sum_c weights[c] * stacked[c] over the leading client axis of every leaf."""
  return jax.tree_util.tree_map(lambda d: jnp.tensordot(weights, d, axes=1), stacked)


def check_labels(apply, params, data: FederatedData) -> None:
  """Raises ValueError if a label is negative or not below the model's output size."""
  logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, *data.x.shape[2:]), data.x.dtype))
  num_classes = logits.shape[-1]
  y, counts = np.asarray(data.y), np.asarray(data.counts)
  real = np.arange(data.max_examples) < counts[:, None]
  # Per-token labels (extra axes) may hold IGNORE_LABEL (-1) at padded positions.
  lowest = -1 if y.ndim > 2 else 0
  bad = real.reshape(*real.shape, *([1] * (y.ndim - 2))) & ((y < lowest) | (y >= num_classes))
  if bad.any():
    i = int(np.argwhere(bad)[0, 0])
    labels = y[i, :counts[i]]
    raise ValueError(f"client {i}: labels must lie in [0, {num_classes}) for this model, "
                     f"found {labels.min()}..{labels.max()}")
