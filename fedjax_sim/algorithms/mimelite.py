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
and sends its update and its gradient.
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


def mimelite(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_learning_rate: float,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    momentum: float = 0.9,
    server_learning_rate: float = 1.0,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """MimeLite with SGD with momentum.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: eta of the local steps.
    clients_per_round: clients sampled each round, uniformly without replacement.
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one).
    momentum: beta in [0, 1); 0 is FedAvg with local SGD.
    server_learning_rate: eta_g on the mean update (1 in the paper).
    weighting: 'examples' or 'uniform' means over the sampled clients.
    client_chunk_size: train this many clients at a time to bound memory (None: all
      at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy.

  Returns:
    FederatedAlgorithm(init, round, validate); `algorithm_state` is m.
  """
  if not client_learning_rate > 0:
    raise ValueError(f"client_learning_rate must be positive, got {client_learning_rate!r}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
  if not server_learning_rate > 0:
    raise ValueError(f"server_learning_rate must be positive, got {server_learning_rate!r}")
  ratio = momentum / (1.0 - momentum)

  def frozen_momentum(params, m):
    return ratio * optax.tree.vdot(m, params)

  loss, local_update = base.local_training(
      apply, optax.sgd(client_learning_rate * (1.0 - momentum)),
      clients_per_round=clients_per_round, batch_size=batch_size, epochs=epochs, steps=steps,
      weighting=weighting, client_chunk_size=client_chunk_size, loss=loss,
      regularizer=frozen_momentum)
  full_grad = jax.grad(base.full_batch_loss, argnums=1)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    del num_clients  # no per-client state
    return ServerState(params, (), jnp.zeros((), jnp.int32), key,
                       algorithm_state=optax.tree.zeros_like(params))

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    draws = base.start_round(state, data, clients_per_round)
    ids, m = draws.ids, state.algorithm_state
    results = base.train_sampled(local_update, data, ids, draws.train_key,
                                 lambda _: (state.params, m), None, client_chunk_size)
    grads = base.map_clients(
        lambda i: full_grad(loss, state.params, data.x[i], data.y[i], data.counts[i]),
        ids, base.resolve_chunk_size(client_chunk_size, ids.shape[0], state.params))
    weights = base.client_weights(weighting, data, ids)
    delta = base.weighted_mean(weights, results.delta)
    m = jax.tree_util.tree_map(lambda g, old: (1.0 - momentum) * g + momentum * old,
                               base.weighted_mean(weights, grads), m)
    params = optax.tree.add_scale(state.params, server_learning_rate, delta)
    metrics = base.round_metrics(results.loss_sum, results.num_trained, delta, data, ids,
                                 models_up=2, models_down=2)
    metrics["momentum_norm"] = optax.tree.norm(m)
    new_state = state._replace(params=params, round=state.round + 1, key=draws.next_key,
                               algorithm_state=m)
    return new_state, metrics

  return FederatedAlgorithm(init, round, base.make_validate(apply, clients_per_round))
