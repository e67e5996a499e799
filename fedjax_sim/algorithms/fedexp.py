"""FedExP: FedAvg with a server step size extrapolated from the clients' update norms.

Jhunjhunwala, Wang, Joshi 2023, "FedExP: Speeding Up Federated Averaging via
Extrapolation" (ICLR), Algorithm 1. Each of the M sampled clients runs local training
from x^t and reports its update Delta_i = x_i - x^t (the paper's Delta_i is the
pseudo-gradient x^t - x_i with the step x^t - eta_g Delta: the same step). The server
takes

    Delta = (1/M) sum_i Delta_i,
    eta_g = max(1, sum_i ||Delta_i||^2 / (2 M (||Delta||^2 + eps))),
    x^(t+1) = x^t + eta_g Delta.

By Jensen, mean ||Delta_i||^2 >= ||Delta||^2, with equality when all clients send the
same update: then eta_g = 1 (the ratio is at most 1/2) and the round is FedAvg's.
The more the updates disagree (orthogonal, heterogeneous), the larger the step: M
orthogonal updates of equal norm give eta_g = M / 2 (as eps -> 0).

Weights: the paper averages uniformly over the M clients. Here both averages use the
round's weights p_i (normalised over the aggregated clients; example counts by
default, 'uniform' is the paper's formula exactly):

    eta_g = max(1, sum_i p_i ||Delta_i||^2 / (2 (||sum_i p_i Delta_i||^2 + eps))),

which keeps the Jensen bound (the same p_i on both sides), so eta_g = 1 for identical
updates whatever the weights. This is also what the authors' code does (it weights
by data size). Their code adds M eps, not eps, to ||Delta||^2 and decays eps by
0.998^2 every round: `eps` here is the paper's; set it to M times theirs, and decay
it with `hparam_schedule`, to match the code. They also evaluate the mean of the last
two iterates (the last one oscillates); that is left to the user.

Every client uploads `{'delta': Delta_i, 'sq_norm': ||Delta_i||^2}`, so both means go
through the aggregator chain (DP clips and noises the pair as one vector; bytes count
both). The server rule divides the two means (`weighted_ratio`): a reducer that
ignores the weights needs weighting='uniform'. The server step is any optax optimizer
on the pseudo-gradient -eta_g Delta; SGD with learning rate 1 (the default) is the
paper's. Metrics add `eta_g`.
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


def step_size(mean_sq_norm: jax.Array, mean_delta: Params, eps) -> jax.Array:
  """FedExP's eta_g = max(1, mean ||Delta_i||^2 / (2 (||mean Delta_i||^2 + eps)))."""
  return jnp.maximum(1.0, mean_sq_norm / (2.0 * (optax.tree.norm(mean_delta, squared=True)
                                                 + eps)))


def fedexp(apply: Callable[[Params, jax.Array], jax.Array], *,
           client_optimizer: engine.OptimizerSpec, eps: float = 1e-3,
           server_optimizer: engine.OptimizerSpec | None = None,
           loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """FedExP.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_optimizer: optax optimizer of local training (the paper's is SGD), or
      `hp -> optimizer`.
    eps: the paper's epsilon (> 0; hyperparameter `eps`), added to ||mean delta||^2.
    server_optimizer: optax optimizer on the pseudo-gradient -eta_g mean delta;
      default SGD lr 1 (the paper's).
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm; clients upload `{'delta', 'sq_norm'}`; metrics add `eta_g`.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    result = engine.local_train(inp, loss, engine.resolve(client_optimizer, inp.hp), schedule)
    upload = {"delta": result.delta, "sq_norm": optax.tree.norm(result.delta, squared=True)}
    return ClientOutput(upload, None, result.loss_sum, result.num_trained, result.num_steps)

  def upload_like(params):
    return {"delta": optax.tree.zeros_like(params), "sq_norm": jnp.zeros((), jnp.float32)}

  fedopt = engine.fedopt(server_optimizer)

  def update(state, upload, info) -> ServerUpdate:
    # No client aggregated (systems): both means are 0, eta_g = 1 and the step is 0.
    eta = step_size(upload["sq_norm"], upload["delta"], info.hp["eps"])
    return fedopt.update(state, optax.tree.scale(eta, upload["delta"]), info)._replace(
        metrics={"eta_g": eta})

  rule = ServerRule(fedopt.init, update, weighted_ratio=True)
  return engine.compose("fedexp", apply, client_work=ClientWork(train, upload_like),
                        server_rule=rule, hparams={"eps": eps},
                        hparam_checks={"eps": engine.POSITIVE}, **options)
