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
their own (`personal_train_key`), independent of the global steps'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedprox import proximal_term
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy

Params = Any
_PERSONAL_TAG = 2  # folded into the sampling key; 1 is the aggregator's (base.aggregation_key)


def personal_train_key(state_key: jax.Array) -> jax.Array:
  """The round's key for personal training, from the round's state key."""
  _, sample_key, _ = base.round_keys(state_key)
  return jax.random.fold_in(sample_key, _PERSONAL_TAG)


def ditto(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    lam: float,
    client_optimizer: optax.GradientTransformation,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    personal_optimizer: optax.GradientTransformation | None = None,
    client_chunk_size: int | str | None = "auto",
    loss: local.PerExampleLoss | None = None,
    **fedavg_args,
) -> FederatedAlgorithm:
  """Ditto with FedAvg as the global solver.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    lam: the personalization coefficient lambda (>= 0).
    client_optimizer: optax optimizer of the global model's local steps.
    clients_per_round, batch_size, epochs / steps, client_chunk_size, loss: as in
      `fedavg`, shared by the global and the personal local training.
    personal_optimizer: optax optimizer of the personal steps; default
      `client_optimizer`.
    **fedavg_args: other `fedavg` arguments for the global model
      (server_optimizer, weighting, aggregator...).

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients; metrics add `personal_train_loss`.
  """
  if not isinstance(lam, (int, float)) or lam < 0:
    raise ValueError(f"lam must be a number >= 0, got {lam!r}")
  if "client_data_transform" in fedavg_args:
    raise ValueError("ditto takes no client_data_transform: it would reach the global "
                     "steps but not the personal ones")
  schedule = dict(clients_per_round=clients_per_round, batch_size=batch_size, epochs=epochs,
                  steps=steps, client_chunk_size=client_chunk_size, loss=loss)
  global_fedavg = fedavg(apply, client_optimizer=client_optimizer, **schedule, **fedavg_args)
  personal_update = local.make_local_update(
      loss or cross_entropy(apply), personal_optimizer or client_optimizer,
      batch_size=batch_size, epochs=epochs, steps=steps, regularizer=proximal_term(float(lam)))

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    state = global_fedavg.init(params, key, num_clients)
    return state._replace(client_states=base.init_client_states(params, num_clients, "ditto"))

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    new_state, metrics = global_fedavg.round(state, data)
    ids = metrics["client_ids"]
    rows = base.gather_rows(state.client_states, ids)
    results = base.train_sampled(personal_update, data, ids, personal_train_key(state.key),
                                 lambda v: (v, state.params), rows, client_chunk_size)
    personal = base.scatter_rows(state.client_states, ids, optax.tree.add(rows, results.delta))
    metrics["personal_train_loss"] = (results.loss_sum.sum()
                                      / jnp.maximum(results.num_trained.sum(), 1.0))
    return new_state._replace(client_states=personal), metrics

  def validate(state: ServerState, data: FederatedData) -> None:
    global_fedavg.validate(state, data)
    base.check_client_states(state, data)

  return FederatedAlgorithm(init, round, validate)
