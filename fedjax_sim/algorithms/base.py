"""What every algorithm shares: server state, the algorithm triple, client sampling
and per-round keys, weighted sums over stacked client updates, input checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import checks, compression, keys, local
from fedjax_sim.checks import check_labels  # noqa: F401 (re-exported)
from fedjax_sim.tree import (gather_rows, scatter_rows, vmap_clients,  # noqa: F401
                             weighted_sum)  # (re-exported)
from fedjax_sim.data import FederatedData
from fedjax_sim.local import LocalResult
from fedjax_sim.losses import cross_entropy

Params = Any


class ServerState(NamedTuple):
  """The whole state of a simulation between rounds (a pytree).

  `client_states` holds per-client arrays with a leading axis over all clients
  (SCAFFOLD's control variates, FedDyn's gradients, error feedback...): a round
  gathers the sampled clients' rows and scatters them back. `algorithm_state` and
  `aggregator_state` hold server-side extras (a server control variate, an
  adaptive clipping norm...). `sim_time` is the simulated wall-clock in seconds
  when the algorithm simulates client systems (see `fedjax_sim.systems`), else None.
  `hp` holds the algorithm's numeric hyperparameters (name -> float32 scalar), read
  by every round, so they can be swept and changed between rounds (`engine.set_hparams`).
  """

  params: Params
  opt_state: optax.OptState
  round: jax.Array
  key: jax.Array
  client_states: Any = None
  algorithm_state: Any = None
  aggregator_state: Any = None
  sim_time: Any = None
  hp: Any = None


class FederatedAlgorithm(NamedTuple):
  """`init(params, key, num_clients=None) -> state` (algorithms with per-client state
  need `num_clients`); `round(state, data) -> (state, metrics)`; `validate(state, data)`
  raises ValueError on the host, before anything compiles; `hparams`: the names of the
  hyperparameters in `state.hp`; `clients_per_round`: the clients a round aggregates at
  most (FedBuff's buffer size), for host-side checks such as a DP accountant's."""

  init: Callable[..., ServerState]
  round: Callable[[ServerState, FederatedData], tuple[ServerState, dict]]
  validate: Callable[[ServerState, FederatedData], None]
  hparams: tuple = ()
  clients_per_round: int | None = None


def sample_clients(key: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
  """Client ids drawn uniformly without replacement."""
  return jax.random.choice(key, num_clients, (clients_per_round,), replace=False)


# The key derivations live in one table (fedjax_sim.keys); re-exported for old callers.
round_keys, client_key = keys.round_keys, keys.client_key
client_data_key, aggregation_key = keys.client_data_key, keys.aggregation_key


def check_clients_per_round(clients_per_round: int, data: FederatedData) -> None:
  if clients_per_round > data.num_clients:
    raise ValueError(f"clients_per_round={clients_per_round} but the data has only "
                     f"{data.num_clients} clients")


# client_chunk_size="auto" (the default) on a CPU: train a few clients at a time, so that
# their weights stay in the caches through the local steps, and a small client of a
# ragged chunk waits for fewer large ones. On a 2-core EPYC every model measured was
# fastest with chunks of about 8 MiB of weights or less; all at once took 1.15-1.25x as
# long for logistic regression and the 2NN MLP, 1.06x for the CNN, 1.72x for the CNN on
# ragged clients (benchmarks/results/chunk_size_cpu.md). Accelerators want the widest batch.
CPU_CHUNK_BYTES = 8 * 2**20
CPU_MAX_CHUNK = 10


def resolve_chunk_size(chunk_size: int | str | None, num_clients: int,
                       params: Params) -> int | None:
  """The clients trained at a time for `client_chunk_size=chunk_size`.

  An int or None (all at once) is returned as is. "auto" is None on accelerators
  and, on a CPU, the largest divisor of `num_clients` not above `CPU_MAX_CHUNK`
  whose chunk of models fits in `CPU_CHUNK_BYTES` (at least 1).
  """
  if chunk_size != "auto":
    return chunk_size
  if jax.default_backend() != "cpu":
    return None
  most = max(1, min(CPU_MAX_CHUNK, CPU_CHUNK_BYTES // max(1, model_bytes(params))))
  return max(d for d in range(1, most + 1) if num_clients % d == 0)


def map_clients(fn: Callable, args: Any, chunk_size: int | None = None) -> Any:
  """Maps `fn` over the leading client axis of `args`: one vmap, or `chunk_size`
  clients at a time (a lax.map of vmaps) to bound the memory of training."""
  num = jax.tree_util.tree_leaves(args)[0].shape[0]
  if chunk_size is None or chunk_size >= num:
    return vmap_clients(fn, args)
  if chunk_size == 1:  # a scan over the clients, without a vmap of size 1
    return jax.lax.map(fn, args)
  return jax.lax.map(fn, args, batch_size=chunk_size)


def model_bytes(params: Params) -> int:
  """Bytes of one model or update as stored (4 per float32 parameter): what goes on the
  wire each way per client when nothing is compressed."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(params))


def upload_bytes(aggregator: Any, upload: Params) -> float:
  """Bytes one client sends of an upload shaped like `upload`: the aggregator's
  compressor's encoding (`compression.uplink_bytes_per_client`), else the upload as
  stored (`model_bytes`)."""
  leaves = jax.tree_util.tree_leaves(upload)
  num = sum(int(np.prod(np.shape(a))) for a in leaves if np.ndim(a))
  coded = (None if aggregator is None else compression.uplink_bytes_per_client(
      aggregator, num, sum(1 for a in leaves if not np.ndim(a))))
  return float(model_bytes(upload) if coded is None else coded)


def check_model_and_data(apply, params, data: FederatedData) -> None:
  """Raises ValueError, naming both sides, if the model cannot take `data`'s examples, its
  outputs do not fit the labels, or the features or parameters hold NaN or inf
  (`fedjax_sim.checks`)."""
  check_labels(apply, params, data)
  checks.check_finite_features(data)
  checks.check_finite_params(params, "the state's model parameters")


# --- Pieces shared by the round engine and FedBuff's event driver. ---

WEIGHTINGS = ("examples", "uniform")


def check_round_args(clients_per_round: int, weighting: str,
                     client_chunk_size: int | str | None) -> None:
  """Raises ValueError for a bad value of the arguments every algorithm factory shares."""
  if not checks.is_count(clients_per_round):
    raise checks.count_error("clients_per_round", clients_per_round)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
  if client_chunk_size not in (None, "auto") and not checks.is_count(client_chunk_size):
    raise ValueError(f"client_chunk_size must be a positive integer, None or 'auto', got "
                     f"{client_chunk_size!r}")


class RoundDraws(NamedTuple):
  """A round's random draws: the next state key, the sampled ids, the keys they came from."""

  next_key: jax.Array
  ids: jax.Array
  sample_key: jax.Array
  train_key: jax.Array


def start_round(state: ServerState, data: FederatedData, clients_per_round: int) -> RoundDraws:
  """Splits the round's key and samples its clients, as `fedavg` does."""
  check_clients_per_round(clients_per_round, data)
  next_key, sample_key, train_key = round_keys(state.key)
  ids = sample_clients(sample_key, data.num_clients, clients_per_round)
  return RoundDraws(next_key, ids, sample_key, train_key)


def client_weights(weighting: str, counts: jax.Array) -> jax.Array:
  """Aggregation weights of clients with example `counts`: the counts, or one for each
  client with examples (one without takes no part)."""
  if weighting == "examples":
    return counts.astype(jnp.float32)
  return (counts > 0).astype(jnp.float32)


def server_step(optimizer: optax.GradientTransformation, state: ServerState,
                delta: Params) -> tuple[Params, optax.OptState]:
  """FedOpt's server update: `optimizer` applied to the pseudo-gradient -delta."""
  pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
  updates, opt_state = optimizer.update(pseudo_grad, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def mean_loss(loss_sum: jax.Array, num_trained: jax.Array) -> jax.Array:
  """The round's mean training loss over every example trained, from per-client sums;
  NaN where no client trained (every one dropped): no loss was measured, and a 0 would
  plot as a perfect round. The runner does not count that NaN as divergence."""
  total = num_trained.sum()
  return jnp.where(total > 0, loss_sum.sum() / jnp.maximum(total, 1.0), jnp.nan)


def client_losses(loss_sum: jax.Array, num_trained: jax.Array) -> jax.Array:
  """Each client's mean training loss [C]; NaN for a client that trained on nothing
  (no examples, or dropped before its first step), as `mean_loss` for a round."""
  return jnp.where(num_trained > 0, loss_sum / jnp.maximum(num_trained, 1.0), jnp.nan)


def round_metrics(loss_sum: jax.Array, num_trained: jax.Array, delta: Params,
                  data: FederatedData, ids: jax.Array, models_up: int = 1,
                  models_down: int = 1) -> dict:
  """The metrics every algorithm reports, from the clients' LocalResult sums [C] and
  the round's update.

  `models_up`/`models_down` count the model-sized float32 vectors each client sends
  and receives per round (SCAFFOLD: 2 each way), for `uplink_bytes`/`downlink_bytes`.
  """
  per_model = ids.shape[0] * model_bytes(delta)
  return {
      "train_loss": mean_loss(loss_sum, num_trained),
      "update_norm": optax.tree.norm(delta),
      "num_examples": data.counts[ids].sum(),
      "client_ids": ids,
      "client_train_loss": client_losses(loss_sum, num_trained),
      "uplink_bytes": jnp.float32(models_up * per_model),
      "downlink_bytes": jnp.float32(models_down * per_model),
  }


def init_client_states(tree: Params, num_clients: int | None, algorithm: str) -> Params:
  """`tree` repeated on a new leading axis over all `num_clients` clients."""
  if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
    raise ValueError(f"{algorithm} keeps state per client: call init(params, key, num_clients) "
                     f"with the number of clients in the data, got num_clients={num_clients!r}")
  return jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(a, (int(num_clients), *jnp.shape(a))).copy(), tree)


def check_client_states(state: ServerState, data: FederatedData) -> None:
  """Raises ValueError if the per-client state was made for another number of clients."""
  leaves = jax.tree_util.tree_leaves(state.client_states)
  if not leaves:
    raise ValueError("this algorithm keeps state per client but the state has none; "
                     f"init with num_clients={data.num_clients}")
  if leaves[0].shape[0] != data.num_clients:
    raise ValueError(f"the state holds per-client state for {leaves[0].shape[0]} clients but "
                     f"the data has {data.num_clients}; init with num_clients={data.num_clients}")


def client_state_bytes(state: ServerState) -> int:
  """Device memory of the per-client state (all clients): e.g. SCAFFOLD's control
  variates, num_clients x the model's bytes."""
  return model_bytes(state.client_states)
