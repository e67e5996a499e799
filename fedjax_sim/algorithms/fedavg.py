"""Federated Averaging and FedOpt as one pure round function.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization"
(FedOpt: any server optimizer applied to the pseudo-gradient).

`fedavg(...)` returns a `FederatedAlgorithm(init, round, validate)`, as optax returns
`(init, update)`: `round(state, data)` samples clients on the device, trains them
all at once (vmap over clients around a scan over local steps, optionally in chunks
of clients to bound memory), averages their deltas and applies the server
optimizer, all inside one traceable function that the runner scans over rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, check_labels,
                                       client_key, round_keys, sample_clients, weighted_sum)
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy

Params = Any


def fedavg(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    weighting: str = "examples",
    client_chunk_size: int | None = None,
    loss: local.PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """FedAvg / FedOpt.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_optimizer: optax optimizer for local training (fresh state each round).
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD with
      learning rate 1, which is plain FedAvg (see `optimizers.server_optimizer`).
    clients_per_round: clients sampled each round (uniformly, without replacement).
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one).
    weighting: 'examples' (each delta weighted by the client's example count) or
      'uniform'.
    client_chunk_size: train this many clients at a time (a divisor of
      clients_per_round) to bound memory; None trains all at once.
    loss: per-example loss; default softmax cross-entropy on integer labels.

  Returns:
    FederatedAlgorithm(init, round, validate).
  """
  local.check_schedule(batch_size, epochs, steps)
  if not isinstance(clients_per_round, int) or clients_per_round <= 0:
    raise ValueError(f"clients_per_round must be a positive integer, got {clients_per_round!r}")
  if weighting not in ("examples", "uniform"):
    raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
  chunk = clients_per_round if client_chunk_size is None else client_chunk_size
  if not isinstance(chunk, int) or chunk <= 0 or clients_per_round % chunk:
    raise ValueError(f"client_chunk_size={client_chunk_size!r} must be a positive divisor of "
                     f"clients_per_round={clients_per_round}")
  server_optimizer = server_optimizer or optax.sgd(1.0)
  loss = loss or cross_entropy(apply)
  local_update = local.make_local_update(loss, client_optimizer, batch_size=batch_size,
                                         epochs=epochs, steps=steps)
  train_clients = jax.vmap(local_update, in_axes=(None, 0, 0, 0, 0))

  def init(params: Params, key: jax.Array) -> ServerState:
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), key)

  def validate(state: ServerState, data: FederatedData) -> None:
    if clients_per_round > data.num_clients:
      raise ValueError(f"clients_per_round={clients_per_round} but the data has only "
                       f"{data.num_clients} clients")
    check_labels(apply, state.params, data)

  def train_chunk(params, data, ids, train_key):
    """Trains the clients `ids`; returns their weighted delta sum and per-client stats."""
    counts = data.counts[ids]
    keys = jax.vmap(client_key, in_axes=(None, 0))(train_key, ids)
    result = train_clients(params, data.x[ids], data.y[ids], counts, keys)
    weights = counts.astype(jnp.float32) if weighting == "examples" else jnp.ones(len(ids))
    return weighted_sum(weights, result.delta), weights.sum(), result.loss_sum, result.num_trained

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    if clients_per_round > data.num_clients:
      raise ValueError(f"clients_per_round={clients_per_round} but the data has only "
                       f"{data.num_clients} clients")
    next_key, sample_key, train_key = round_keys(state.key)
    ids = sample_clients(sample_key, data.num_clients, clients_per_round)
    if chunk == clients_per_round:
      delta_sum, weight_sum, loss_sum, num_trained = train_chunk(state.params, data, ids, train_key)
    else:
      # A scan over chunks keeps only one chunk of client models alive at a time.
      def body(acc, chunk_ids):
        d, w, l, n = train_chunk(state.params, data, chunk_ids, train_key)
        return (jax.tree_util.tree_map(jnp.add, acc[0], d), acc[1] + w), (l, n)

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      (delta_sum, weight_sum), (loss_sum, num_trained) = jax.lax.scan(
          body, (zeros, jnp.zeros(())), ids.reshape(-1, chunk))
      loss_sum, num_trained = loss_sum.reshape(-1), num_trained.reshape(-1)
    delta = jax.tree_util.tree_map(lambda d: d / weight_sum, delta_sum)
    pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train_loss": loss_sum.sum() / jnp.maximum(num_trained.sum(), 1.0),
        "update_norm": optax.tree.norm(delta),
        "num_examples": data.counts[ids].sum(),
        "client_ids": ids,
        "client_train_loss": loss_sum / jnp.maximum(num_trained, 1.0),
    }
    return ServerState(params, opt_state, state.round + 1, next_key), metrics

  return FederatedAlgorithm(init, round, validate)
