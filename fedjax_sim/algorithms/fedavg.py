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
from typing import Any

import jax

from fedjax_sim import local
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.engine import ClientDataTransform, ClientOutput, ClientWork  # noqa: F401
from fedjax_sim.losses import cross_entropy

Params = Any


def local_sgd_work(loss: local.PerExampleLoss, client_optimizer: engine.OptimizerSpec,
                   schedule: engine.Schedule,
                   regularizer: Callable[[engine.Hparams], local.Regularizer | None]
                   = lambda hp: None) -> ClientWork:
  """FedAvg's client: local training from the server model, uploading its delta.

  `regularizer(hp)` gives the term added to the local objective,
  `term(params, server_params)` (FedProx's proximal term), or None.
  """

  def train(inp: engine.ClientInput) -> ClientOutput:
    result = engine.local_train(inp, loss, engine.resolve(client_optimizer, inp.hp), schedule,
                                regularizer=regularizer(inp.hp), context=inp.params)
    return ClientOutput(result.delta, None, result.loss_sum, result.num_trained,
                        result.num_steps)

  return ClientWork(train)


def fedavg(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_optimizer: engine.OptimizerSpec,
    server_optimizer: engine.OptimizerSpec | None = None,
    loss: local.PerExampleLoss | None = None,
    regularizer: local.Regularizer | None = None,
    **options,
) -> FederatedAlgorithm:
  """FedAvg / FedOpt.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_optimizer: optax optimizer for local training (fresh state each round),
      or `hp -> optimizer` built each round from the state's hyperparameters.
    server_optimizer: optax optimizer on the pseudo-gradient (or `hp -> optimizer`);
      default SGD with learning rate 1, which is plain FedAvg.
    loss: per-example loss; default softmax cross-entropy on integer labels.
    regularizer: `regularizer(params, global_params)` added to every local step's
      objective (FedProx's proximal term is one).
    **options: what every algorithm shares (`engine.compose`):
      clients_per_round: clients sampled each round (uniformly, without replacement).
      batch_size: local minibatch size.
      epochs / steps: local epochs, or a fixed number of local steps (exactly one).
      weighting: 'examples' (each update weighted by the client's example count) or
        'uniform'. With an aggregator whose reducer ignores the weights (DP, secure
        aggregation, median, trimmed mean, Krum) every client counts once throughout
        the round.
      client_chunk_size: train this many clients at a time (a divisor of the
        clients sampled) to bound memory; None trains all at once; "auto" (the
        default) is all at once on accelerators and a few clients at a time on a
        CPU, where that is faster (`base.resolve_chunk_size`).
      aggregator: how client uploads are combined (see `fedjax_sim.aggregators`);
        None is the weighted mean, fused so that chunked rounds never hold all
        clients' uploads at once.
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
        the aggregated clients only. The aggregator's reducer must be the weighted
        mean (`systems.check_aggregator`).
      client_data_schedule: optional `(x, y, n, client_id, round) -> (x, y, n)`
        giving a client's data in a round (`systems.sliding_window`,
        `systems.label_drift`), applied before `client_data_transform`; example
        weights and step counts use the scheduled n.
      hparam_schedule: optional `(round, hp) -> hp` returning every hyperparameter,
        e.g. a learning-rate decay of an optimizer given as `hp -> optimizer`.
      extra_hparams: hyperparameters such optimizers read, name -> initial value.

  Returns:
    FederatedAlgorithm(init, round, validate, hparams).
  """
  work = local_sgd_work(loss or cross_entropy(apply), client_optimizer,
                        engine.schedule_of(options), lambda hp: regularizer)
  return engine.compose("fedavg", apply, client_work=work,
                        server_rule=engine.fedopt(server_optimizer), hparams={}, **options)
