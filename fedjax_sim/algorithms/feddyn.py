"""FedDyn: dynamic regularization, so that the clients' stationary points agree.

Acar, Zhao, Matas Navarro, Mattina, Whatmough, Saligrama 2021, "Federated
Learning Based on Dynamic Regularization" (ICLR), Algorithm 1. Every client k
holds g_k, the gradient of its loss at its last local model (zero at the start);
the server holds h (zero at the start). In round t each sampled client starts
from the server model theta and trains on

    L_k(w) - <g_k, w> + alpha/2 ||w - theta||^2,

then sets g_k <- g_k - alpha (w_k - theta). The server updates

    h <- h - alpha/m sum_{k in S} (w_k - theta),
    theta <- mean_{k in S} w_k - h / alpha,

m being the number of all clients. At a fixed point g_k = grad L_k(theta) and
h = mean_k g_k = 0, so theta is a stationary point of the global objective even
with many local steps, which FedAvg's is not.

Weighting: with weighting='uniform' this is the paper's rule for the objective
mean_k L_k. With 'examples' (the default, like the other algorithms) the
objective is sum_k n_k L_k / n, and, as the authors' code does, client k uses
alpha_k = alpha / w_k in its regularizer and in its g_k update, where
w_k = m n_k / n (its weight relative to the mean client); the server rule is
unchanged. Equal-sized clients make the two the same.

State: `client_states` holds every g_k (num_clients x the model, on the device;
`client_state_bytes`), `algorithm_state` holds h.
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


def dynamic_regularizer(params: Params, context: tuple[Params, Params, jax.Array]) -> jax.Array:
  """-<g_k, w> + alpha_k/2 ||w - theta||^2, with context (g_k, theta, alpha_k)."""
  grad_k, anchor, alpha_k = context
  linear = optax.tree.vdot(grad_k, params)
  return -linear + 0.5 * alpha_k * optax.tree.norm(optax.tree.sub(params, anchor), squared=True)


def feddyn(apply: Callable[[Params, jax.Array], jax.Array], *, alpha: float,
           client_optimizer: engine.OptimizerSpec, loss: local.PerExampleLoss | None = None,
           **options) -> FederatedAlgorithm:
  """FedDyn.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    alpha: the dynamic regularization coefficient (> 0; hyperparameter `alpha`).
    client_optimizer: optax optimizer of the local objective (fresh each round), or
      `hp -> optimizer`.
    loss: per-example loss; default softmax cross-entropy.
    **options: what every algorithm shares (see `fedavg`): clients_per_round,
      batch_size, epochs / steps, weighting, client_chunk_size, aggregator,
      client_data_transform, client_sharding, systems, client_data_schedule,
      hparam_schedule, extra_hparams.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients, to allocate their g_k.
  """
  loss, schedule = loss or cross_entropy(apply), engine.schedule_of(options)

  def train(inp: engine.ClientInput) -> ClientOutput:
    # alpha / the client's weight over the mean weight; a client without examples (whose
    # loss is 0) gets alpha, not alpha / 0 (inf * 0 made its g_k, with steps= the model, NaN)
    rel = inp.relative_weight
    alpha_k = inp.hp["alpha"] / jnp.where(rel > 0, rel, 1.0)
    result = engine.local_train(inp, loss, engine.resolve(client_optimizer, inp.hp), schedule,
                                regularizer=dynamic_regularizer,
                                context=(inp.row, inp.params, alpha_k))
    grad_k = jax.tree_util.tree_map(lambda g, d: g - alpha_k * d, inp.row, result.delta)
    return ClientOutput(result.delta, grad_k, result.loss_sum, result.num_trained,
                        result.num_steps)

  def init(params, hp):
    return (), optax.tree.zeros_like(params)

  def update(state, mean_delta, info) -> ServerUpdate:
    alpha = info.hp["alpha"]
    # h <- h - alpha/N sum_S delta_k;  theta <- mean_S(theta_k) - h / alpha.
    h = optax.tree.add_scale(state.algorithm_state, -alpha * info.weight_sum / info.num_clients,
                             mean_delta)
    delta = optax.tree.sub(mean_delta, optax.tree.scale(1.0 / alpha, h))
    delta = jax.tree_util.tree_map(lambda d: jnp.where(info.any_aggregated, d, 0.0), delta)
    return ServerUpdate(optax.tree.add(state.params, delta), (), h, delta)

  work = ClientWork(train, init_row=optax.tree.zeros_like)
  return engine.compose("feddyn", apply, client_work=work,
                        server_rule=ServerRule(init, update, uniform_mean=True),
                        hparams={"alpha": alpha}, hparam_checks={"alpha": engine.POSITIVE},
                        **options)
