"""Ditto: a personalized model per client beside the global FedAvg model.

Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization" (ICML), Algorithm 1. The global model w is trained by FedAvg (any
server optimizer). Every client k also holds a personal model v_k, initialised to
the starting model; when sampled in round t it runs the same local schedule on

    F_k(v) + lambda/2 ||v - w^t||^2,

starting from v_k and pulled towards the global model w^t it received, and keeps
the result. lambda = 0 gives purely local models; a large lambda gives the global
model. Personalized models are evaluated on each client's own test split with
`evaluation.make_personalized_evaluator`.

State: `client_states` holds every v_k (num_clients x the model, on the device;
`client_state_bytes`). The personal steps draw their example order from a key of
their own (`personal_train_key`, the engine's second training key), independent of
the global steps'. Both trainings see the same (scheduled, transformed) client data
and step budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from fedjax_sim import local
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm, mean_loss
from fedjax_sim.algorithms.engine import ClientOutput, ClientWork, ServerRule, ServerUpdate
from fedjax_sim.losses import cross_entropy

Params = Any
from fedjax_sim import keys
from fedjax_sim.algorithms.fedprox import proximal_term


def personal_train_key(state_key: jax.Array) -> jax.Array:
  """The round's key for personal training, from the round's state key."""
  _, sample_key, _ = keys.round_keys(state_key)
  return keys.second_train_key(sample_key)


def ditto(apply: Callable[[Params, jax.Array], jax.Array], *, lam: float,
          client_optimizer: engine.OptimizerSpec,
          personal_optimizer: engine.OptimizerSpec | None = None,
          server_optimizer: engine.OptimizerSpec | None = None,
          loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """Ditto with FedAvg as the global solver.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    lam: the personalization coefficient lambda (>= 0; hyperparameter `lam`).
    client_optimizer: optax optimizer of the global model's local steps.
    personal_optimizer: optax optimizer of the personal steps; default
      `client_optimizer`.
    server_optimizer: as in `fedavg`.
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients; metrics add `personal_train_loss`.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)
  personal_optimizer = personal_optimizer or client_optimizer

  def train(inp: engine.ClientInput) -> ClientOutput:
    shared = engine.local_train(inp, loss, engine.resolve(client_optimizer, inp.hp), schedule)
    personal = engine.local_train(inp, loss, engine.resolve(personal_optimizer, inp.hp),
                                  schedule, start=inp.row, regularizer=proximal_term(inp.hp["lam"]),
                                  context=inp.params, key=inp.second_key)
    return ClientOutput(shared.delta, optax.tree.add(inp.row, personal.delta), shared.loss_sum,
                        shared.num_trained, shared.num_steps,
                        {"personal_loss_sum": personal.loss_sum,
                         "personal_num_trained": personal.num_trained})

  fedopt = engine.fedopt(server_optimizer)

  def update(state, upload, info) -> ServerUpdate:
    m = info.client_metrics
    loss_value = mean_loss(m["personal_loss_sum"], m["personal_num_trained"])
    return fedopt.update(state, upload, info)._replace(metrics={"personal_train_loss": loss_value})

  # Both models train the client's budgeted steps: systems times each step twice.
  work = ClientWork(train, init_row=lambda params: params, trainings_per_step=2)
  return engine.compose("ditto", apply, client_work=work, server_rule=ServerRule(fedopt.init, update),
                        hparams={"lam": lam}, hparam_checks={"lam": engine.NONNEGATIVE}, **options)
