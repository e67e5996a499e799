"""MimeLite: the server's momentum, frozen, applied in every local step.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh 2021, "Breaking the
centralized barrier for cross-device federated learning" (NeurIPS; "Mime:
Mimicking Centralized Stochastic Algorithms in Federated Learning"), Algorithm 1
without the SVRG correction (MimeLite), with SGD with momentum as the base
optimizer. The server holds x and the momentum statistics m (zero at the start).
Each sampled client starts from y_i = x and takes local steps

    y_i <- y_i - eta ((1 - beta) g_i(y_i) + beta m),

with m fixed during the round, and also computes its full-batch gradient
grad f_i(x) at the server model. The server then sets

    x <- x + eta_g mean_S (y_i - x),   m <- (1 - beta) mean_S grad f_i(x) + beta m,

with example-weighted means by default (the paper's are uniform) and eta_g = 1
in the paper. With one full-batch local step and all clients this is exactly
centralized SGD with momentum on the global objective, which is what Mime mimics.

The local step is written as plain SGD with learning rate eta (1 - beta) on the
objective f_i(y) + beta/(1 - beta) <m, y>, whose gradient is the step above.
`algorithm_state` holds m; clients keep no state. Each client receives x and m
and sends its update and its gradient (`{'delta', 'grad'}`, both through the
aggregator chain).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import local, systems
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.engine import ClientOutput, ClientWork, ServerRule, ServerUpdate
from fedjax_sim.losses import cross_entropy

Params = Any


def mimelite(apply: Callable[[Params, jax.Array], jax.Array], *, client_learning_rate: float,
             momentum: float = 0.9, server_learning_rate: float = 1.0,
             loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """MimeLite with SGD with momentum.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: eta of the local steps (hyperparameter `client_lr`).
    momentum: beta in [0, 1); 0 is FedAvg with local SGD (hyperparameter `momentum`).
    server_learning_rate: eta_g on the mean update, 1 in the paper (`server_lr`).
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm; `algorithm_state` is m.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    beta = inp.hp["momentum"]
    ratio = beta / (1.0 - beta)
    result = engine.local_train(
        inp, loss, optax.sgd(inp.hp["client_lr"] * (1.0 - beta)), schedule,
        regularizer=lambda params, m: ratio * optax.tree.vdot(m, params), context=inp.message)
    grad = engine.full_batch_grad(loss, inp.params, inp)
    return ClientOutput({"delta": result.delta, "grad": grad}, None, result.loss_sum,
                        result.num_trained, result.num_steps)

  def init(params, hp):
    return (), optax.tree.zeros_like(params)

  def update(state, upload, info) -> ServerUpdate:
    beta, m = info.hp["momentum"], state.algorithm_state
    new_m = jax.tree_util.tree_map(lambda g, old: (1.0 - beta) * g + beta * old, upload["grad"], m)
    m = jax.tree_util.tree_map(lambda a, b: jnp.where(info.any_aggregated, a, b), new_m, m)
    params = optax.tree.add_scale(state.params, info.hp["server_lr"], upload["delta"])
    return ServerUpdate(params, (), m, upload["delta"], {"momentum_norm": optax.tree.norm(m)})

  zeros = optax.tree.zeros_like
  # The full-batch gradient is an epoch of forward and backward passes besides the
  # budgeted steps: systems times it as one epoch of steps.
  work = ClientWork(train, lambda p: {"delta": zeros(p), "grad": zeros(p)},
                    unbudgeted_steps=lambda counts: systems.full_steps(
                        counts, schedule.batch_size, 1, None))
  rule = ServerRule(init, update, message=lambda state, hp: state.algorithm_state)
  return engine.compose("mimelite", apply, client_work=work, server_rule=rule,
                        hparams={"client_lr": client_learning_rate, "momentum": momentum,
                                 "server_lr": server_learning_rate},
                        hparam_checks={"client_lr": engine.POSITIVE, "momentum": engine.FRACTION,
                                       "server_lr": engine.POSITIVE}, **options)
