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

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState
from fedjax_sim.data import FederatedData
from fedjax_sim.local import PerExampleLoss

Params = Any


def gradient_weight(num_steps: jax.Array, momentum: float) -> jax.Array:
  """||a||_1 of `num_steps` steps of SGD with heavy-ball `momentum` (Wang et al. 2020)."""
  tau = num_steps.astype(jnp.float32)
  if momentum == 0.0:
    return tau
  rho = momentum
  return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def fednova(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_learning_rate: float,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    momentum: float = 0.0,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """FedNova with local SGD (optionally with momentum).

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: local SGD learning rate.
    clients_per_round: clients sampled each round, uniformly without replacement.
    batch_size: local minibatch size.
    epochs / steps: local epochs (unequal client sizes give unequal step counts),
      or a fixed number of local steps (exactly one).
    momentum: local heavy-ball momentum rho in [0, 1); 0 is plain SGD.
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD lr 1.
    weighting: p_i proportional to 'examples' or 'uniform'.
    client_chunk_size: train this many clients at a time to bound memory (None: all
      at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy.

  Returns:
    FederatedAlgorithm(init, round, validate); metrics add `tau_eff` and
    `client_num_steps`.
  """
  if not client_learning_rate > 0:
    raise ValueError(f"client_learning_rate must be positive, got {client_learning_rate!r}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
  server_optimizer = server_optimizer or optax.sgd(1.0)
  client_optimizer = optax.sgd(client_learning_rate, momentum=momentum or None)
  _, local_update = base.local_training(
      apply, client_optimizer, clients_per_round=clients_per_round, batch_size=batch_size,
      epochs=epochs, steps=steps, weighting=weighting, client_chunk_size=client_chunk_size,
      loss=loss)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    del num_clients  # no per-client state
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), key)

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    draws = base.start_round(state, data, clients_per_round)
    ids = draws.ids
    results = base.train_sampled(local_update, data, ids, draws.train_key,
                                 lambda _: (state.params, None), None, client_chunk_size)
    weights = base.client_weights(weighting, data, ids)
    p = weights / weights.sum()
    a = gradient_weight(results.num_steps, momentum)
    tau_eff = jnp.sum(p * a)
    normalized = base.weighted_sum(p / jnp.maximum(a, 1e-12), results.delta)
    delta = optax.tree.scale(tau_eff, normalized)
    params, opt_state = base.server_step(server_optimizer, state, delta)
    metrics = base.round_metrics(results.loss_sum, results.num_trained, delta, data, ids)
    metrics.update(tau_eff=tau_eff, client_num_steps=results.num_steps)
    new_state = state._replace(params=params, opt_state=opt_state, round=state.round + 1,
                               key=draws.next_key)
    return new_state, metrics

  return FederatedAlgorithm(init, round, base.make_validate(apply, clients_per_round))
