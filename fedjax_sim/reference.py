"""The loop-based reference: the same algorithm run client by client from Python.

Each client trains alone on its unpadded examples with a jitted per-batch step
(the last batch of an epoch is smaller, as it would be on a device); the server
averages the deltas on the host. It shares only the random draws with the
vectorized engine (which clients, which example order), so it is an independent
oracle for the tests and the baseline for the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import compile as compile_lib
from fedjax_sim import local
from fedjax_sim.data import FederatedData
from fedjax_sim.algorithms.base import (ServerState, aggregation_key, client_data_key, client_key,
                                       round_keys, sample_clients)
from fedjax_sim.losses import cross_entropy

Params = Any


class ReferenceFedAvg:
  """FedAvg/FedOpt with a Python loop over clients and over local batches.

  Mirrors `fedavg(...)`: the same arguments (but no chunking) and the same
  `init(params, key)`; `round(state, data)` runs on the host. `aggregator`, if
  given, is a host-side `aggregate(deltas: list of pytrees, weights [C], ids [C],
  key) -> delta` in place of the weighted mean (a loop implementation of the
  vectorized aggregator, drawing from the same key); `client_data_transform` is
  the same function `fedavg` takes, applied (jitted) to each client's padded data
  as there, then the padding is dropped.
  """

  def __init__(self, apply: Callable, *, client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation | None = None,
               clients_per_round: int, batch_size: int, epochs: int | None = None,
               steps: int | None = None, weighting: str = "examples",
               loss: local.PerExampleLoss | None = None,
               aggregator: Callable | None = None,
               client_data_transform: Callable | None = None):
    local.check_schedule(batch_size, epochs, steps)
    self.aggregator = aggregator
    self.client_data_transform = (None if client_data_transform is None
                                  else jax.jit(client_data_transform))
    self.client_optimizer = client_optimizer
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    self.clients_per_round = clients_per_round
    self.batch_size, self.epochs, self.steps = batch_size, epochs, steps
    self.weighting = weighting
    loss = loss or cross_entropy(apply)

    def batch_loss(params, x, y):
      return jnp.mean(loss(params, x, y))

    @compile_lib.jit
    def train_step(params, opt_state, x, y):
      value, grads = jax.value_and_grad(batch_loss)(params, x, y)
      updates, opt_state = client_optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    @compile_lib.jit
    def server_step(params, opt_state, delta):
      pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
      updates, opt_state = self.server_optimizer.update(pseudo_grad, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._train_step, self._server_step = train_step, server_step
    self._order = jax.jit(local.epoch_order, static_argnums=2)

  def init(self, params: Params, key: jax.Array) -> ServerState:
    return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32), key)

  def client_update(self, params: Params, x: np.ndarray, y: np.ndarray,
                    key: jax.Array) -> tuple[Params, float, int]:
    """Trains one client alone; returns (delta, summed training loss, examples trained)."""
    n, b = len(x), self.batch_size
    spe = local.steps_per_epoch(n, b)
    total = self.epochs * spe if self.epochs is not None else self.steps
    start, opt_state = params, self.client_optimizer.init(params)
    loss_sum, count, order = 0.0, 0, None
    for s in range(total):
      epoch, batch = divmod(s, spe)
      if batch == 0:
        order = np.asarray(self._order(jax.random.fold_in(key, epoch), n, n))
      index = order[batch * b:(batch + 1) * b]
      params, opt_state, value = self._train_step(params, opt_state, x[index], y[index])
      loss_sum += float(value) * len(index)
      count += len(index)
    delta = jax.tree_util.tree_map(jnp.subtract, params, start)
    return delta, loss_sum, count

  def round(self, state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    next_key, sample_key, train_key = round_keys(state.key)
    ids = np.asarray(sample_clients(sample_key, data.num_clients, self.clients_per_round))
    deltas, weights, loss_sum, count = [], [], 0.0, 0
    for i in ids:
      x, y = data.client(int(i))
      if self.client_data_transform is not None:
        x, y, n = self.client_data_transform(data.x[i], data.y[i], data.counts[i], jnp.int32(i),
                                             client_data_key(train_key, int(i)))
        x, y = np.asarray(x)[:int(n)], np.asarray(y)[:int(n)]
      delta, l, c = self.client_update(state.params, x, y, client_key(train_key, int(i)))
      deltas.append(jax.tree_util.tree_map(np.asarray, delta))
      weights.append(float(len(x)) if self.weighting == "examples" else 1.0)
      loss_sum, count = loss_sum + l, count + c
    if self.aggregator is not None:
      mean = self.aggregator(deltas, np.array(weights), ids, aggregation_key(sample_key))
    else:
      w = np.array(weights) / np.sum(weights)
      mean = jax.tree_util.tree_map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
    params, opt_state = self._server_step(state.params, state.opt_state, mean)
    metrics = {"train_loss": loss_sum / count, "client_ids": ids}
    return ServerState(params, opt_state, state.round + 1, next_key), metrics

  def run(self, state: ServerState, data: FederatedData, rounds: int):
    """Runs `rounds` rounds; returns (state, list of per-round metrics)."""
    history = []
    for _ in range(rounds):
      state, metrics = self.round(state, data)
      history.append(metrics)
    return state, history
