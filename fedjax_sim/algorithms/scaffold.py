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

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState
from fedjax_sim.data import FederatedData
from fedjax_sim.local import PerExampleLoss

Params = Any


def correction_term(params: Params, drift: Params) -> jax.Array:
  """<c - c_i, params>: adds c - c_i to every local gradient."""
  return optax.tree.vdot(drift, params)


def scaffold(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_learning_rate: float,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: PerExampleLoss | None = None,
) -> FederatedAlgorithm:
  """SCAFFOLD (option II) with plain local SGD.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_learning_rate: eta_l of the local SGD steps (option II divides by it).
    clients_per_round: clients sampled each round, uniformly without replacement.
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one);
      K_i is the number of steps client i took.
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD lr 1.
    weighting: 'examples' or 'uniform' (see the module docstring).
    client_chunk_size: train this many clients at a time to bound memory (None: all
      at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy.

  Returns:
    FederatedAlgorithm whose `init(params, key, num_clients)` needs the number of
    clients, to allocate their control variates.
  """
  if not client_learning_rate > 0:
    raise ValueError(f"client_learning_rate must be positive, got {client_learning_rate!r}")
  server_optimizer = server_optimizer or optax.sgd(1.0)
  _, local_update = base.local_training(
      apply, optax.sgd(client_learning_rate), clients_per_round=clients_per_round,
      batch_size=batch_size, epochs=epochs, steps=steps, weighting=weighting,
      client_chunk_size=client_chunk_size, loss=loss, regularizer=correction_term)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    zeros = optax.tree.zeros_like(params)
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), key,
                       client_states=base.init_client_states(zeros, num_clients, "scaffold"),
                       algorithm_state=zeros)

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    draws = base.start_round(state, data, clients_per_round)
    ids, c = draws.ids, state.algorithm_state
    c_rows = base.gather_rows(state.client_states, ids)
    results = base.train_sampled(
        local_update, data, ids, draws.train_key,
        lambda c_i: (state.params, optax.tree.sub(c, c_i)), c_rows, client_chunk_size)
    # Option II: c_i+ - c_i = -c - delta_i / (K_i eta_l), delta_i = y_i - x.
    inv_steps = 1.0 / (jnp.maximum(results.num_steps, 1) * client_learning_rate)
    scaled = base.scale_rows(inv_steps, results.delta)
    c_change = jax.tree_util.tree_map(lambda d, cc: -cc - d, scaled, c)
    weights = base.client_weights(weighting, data, ids)
    all_weights = base.client_weights(weighting, data, jnp.arange(data.num_clients))
    c = optax.tree.add(c, base.weighted_sum(weights / all_weights.sum(), c_change))
    delta = base.weighted_mean(weights, results.delta)
    params, opt_state = base.server_step(server_optimizer, state, delta)
    client_states = base.scatter_rows(state.client_states, ids,
                                      optax.tree.add(c_rows, c_change))
    metrics = base.round_metrics(results.loss_sum, results.num_trained, delta, data, ids,
                                 models_up=2, models_down=2)
    metrics["control_variate_norm"] = optax.tree.norm(c)
    new_state = state._replace(params=params, opt_state=opt_state, round=state.round + 1,
                               key=draws.next_key, client_states=client_states,
                               algorithm_state=c)
    return new_state, metrics

  return FederatedAlgorithm(init, round, base.make_validate(apply, clients_per_round, True))
