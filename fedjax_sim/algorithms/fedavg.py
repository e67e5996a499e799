"""Federated Averaging and FedOpt as one pure round function.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization"
(FedOpt: any server optimizer applied to the pseudo-gradient).

`fedavg(...)` returns a `FederatedAlgorithm(init, round, validate)`, as optax returns
`(init, update)`: `round(state, data)` samples clients on the device, trains them
all at once (vmap over clients around a scan over local steps, optionally in chunks
of clients to bound memory), averages their deltas and applies the server
optimizer, all inside one traceable function that the runner scans over rounds.

With `systems=SystemsConfig(...)` a round also simulates its clients' devices and
networks (`fedjax_sim.systems`): who responds, who straggles past a deadline or by
the FedProx protocol, who is kept under over-selection, and how long the round takes.
All of it is decided on the device before training, from the profiles, the clients'
example counts and the round's keys, so it only changes each client's step budget
and aggregation weight: the round stays one vectorized program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, aggregation_key,
                                       check_clients_per_round, check_labels, check_round_args,
                                       client_data_key, client_key, client_weights, round_metrics,
                                       model_bytes, resolve_chunk_size, server_step, start_round,
                                       weighted_sum)
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
    client_chunk_size: int | str | None = "auto",
    loss: local.PerExampleLoss | None = None,
    regularizer: local.Regularizer | None = None,
    aggregator: Aggregator | None = None,
    client_data_transform: ClientDataTransform | None = None,
    client_sharding: jax.sharding.Sharding | None = None,
    systems: systems_lib.SystemsConfig | None = None,
    client_data_schedule: systems_lib.ClientDataSchedule | None = None,
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
      clients_per_round) to bound memory; None trains all at once; "auto" (the
      default) is all at once on accelerators and a few clients at a time on a
      CPU, where that is faster (`base.resolve_chunk_size`).
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
    systems: a `systems.SystemsConfig`: client profiles, deadline, over-selection,
      straggler policy, dropout (see `systems.plan_round` for the exact rule). A
      round then samples clients_per_round + over_selection clients, aggregates
      the weighted mean over the clients it keeps (a zero update if none), keeps
      the simulated clock in `state.sim_time` and adds the metrics round_time_s,
      sim_time_s, num_aggregated, num_stragglers, num_dropped and per client
      client_seconds, client_aggregated, client_steps; uplink_bytes then counts
      the aggregated clients only. Downloads are the float32 model; uploads the
      float32 update, or what the aggregator's compressor sends. The aggregator's
      reducer must be the weighted mean (`systems.check_aggregator`).
    client_data_schedule: optional `(x, y, n, client_id, round) -> (x, y, n)`
      giving a client's data in a round (`systems.sliding_window`,
      `systems.label_drift`), applied before `client_data_transform`; example
      weights and step counts use the scheduled n.

  Returns:
    FederatedAlgorithm(init, round, validate).
  """
  local.check_schedule(batch_size, epochs, steps)
  check_round_args(clients_per_round, weighting, client_chunk_size)
  if systems is not None and not isinstance(systems, systems_lib.SystemsConfig):
    raise ValueError(f"systems must be a systems.SystemsConfig, got {type(systems).__name__}")
  # Over-selection samples more clients than the server keeps: those are the rows trained.
  sampled = clients_per_round + (0 if systems is None else systems.over_selection)
  if isinstance(client_chunk_size, int) and sampled % client_chunk_size:
    what = ("clients_per_round" if systems is None
            else "clients_per_round + over_selection")
    raise ValueError(f"client_chunk_size={client_chunk_size!r} must be a positive divisor of "
                     f"{what}={sampled}")
  if systems is not None:
    systems_lib.check_aggregator(aggregator)
  if getattr(aggregator, "validate", None) is not None:
    aggregator.validate(sampled, None)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  loss = loss or cross_entropy(apply)
  local_update = local.make_local_update(loss, client_optimizer, batch_size=batch_size,
                                         epochs=epochs, steps=steps, regularizer=regularizer)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    """`num_clients` is needed only by aggregators that keep per-client state."""
    agg_state = None if aggregator is None else aggregator.init(params, num_clients)
    if systems is not None:
      systems_lib.check_aggregator_state(aggregator, agg_state)
    sim_time = None if systems is None else jnp.zeros((), jnp.float32)
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), key,
                       aggregator_state=agg_state, sim_time=sim_time)

  def validate(state: ServerState, data: FederatedData) -> None:
    if systems is not None:
      systems_lib.check_profiles(systems.profiles, data.num_clients)
      if sampled > data.num_clients:
        raise ValueError(f"clients_per_round + over_selection = {clients_per_round} + "
                         f"{systems.over_selection} = {sampled} but the data has only "
                         f"{data.num_clients} clients")
      if state.sim_time is None:
        raise ValueError("the state has no sim_time: make it with this algorithm's init "
                         "(fedavg(..., systems=...).init)")
    check_clients_per_round(clients_per_round, data)
    check_labels(apply, state.params, data)
    if getattr(aggregator, "validate", None) is not None:
      aggregator.validate(sampled, data.num_clients)

  def client_data(data, client_id, round_index):
    """A client's padded (x, y, n) as it trains in round `round_index`."""
    x, y, n = data.x[client_id], data.y[client_id], data.counts[client_id]
    if client_data_schedule is not None:
      x, y, n = client_data_schedule(x, y, n, client_id, round_index)
    return x, y, n

  def client_counts(data, ids, round_index):
    """Example counts of clients `ids` this round (XLA drops the unused x and y)."""
    if client_data_schedule is None:
      return data.counts[ids]
    return jax.vmap(lambda i: client_data(data, i, round_index)[2])(ids)

  def train_clients(params, data, ids, train_key, round_index, budgets):
    """Trains the clients `ids` (vmapped), at most `budgets` steps each if given (else
    None), and returns their stacked LocalResults."""
    def one(client_id, budget):
      x, y, n = client_data(data, client_id, round_index)
      if client_data_transform is not None:
        x, y, n = client_data_transform(x, y, n, client_id, client_data_key(train_key, client_id))
      return local_update(params, x, y, n, client_key(train_key, client_id), params, budget)
    if client_sharding is None:
      return jax.vmap(one)(ids, budgets)
    # Constraining the ids and the results to the client axis makes GSPMD split the
    # vmapped local training over devices; reductions over it become all-reduces.
    constrain = lambda a: jax.lax.with_sharding_constraint(a, client_sharding)
    return jax.tree_util.tree_map(
        constrain, jax.vmap(one)(constrain(ids), jax.tree_util.tree_map(constrain, budgets)))

  def by_chunk(params):
    """A function reshaping `[sampled]` to `[chunks, chunk]` (None stays None)."""
    if client_sharding is not None and client_chunk_size == "auto":
      chunk = sampled  # the devices split one chunk of all clients between them
    else:
      chunk = resolve_chunk_size(client_chunk_size, sampled, params) or sampled
    return lambda a: None if a is None else a.reshape(-1, chunk)

  def mean_delta(params, data, ids, weights, budgets, train_key, round_index):
    """Fused weighted mean: a scan over chunks keeps one chunk of client models alive."""
    chunked = by_chunk(params)

    def body(acc, xs):
      chunk_ids, w, chunk_budgets = xs
      result = train_clients(params, data, chunk_ids, train_key, round_index, chunk_budgets)
      acc = (jax.tree_util.tree_map(jnp.add, acc[0], weighted_sum(w, result.delta)),
             acc[1] + w.sum())
      return acc, (result.loss_sum, result.num_trained)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (total, weight), (loss_sum, num_trained) = jax.lax.scan(
        body, (zeros, jnp.zeros(())), (chunked(ids), chunked(weights), chunked(budgets)))
    if systems is not None:
      # Every client may have dropped: then all weights and updates are 0; keep 0, not NaN.
      weight = jnp.where(weight > 0, weight, 1.0)
    delta = jax.tree_util.tree_map(lambda d: d / weight, total)
    return delta, loss_sum.reshape(-1), num_trained.reshape(-1), {}

  def aggregated_delta(state, data, ids, weights, budgets, train_key, round_index, agg_key):
    chunked = by_chunk(state.params)
    results = jax.lax.map(
        lambda xs: train_clients(state.params, data, xs[0], train_key, round_index, xs[1]),
        (chunked(ids), chunked(budgets)))
    results = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), results)
    delta, agg_state, metrics = aggregator.aggregate(
        state.aggregator_state, results.delta, weights, ids, agg_key)
    return delta, results.loss_sum, results.num_trained, metrics, agg_state

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    next_key, ids, sample_key, train_key = start_round(state, data, sampled)
    agg_state = state.aggregator_state
    if client_data_schedule is None:
      counts = data.counts[ids]
      weights = client_weights(weighting, data, ids)
    else:
      counts = client_counts(data, ids, state.round)
      weights = (counts.astype(jnp.float32) if weighting == "examples"
                 else jnp.ones(ids.shape, jnp.float32))
    budgets, plan = None, None
    if systems is not None:
      plan = plan_systems(state, ids, counts, sample_key)
      weights = jnp.where(plan.aggregated, weights, 0.0)
      budgets = plan.step_budget
    if aggregator is None:
      delta, loss_sum, num_trained, agg_metrics = mean_delta(
          state.params, data, ids, weights, budgets, train_key, state.round)
    else:
      delta, loss_sum, num_trained, agg_metrics, agg_state = aggregated_delta(
          state, data, ids, weights, budgets, train_key, state.round,
          aggregation_key(sample_key))
      if systems is not None:
        delta = jax.tree_util.tree_map(
            lambda d: jnp.where(plan.aggregated.any(), d, jnp.zeros_like(d)), delta)
    params, opt_state = server_step(server_optimizer, state, delta)
    # float32 model both ways unless a compressor (in agg_metrics) says otherwise
    metrics = {**round_metrics(loss_sum, num_trained, delta, data, ids), **agg_metrics}
    if client_data_schedule is not None:
      metrics["num_examples"] = counts.sum()
    sim_time = state.sim_time
    if systems is not None:
      sim_time = state.sim_time + plan.round_time
      metrics.update(systems_lib.round_metrics(plan, sim_time))
      metrics["num_examples"] = jnp.where(plan.aggregated, counts, 0).sum()
      metrics["uplink_bytes"] = jnp.float32(uplink_bytes(state.params)) * plan.aggregated.sum()
    new_state = state._replace(params=params, opt_state=opt_state, round=state.round + 1,
                               key=next_key, aggregator_state=agg_state, sim_time=sim_time)
    return new_state, metrics

  def uplink_bytes(params) -> float:
    """What one client sends: the compressor's encoding, else the float32 update."""
    from fedjax_sim import compression  # late: compression imports this package
    num_params = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
    compressed = (None if aggregator is None
                  else compression.uplink_bytes_per_client(aggregator, num_params))
    return float(model_bytes(params) if compressed is None else compressed)

  def plan_systems(state, ids, counts, sample_key):
    return systems_lib.plan_round(
        systems, ids, counts, systems_lib.systems_key(sample_key),
        clients_per_round=clients_per_round, batch_size=batch_size, epochs=epochs, steps=steps,
        downlink_bytes=float(model_bytes(state.params)), uplink_bytes=uplink_bytes(state.params))

  return FederatedAlgorithm(init, round, validate)
