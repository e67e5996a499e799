"""The loop-based reference: the same algorithm run client by client from Python.

Each client trains alone on its unpadded examples with a jitted per-batch step
(the last batch of an epoch is smaller, as it would be on a device); the server
averages the deltas on the host. It shares only the random draws with the
vectorized engine (which clients, which example order), so it is an independent
oracle for the tests and the baseline for the benchmarks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import compile as compile_lib
from fedjax_sim import local
from fedjax_sim.data import FederatedData
from fedjax_sim.algorithms.base import (ServerState, aggregation_key, check_clients_per_round,
                                       check_round_args, client_data_key, client_key,
                                       round_keys, sample_clients)
from fedjax_sim.losses import cross_entropy

Params = Any


@functools.partial(jax.jit, static_argnums=2)
def _padded_epoch_order(key, n, slots):
  return local.epoch_order(key, n, slots)


def _epoch_order(key: jax.Array, n: int) -> np.ndarray:
  """`local.epoch_order(key, n, n)`, computed in at least 64 slots: the order of the
  real examples does not depend on the padding, and one compile then serves every
  small client."""
  slots = max(64, 1 << (n - 1).bit_length())
  return np.asarray(_padded_epoch_order(key, n, slots))[:n]


class LoopTrainer:
  """One client's local training from Python: a jitted step per minibatch.

  The loop counterpart of `local.make_local_update`: the same schedule (epochs of
  `epoch_order`, or a fixed number of steps cycling through epochs), on the
  client's unpadded examples, with the last batch of an epoch smaller.
  """

  def __init__(self, loss: local.PerExampleLoss, optimizer: optax.GradientTransformation, *,
               batch_size: int, epochs: int | None = None, steps: int | None = None,
               regularizer: local.Regularizer | None = None):
    local.check_schedule(batch_size, epochs, steps)
    self.optimizer = optimizer
    self.batch_size, self.epochs, self.steps = batch_size, epochs, steps

    def objective(params, x, y, context):
      data_loss = jnp.mean(loss(params, x, y))
      reg = 0.0 if regularizer is None else regularizer(params, context)
      return data_loss + reg, data_loss

    @compile_lib.jit
    def train_step(params, opt_state, x, y, context):
      (_, value), grads = jax.value_and_grad(objective, has_aux=True)(params, x, y, context)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    self._train_step = train_step

  def train(self, params: Params, x: np.ndarray, y: np.ndarray, key: jax.Array,
            context: Any = None) -> tuple[Params, float, int, int]:
    """Trains from `params` on (x, y); returns (delta, summed loss, examples, steps)."""
    n, b = len(x), self.batch_size
    if n == 0:  # as the vectorized step: no example, no step
      return jax.tree_util.tree_map(jnp.zeros_like, params), 0.0, 0, 0
    spe = local.steps_per_epoch(n, b)
    total = self.epochs * spe if self.epochs is not None else self.steps
    start, opt_state = params, self.optimizer.init(params)
    loss_sum, count, order = 0.0, 0, None
    for s in range(total):
      epoch, batch = divmod(s, spe)
      if batch == 0:
        order = _epoch_order(jax.random.fold_in(key, epoch), n)
      index = order[batch * b:(batch + 1) * b]
      params, opt_state, value = self._train_step(params, opt_state, x[index], y[index], context)
      loss_sum += float(value) * len(index)
      count += len(index)
    delta = jax.tree_util.tree_map(jnp.subtract, params, start)
    return delta, loss_sum, count, total


class ReferenceFedAvg:
  """FedAvg/FedOpt with a Python loop over clients and over local batches.

  Mirrors `fedavg(...)`: the same arguments (but no chunking) and the same
  `init(params, key)`; `round(state, data)` runs on the host. A `regularizer`
  gets the global params as its context, as in `fedavg` (FedProx). `aggregator`, if
  given, is a host-side `aggregate(deltas: list of pytrees, weights [C], ids [C],
  key) -> delta` in place of the weighted mean (a loop implementation of the
  vectorized aggregator, drawing from the same key; an `ignores_weights` attribute
  of True makes every client weigh 1, as in `fedavg`); `client_data_transform` is
  the same function `fedavg` takes, applied (jitted) to each client's padded data
  as there, then the padding is dropped.
  """

  def __init__(self, apply: Callable, *, client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation | None = None,
               clients_per_round: int, batch_size: int, epochs: int | None = None,
               steps: int | None = None, weighting: str = "examples",
               loss: local.PerExampleLoss | None = None,
               regularizer: local.Regularizer | None = None,
               aggregator: Callable | None = None,
               client_data_transform: Callable | None = None):
    # The arguments fedavg checks, checked alike: a misspelt weighting was uniform here.
    check_round_args(clients_per_round, weighting, None)
    local.check_schedule(batch_size, epochs, steps)
    self.aggregator = aggregator
    self.client_data_transform = (None if client_data_transform is None
                                  else jax.jit(client_data_transform))
    self.trainer = LoopTrainer(loss or cross_entropy(apply), client_optimizer,
                               batch_size=batch_size, epochs=epochs, steps=steps,
                               regularizer=regularizer)
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    self.clients_per_round = clients_per_round
    self.weighting = weighting

    @compile_lib.jit
    def server_step(params, opt_state, delta):
      pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
      updates, opt_state = self.server_optimizer.update(pseudo_grad, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._server_step = server_step

  def init(self, params: Params, key: jax.Array) -> ServerState:
    return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32), key)

  def client_update(self, params: Params, x: np.ndarray, y: np.ndarray,
                    key: jax.Array) -> tuple[Params, float, int]:
    """Trains one client alone; returns (delta, summed training loss, examples trained)."""
    delta, loss_sum, count, _ = self.trainer.train(params, x, y, key, params)
    return delta, loss_sum, count

  def round(self, state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    check_clients_per_round(self.clients_per_round, data)
    next_key, sample_key, train_key = round_keys(state.key)
    ids = np.asarray(sample_clients(sample_key, data.num_clients, self.clients_per_round))
    deltas, weights, loss_sum, count = [], [], 0.0, 0
    # As in fedavg: an aggregator that ignores the weights makes every client count once.
    by_examples = (self.weighting == "examples"
                   and not getattr(self.aggregator, "ignores_weights", False))
    for i in ids:
      x, y = data.client(int(i))
      if self.client_data_transform is not None:
        x, y, n = self.client_data_transform(data.x[i], data.y[i], data.counts[i], jnp.int32(i),
                                             client_data_key(train_key, int(i)))
        x, y = np.asarray(x)[:int(n)], np.asarray(y)[:int(n)]
      delta, l, c = self.client_update(state.params, x, y, client_key(train_key, int(i)))
      deltas.append(jax.tree_util.tree_map(np.asarray, delta))
      # A client without examples takes no part, under either weighting (as in fedavg).
      weights.append(float(len(x)) if by_examples else float(len(x) > 0))
      loss_sum, count = loss_sum + l, count + c
    if self.aggregator is not None:
      mean = self.aggregator(deltas, np.array(weights), ids, aggregation_key(sample_key))
    elif sum(weights) > 0:
      w = np.array(weights) / np.sum(weights)
      mean = jax.tree_util.tree_map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
    if sum(weights) > 0:
      params, opt_state = self._server_step(state.params, state.opt_state, mean)
    else:  # no client with examples: no update, the optimizer's momentum included
      params, opt_state = state.params, state.opt_state
    metrics = {"train_loss": loss_sum / count if count else float("nan"), "client_ids": ids}
    return ServerState(params, opt_state, state.round + 1, next_key), metrics

  def run(self, state: ServerState, data: FederatedData, rounds: int):
    """Runs `rounds` rounds; returns (state, list of per-round metrics)."""
    history = []
    for _ in range(rounds):
      state, metrics = self.round(state, data)
      history.append(metrics)
    return state, history
