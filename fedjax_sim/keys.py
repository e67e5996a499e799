"""Every random-key derivation of a synchronous round, in one table.

A round splits the state's key into (next state key, sampling key, training key).
Everything else is folded from those two round keys with a tag of its own, so no two
consumers ever share a key, and a client's keys depend on its id, not its position in
the round, so chunking and sharding cannot change them:

| consumer                               | key                                            |
| -------------------------------------- | ---------------------------------------------- |
| the next round                         | split(state.key)[0]                            |
| client sampling                        | split(state.key)[1] = sample_key               |
| local training of client i             | fold_in(train_key, i)                          |
|   its epoch e                          | fold_in(fold_in(train_key, i), e), e < 2**31-1 |
| data transform of client i (poisoning) | fold_in(fold_in(train_key, i), 2**31 - 1)      |
| the aggregator chain                   | fold_in(sample_key, 1)                         |
| systems draws (response, stragglers)   | fold_in(sample_key, 2)                         |
| second local training (Ditto, FedRep)  | fold_in(fold_in(sample_key, 3), i)             |
| FedBuff's dispatch draw at arrival e   | fold_in(fold_in(sample_key, 4), e)             |
"""

from __future__ import annotations

import jax
import numpy as np

AGGREGATION_TAG = 1
SYSTEMS_TAG = 2
SECOND_TRAINING_TAG = 3
ARRIVAL_TAG = 4
# Local training folds small epoch numbers into a client's key; this one is out of their way.
DATA_TAG = 0x7FFFFFFF


def check_key(key, where: str) -> None:
  """Raises ValueError unless `key` is one jax random key: `jax.random.key(seed)`, or a
  legacy raw key (`jax.random.PRNGKey(seed)`: uint32 of any implementation's length,
  as jax or numpy). An int failed later, while tracing."""
  dtype = getattr(key, "dtype", None)
  typed = (dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
           and key.shape == ())
  raw = dtype == np.uint32 and np.ndim(key) == 1
  if not (typed or raw):
    raise ValueError(f"{where}: key must be one jax random key (jax.random.key(seed)), got "
                     f"{key!r}")


def round_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits a round's key into (next state key, sampling key, training key)."""
  next_key, sample_key, train_key = jax.random.split(key, 3)
  return next_key, sample_key, train_key


def client_key(train_key: jax.Array, client_id: jax.Array) -> jax.Array:
  """A client's training key, from its id."""
  return jax.random.fold_in(train_key, client_id)


def client_data_key(train_key: jax.Array, client_id: jax.Array) -> jax.Array:
  """The key a `client_data_transform` (e.g. a data-poisoning attack) gets for a client."""
  return jax.random.fold_in(client_key(train_key, client_id), DATA_TAG)


def aggregation_key(sample_key: jax.Array) -> jax.Array:
  """The aggregator chain's key for a round."""
  return jax.random.fold_in(sample_key, AGGREGATION_TAG)


def systems_key(sample_key: jax.Array) -> jax.Array:
  """The key of a round's system draws (who responds, who straggles, how much work)."""
  return jax.random.fold_in(sample_key, SYSTEMS_TAG)


def arrival_key(sample_key: jax.Array) -> jax.Array:
  """The round key of FedBuff's dispatch draws; arrival e's is `fold_in(it, e)`."""
  return jax.random.fold_in(sample_key, ARRIVAL_TAG)


def second_train_key(sample_key: jax.Array) -> jax.Array:
  """The round key of a second local training (Ditto's personal steps, FedRep's head
  steps); a client's key is `client_key(second_train_key(sample_key), id)`."""
  return jax.random.fold_in(sample_key, SECOND_TRAINING_TAG)
