"""SCAFFOLD: local steps corrected by control variates, option II.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh 2020, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning" (ICML), Algorithm 1. The server holds
x and a control variate c; every client i holds its own c_i (zero at the start).
In a round each sampled client starts from y_i = x and takes K_i local SGD steps

    y_i <- y_i - eta_l (g_i(y_i) - c_i + c),

then updates its control variate by option II,

    c_i+ = c_i - c + (x - y_i) / (K_i eta_l),

and the server applies

    x <- x + eta_g mean_S (y_i - x),   c <- c + sum_{i in S} p_i (c_i+ - c_i),

with p_i = 1/N over all N clients in the paper. Here the mean over the sampled S
uses the algorithm's weights (example counts by default; 'uniform' is the paper's
1/|S|) and p_i is the same weight normalised over all N clients, so that c stays
the weighted mean of the c_i; with equal-sized clients the two coincide. The
correction enters local training as the linear term <c - c_i, y> added to the
objective (its gradient is c - c_i). The server step is any optax optimizer on
the pseudo-gradient -mean(y_i - x); SGD with learning rate eta_g (default 1) is
the paper's.

Every upload of a client, y_i - x and c_i+ - c_i, goes through the aggregator
chain (`{'delta', 'control_delta'}`), so DP clips and noises both.

State: `client_states` holds every c_i (num_clients x the model, on the device;
`client_state_bytes`), `algorithm_state` holds c. Each client sends and receives
two model-sized vectors per round.
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


def correction_term(params: Params, drift: Params) -> jax.Array:
  """<c - c_i, params>: adds c - c_i to every local gradient."""
  return optax.tree.vdot(drift, params)


def scaffold(apply: Callable[[Params, jax.Array], jax.Array], *, client_learning_rate: float,
             server_optimizer: engine.OptimizerSpec | None = None,
             loss: local.PerExampleLoss | None = None, **options) -> FederatedAlgorithm:
  """SCAFFOLD (option II) with plain local SGD.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: eta_l of the local SGD steps (option II divides by it);
      the hyperparameter `client_lr`.
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD lr 1.
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients, to allocate their control variates.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    c, c_i, lr = inp.message, inp.row, inp.hp["client_lr"]
    result = engine.local_train(inp, loss, optax.sgd(lr), schedule, regularizer=correction_term,
                                context=optax.tree.sub(c, c_i))
    # Option II: c_i+ - c_i = -c - delta_i / (K_i eta_l), delta_i = y_i - x.
    # A client that took no step (no examples) learned nothing: its c_i stays (-c
    # would pull it, and the server's c, towards -c each time it is sampled).
    inv_steps = 1.0 / (jnp.maximum(result.num_steps, 1) * lr)
    took_steps = result.num_steps > 0
    change = jax.tree_util.tree_map(
        lambda d, cc: jnp.where(took_steps, -cc - d * inv_steps.astype(d.dtype), 0.0).astype(
            d.dtype), result.delta, c)
    return ClientOutput({"delta": result.delta, "control_delta": change},
                        optax.tree.add(c_i, change), result.loss_sum, result.num_trained,
                        result.num_steps)

  zeros = optax.tree.zeros_like
  work = ClientWork(train, lambda p: {"delta": zeros(p), "control_delta": zeros(p)}, zeros)
  fedopt = engine.fedopt(server_optimizer, lambda upload: upload["delta"])

  def init(params, hp):
    return fedopt.init(params, hp)[0], zeros(params)

  def update(state, upload, info) -> ServerUpdate:
    # c <- c + sum_S p_i (c_i+ - c_i), p_i normalised over all N clients.
    c = optax.tree.add_scale(state.algorithm_state, info.weight_sum / info.total_weight,
                             upload["control_delta"])
    return fedopt.update(state, upload, info)._replace(
        algorithm_state=c, metrics={"control_variate_norm": optax.tree.norm(c)})

  rule = ServerRule(init, update, message=lambda state, hp: state.algorithm_state)
  return engine.compose("scaffold", apply, client_work=work, server_rule=rule,
                        hparams={"client_lr": client_learning_rate},
                        hparam_checks={"client_lr": engine.POSITIVE}, **options)
