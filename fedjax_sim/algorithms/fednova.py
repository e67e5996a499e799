"""FedNova: normalized averaging, so that unequal local step counts do not bias the model.

Wang, Liu, Liang, Joshi, Poor 2020, "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization" (NeurIPS), Section 4. FedAvg weights each
client by how far it moved, so a client taking more local steps pulls the model
towards its own optimum. FedNova divides client i's update by ||a_i||_1, the total
weight its local solver put on its gradients, and rescales by the mean of those:

    d_i = (y_i - x) / ||a_i||_1,   tau_eff = sum_{i in S} p_i ||a_i||_1,
    x <- x + tau_eff sum_{i in S} p_i d_i,

with p_i the clients' weights normalised over the round (example counts by
default). The local solver is SGD with learning rate eta and optional heavy-ball
momentum rho (optax.sgd's trace: m <- g + rho m, y <- y - eta m), for which
||a_i||_1 = tau_i (rho = 0), or [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho),
tau_i being the steps client i took (epochs over unequal data, or step budgets).
The server step is any optax optimizer on the pseudo-gradient
-tau_eff sum p_i d_i; SGD with learning rate 1 (the default) is the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.engine import ClientOutput, ClientWork, ServerRule, ServerUpdate
from fedjax_sim.losses import cross_entropy

Params = Any


def gradient_weight(num_steps: jax.Array, momentum) -> jax.Array:
  """||a||_1 of `num_steps` steps of SGD with heavy-ball `momentum` (Wang et al. 2020);
  `num_steps` itself at momentum 0."""
  tau, rho = num_steps.astype(jnp.float32), momentum
  return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def fednova(apply: Callable[[Params, jax.Array], jax.Array], *, client_learning_rate: float,
            momentum: float = 0.0, server_optimizer: engine.OptimizerSpec | None = None,
            loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """FedNova with local SGD (optionally with momentum).

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: local SGD learning rate (hyperparameter `client_lr`).
    momentum: local heavy-ball momentum rho in [0, 1); 0 is plain SGD
      (hyperparameter `momentum`).
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD lr 1.
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm; clients upload `{'normalized_delta', 'gradient_weight'}`
    (d_i and ||a_i||_1); metrics add `tau_eff` and `client_num_steps`.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    rho = inp.hp["momentum"]
    result = engine.local_train(inp, loss, optax.sgd(inp.hp["client_lr"], momentum=rho),
                                schedule)
    a = gradient_weight(result.num_steps, rho)
    normalized = optax.tree.scale(1.0 / jnp.maximum(a, 1e-12), result.delta)
    return ClientOutput({"normalized_delta": normalized, "gradient_weight": a}, None,
                        result.loss_sum, result.num_trained, result.num_steps,
                        {"num_steps": result.num_steps})

  def upload_like(params):
    return {"normalized_delta": optax.tree.zeros_like(params),
            "gradient_weight": jnp.zeros((), jnp.float32)}

  # x <- x + tau_eff sum_S p_i d_i: the weighted means of a_i and d_i, multiplied.
  fedopt = engine.fedopt(server_optimizer, lambda upload: optax.tree.scale(
      upload["gradient_weight"], upload["normalized_delta"]))

  def update(state, upload, info) -> ServerUpdate:
    return fedopt.update(state, upload, info)._replace(
        metrics={"tau_eff": upload["gradient_weight"]})

  rule = ServerRule(fedopt.init, update, weighted_ratio=True)
  return engine.compose("fednova", apply, client_work=ClientWork(train, upload_like),
                        server_rule=rule,
                        hparams={"client_lr": client_learning_rate, "momentum": momentum},
                        hparam_checks={"client_lr": engine.POSITIVE,
                                       "momentum": engine.FRACTION}, **options)
