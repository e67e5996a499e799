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

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState
from fedjax_sim.data import FederatedData
from fedjax_sim.local import PerExampleLoss

Params = Any


def dynamic_regularizer(params: Params, context: tuple[Params, Params, jax.Array]) -> jax.Array:
  """-<g_k, w> + alpha_k/2 ||w - theta||^2, with context (g_k, theta, alpha_k)."""
  grad_k, anchor, alpha_k = context
  linear = optax.tree.vdot(grad_k, params)
  return -linear + 0.5 * alpha_k * optax.tree.norm(optax.tree.sub(params, anchor), squared=True)


def feddyn(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    alpha: float,
    client_optimizer: optax.GradientTransformation,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """FedDyn.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    alpha: the dynamic regularization coefficient (> 0).
    client_optimizer: optax optimizer of the local objective (fresh each round).
    clients_per_round: clients sampled each round, uniformly without replacement.
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one).
    weighting: 'examples' or 'uniform' (see the module docstring).
    client_chunk_size: train this many clients at a time to bound memory (None: all
      at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients, to allocate their g_k.
  """
  if not alpha > 0:
    raise ValueError(f"alpha must be positive, got {alpha!r}")
  _, local_update = base.local_training(
      apply, client_optimizer, clients_per_round=clients_per_round, batch_size=batch_size,
      epochs=epochs, steps=steps, weighting=weighting, client_chunk_size=client_chunk_size,
      loss=loss, regularizer=dynamic_regularizer)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    zeros = optax.tree.zeros_like(params)
    return ServerState(params, (), jnp.zeros((), jnp.int32), key,
                       client_states=base.init_client_states(zeros, num_clients, "feddyn"),
                       algorithm_state=zeros)

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    draws = base.start_round(state, data, clients_per_round)
    ids, theta, num_clients = draws.ids, state.params, data.num_clients
    all_weights = base.client_weights(weighting, data, jnp.arange(num_clients))
    client_alpha = alpha * all_weights.sum() / (num_clients * all_weights[ids])
    g_rows = base.gather_rows(state.client_states, ids)
    results = base.train_sampled(
        local_update, data, ids, draws.train_key,
        lambda row: (theta, (row[0], theta, row[1])), (g_rows, client_alpha), client_chunk_size)
    g_rows = optax.tree.sub(g_rows, base.scale_rows(client_alpha, results.delta))
    h = optax.tree.sub(state.algorithm_state, optax.tree.scale(
        alpha / num_clients, base.weighted_sum(jnp.ones_like(client_alpha), results.delta)))
    delta = optax.tree.sub(base.weighted_mean(jnp.ones_like(client_alpha), results.delta),
                           optax.tree.scale(1.0 / alpha, h))
    metrics = base.round_metrics(results.loss_sum, results.num_trained, delta, data, ids)
    new_state = state._replace(params=optax.tree.add(theta, delta), round=state.round + 1,
                               key=draws.next_key,
                               client_states=base.scatter_rows(state.client_states, ids, g_rows),
                               algorithm_state=h)
    return new_state, metrics

  return FederatedAlgorithm(init, round, base.make_validate(apply, clients_per_round, True))
