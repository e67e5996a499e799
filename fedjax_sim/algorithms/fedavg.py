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
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, aggregation_key,
                                       check_clients_per_round, check_labels, check_round_args,
                                       client_data_key, client_key, client_weights, round_metrics,
                                       server_step, start_round, weighted_sum)
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy

if TYPE_CHECKING:
  from fedjax_sim.aggregators import Aggregator

Params = Any
# client_data_transform(x, y, n, client_id, key) -> (x, y, n): a sampled client's padded data
# before local training (data poisoning: label flipping, backdoors; see `attacks`).
ClientDataTransform = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                               tuple[jax.Array, jax.Array, jax.Array]]


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
    regularizer: local.Regularizer | None = None,
    aggregator: Aggregator | None = None,
    client_data_transform: ClientDataTransform | None = None,
    client_sharding: jax.sharding.Sharding | None = None,
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
    regularizer: `regularizer(params, global_params)` added to every local step's
      objective (FedProx's proximal term is one).
    aggregator: how client deltas are combined (see `fedjax_sim.aggregators`);
      None is the example- or uniform-weighted mean, fused so that chunked
      rounds never hold all clients' deltas at once.
    client_data_transform: optional `(x, y, n, client_id, key) -> (x, y, n)`
      applied to each sampled client's padded data before local training.
    client_sharding: a sharding for arrays with a leading client axis, e.g.
      `NamedSharding(mesh, P("clients"))` (see `fedjax_sim.sharding`): each device
      trains its share of a chunk's clients and the weighted mean becomes a
      cross-device reduction. State and data must live on the same mesh.

  Returns:
    FederatedAlgorithm(init, round, validate).
  """
  local.check_schedule(batch_size, epochs, steps)
  check_round_args(clients_per_round, weighting, client_chunk_size)
  chunk = clients_per_round if client_chunk_size is None else client_chunk_size
  if not isinstance(chunk, int) or chunk <= 0 or clients_per_round % chunk:
    raise ValueError(f"client_chunk_size={client_chunk_size!r} must be a positive divisor of "
                     f"clients_per_round={clients_per_round}")
  if getattr(aggregator, "validate", None) is not None:
    aggregator.validate(clients_per_round, None)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  loss = loss or cross_entropy(apply)
  local_update = local.make_local_update(loss, client_optimizer, batch_size=batch_size,
                                         epochs=epochs, steps=steps, regularizer=regularizer)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    """`num_clients` is needed only by aggregators that keep per-client state."""
    agg_state = None if aggregator is None else aggregator.init(params, num_clients)
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), key,
                       aggregator_state=agg_state)

  def validate(state: ServerState, data: FederatedData) -> None:
    check_clients_per_round(clients_per_round, data)
    check_labels(apply, state.params, data)
    if getattr(aggregator, "validate", None) is not None:
      aggregator.validate(clients_per_round, data.num_clients)

  def train_clients(params, data, ids, train_key):
    """Trains the clients `ids` (vmapped) and returns their stacked LocalResults."""
    def one(client_id):
      x, y, n = data.x[client_id], data.y[client_id], data.counts[client_id]
      if client_data_transform is not None:
        x, y, n = client_data_transform(x, y, n, client_id, client_data_key(train_key, client_id))
      return local_update(params, x, y, n, client_key(train_key, client_id), params)
    if client_sharding is None:
      return jax.vmap(one)(ids)
    # Constraining the ids and the results to the client axis makes GSPMD split the
    # vmapped local training over devices; reductions over it become all-reduces.
    constrain = lambda a: jax.lax.with_sharding_constraint(a, client_sharding)
    return jax.tree_util.tree_map(constrain, jax.vmap(one)(constrain(ids)))

  def mean_delta(params, data, ids, train_key):
    """Fused weighted mean: a scan over chunks keeps one chunk of client models alive."""
    def body(acc, chunk_ids):
      result = train_clients(params, data, chunk_ids, train_key)
      w = client_weights(weighting, data, chunk_ids)
      acc = (jax.tree_util.tree_map(jnp.add, acc[0], weighted_sum(w, result.delta)),
             acc[1] + w.sum())
      return acc, (result.loss_sum, result.num_trained)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (total, weight), (loss_sum, num_trained) = jax.lax.scan(
        body, (zeros, jnp.zeros(())), ids.reshape(-1, chunk))
    delta = jax.tree_util.tree_map(lambda d: d / weight, total)
    return delta, loss_sum.reshape(-1), num_trained.reshape(-1), {}

  def aggregated_delta(state, data, ids, train_key, agg_key):
    results = jax.lax.map(lambda i: train_clients(state.params, data, i, train_key),
                          ids.reshape(-1, chunk))
    results = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), results)
    delta, agg_state, metrics = aggregator.aggregate(
        state.aggregator_state, results.delta, client_weights(weighting, data, ids), ids, agg_key)
    return delta, results.loss_sum, results.num_trained, metrics, agg_state

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    next_key, ids, sample_key, train_key = start_round(state, data, clients_per_round)
    agg_state = state.aggregator_state
    if aggregator is None:
      delta, loss_sum, num_trained, agg_metrics = mean_delta(state.params, data, ids, train_key)
    else:
      delta, loss_sum, num_trained, agg_metrics, agg_state = aggregated_delta(
          state, data, ids, train_key, aggregation_key(sample_key))
    params, opt_state = server_step(server_optimizer, state, delta)
    # float32 model both ways unless a compressor (in agg_metrics) says otherwise
    metrics = {**round_metrics(loss_sum, num_trained, delta, data, ids), **agg_metrics}
    new_state = state._replace(params=params, opt_state=opt_state, round=state.round + 1,
                               key=next_key, aggregator_state=agg_state)
    return new_state, metrics

  return FederatedAlgorithm(init, round, validate)
