"""q-FFL (q-FedAvg): fairness by weighting clients with their loss to the power q.

Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated
Learning" (ICLR), Algorithm 3 (q-FedAvg). It minimizes
f_q(w) = sum_k p_k F_k(w)^(q+1) / (q+1): q = 0 is FedAvg's objective, a larger q
puts more weight on the clients with a higher loss. In round t each sampled
client k computes its loss F_k = F_k(w^t) on its training data at the server
model, runs local SGD with learning rate eta from w^t to wbar_k, and sends

    Delta_k = F_k^q L (w^t - wbar_k),
    h_k     = q F_k^(q-1) ||L (w^t - wbar_k)||^2 + L F_k^q,

with L = 1/eta the estimate of the Lipschitz constant of the gradient (as in the
paper's experiments). The server takes

    w^(t+1) = w^t - sum_k p_k Delta_k / sum_k p_k h_k.

The paper samples clients with probability p_k and sums uniformly; here clients
are sampled uniformly and p_k are the round's weights (example counts by
default; 'uniform' is the authors' sums). F_k gets 1e-10 added before the
powers, as in the authors' code, so that q < 1 never meets 0^(q-1). With q = 0
the step is the weighted mean of the wbar_k: FedAvg.
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
LOSS_FLOOR = 1e-10


def qffl_step(losses: jax.Array, deltas: Params, weights: jax.Array, q: float,
              lipschitz: float) -> tuple[Params, jax.Array]:
  """The server's update w^(t+1) - w^t from the clients' losses [C] and deltas [C, ...].

  Returns:
    (update, h [C]).
  """
  f = losses + LOSS_FLOOR
  scaled = base.scale_rows(-lipschitz * jnp.ones_like(f), deltas)  # L (w^t - wbar_k)
  sq_norms = sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)
                 for a in jax.tree_util.tree_leaves(scaled))
  h = lipschitz * f**q
  if q != 0:
    h = h + q * f ** (q - 1) * sq_norms
  step = base.weighted_sum(weights * f**q, scaled)
  return optax.tree.scale(-1.0 / jnp.sum(weights * h), step), h


def qffl(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    q: float,
    client_learning_rate: float,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """q-FedAvg with local SGD and L = 1 / client_learning_rate.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    q: the fairness exponent (>= 0; 0 is FedAvg).
    client_learning_rate: local SGD learning rate eta; L = 1/eta.
    clients_per_round: clients sampled each round, uniformly without replacement.
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one).
    weighting: p_k proportional to 'examples' or 'uniform'.
    client_chunk_size: train this many clients at a time to bound memory (None: all
      at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy.

  Returns:
    FederatedAlgorithm(init, round, validate); metrics add
    `client_loss_at_server` (F_k) for the sampled clients.
  """
  if not isinstance(q, (int, float)) or q < 0:
    raise ValueError(f"q must be a number >= 0, got {q!r}")
  if not client_learning_rate > 0:
    raise ValueError(f"client_learning_rate must be positive, got {client_learning_rate!r}")
  lipschitz = 1.0 / client_learning_rate
  loss, local_update = base.local_training(
      apply, optax.sgd(client_learning_rate), clients_per_round=clients_per_round,
      batch_size=batch_size, epochs=epochs, steps=steps, weighting=weighting,
      client_chunk_size=client_chunk_size, loss=loss)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    del num_clients  # no per-client state
    return ServerState(params, (), jnp.zeros((), jnp.int32), key)

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    draws = base.start_round(state, data, clients_per_round)
    ids = draws.ids
    losses = base.map_clients(
        lambda i: base.full_batch_loss(loss, state.params, data.x[i], data.y[i], data.counts[i]),
        ids, base.resolve_chunk_size(client_chunk_size, ids.shape[0], state.params))
    results = base.train_sampled(local_update, data, ids, draws.train_key,
                                 lambda _: (state.params, None), None, client_chunk_size)
    update, _ = qffl_step(losses, results.delta, base.client_weights(weighting, data, ids),
                          float(q), lipschitz)
    metrics = base.round_metrics(results.loss_sum, results.num_trained, update, data, ids)
    metrics["client_loss_at_server"] = losses
    new_state = state._replace(params=optax.tree.add(state.params, update),
                               round=state.round + 1, key=draws.next_key)
    return new_state, metrics

  return FederatedAlgorithm(init, round, base.make_validate(apply, clients_per_round))
