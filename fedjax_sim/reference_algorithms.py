"""Loop-based references of FedProx, SCAFFOLD, FedNova, FedDyn, MimeLite, Ditto, q-FFL,
FedExP and FedRep.

Each runs its algorithm as the papers write it: client by client in Python, each
client training alone on its unpadded examples with a jitted step per minibatch
(`reference.LoopTrainer`), per-client state kept as one pytree per client, and the
server's rule computed on the host in numpy. They share only the random draws with
the vectorized algorithms (which clients, which example order), so the tests can
hold each vectorized round to its reference on the same keys.

Every class mirrors its factory's arguments (without chunking) and has
`init(params, key[, num_clients])`, `round(state, data)` and `run(state, data, rounds)`.
`client_states` is a list with one pytree per client; `stacked(state)` stacks it.
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
from fedjax_sim.algorithms.base import (ServerState, aggregation_key, client_key, round_keys,
                                        sample_clients)
from fedjax_sim.algorithms.ditto import personal_train_key
from fedjax_sim.algorithms.fedrep import head_mask, merge, split
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy
from fedjax_sim.reference import LoopTrainer, ReferenceFedAvg

Params = Any


def _host(tree: Params) -> Params:
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _combine(coefs, trees: list[Params]) -> Params:
  """sum_j coefs[j] * trees[j], leaf by leaf, on the host."""
  return jax.tree_util.tree_map(lambda *leaves: sum(c * a for c, a in zip(coefs, leaves)), *trees)


def _lin(*terms) -> Params:
  """A linear combination of pytrees given as (coefficient, tree) pairs."""
  coefs, trees = zip(*terms)
  return _combine(coefs, [_host(t) for t in trees])


def _vdot(a: Params, b: Params) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                            jax.tree_util.tree_leaves(b)))


def _sq_norm(tree: Params) -> float:
  return float(sum(np.sum(np.square(a)) for a in jax.tree_util.tree_leaves(_host(tree))))


def stacked(state: ServerState) -> Params:
  """A reference state's per-client list as one pytree with a leading client axis."""
  return jax.tree_util.tree_map(lambda *rows: np.stack(rows), *state.client_states)


class _LoopAlgorithm:
  """What the loop references share: sampling, weights, a full-batch loss, `run`."""

  def __init__(self, apply: Callable, *, clients_per_round: int, weighting: str,
               loss: local.PerExampleLoss | None):
    self.loss = loss or cross_entropy(apply)
    self.clients_per_round, self.weighting = clients_per_round, weighting
    mean_loss = lambda params, x, y: jnp.mean(self.loss(params, x, y))
    self._loss_and_grad = compile_lib.jit(jax.value_and_grad(mean_loss))

  def draw(self, state: ServerState, data: FederatedData):
    """(next state key, sampled ids as ints, training key), as the vectorized round draws."""
    next_key, sample_key, train_key = round_keys(state.key)
    ids = np.asarray(sample_clients(sample_key, data.num_clients, self.clients_per_round))
    return next_key, [int(i) for i in ids], train_key

  def weight(self, data: FederatedData, i: int) -> float:
    return float(data.counts[i]) if self.weighting == "examples" else 1.0

  def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray):
    """The client's full-batch loss and gradient at `params`."""
    value, grad = self._loss_and_grad(params, x, y)
    return float(value), grad

  @staticmethod
  def metrics(ids, loss_sum: float, count: int, **extra) -> dict:
    return {"train_loss": loss_sum / count, "client_ids": np.array(ids), **extra}

  run = ReferenceFedAvg.run  # rounds in a loop: (state, list of per-round metrics)


def _fedopt_step(server_optimizer: optax.GradientTransformation) -> Callable:
  @compile_lib.jit
  def step(params, opt_state, delta):
    pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
    updates, opt_state = server_optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def ReferenceFedProx(apply: Callable, *, mu: float, **kwargs) -> ReferenceFedAvg:
  """FedProx from the loop: ReferenceFedAvg with mu/2 ||w - w_global||^2 in each step."""
  prox = lambda params, anchor: 0.5 * mu * sum(
      jnp.sum((p - a) ** 2) for p, a in zip(jax.tree_util.tree_leaves(params),
                                            jax.tree_util.tree_leaves(anchor)))
  return ReferenceFedAvg(apply, regularizer=prox, **kwargs)


class ReferenceScaffold(_LoopAlgorithm):
  """SCAFFOLD option II, client by client (see `algorithms.scaffold`)."""

  def __init__(self, apply, *, client_learning_rate, clients_per_round, batch_size, epochs=None,
               steps=None, server_optimizer=None, weighting="examples", loss=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.lr = client_learning_rate
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    # The corrected step y <- y - lr (g - c_i + c), written as the gradient of <c - c_i, y>.
    self.trainer = LoopTrainer(self.loss, optax.sgd(client_learning_rate), batch_size=batch_size,
                               epochs=epochs, steps=steps, regularizer=_vdot)
    self._server_step = _fedopt_step(self.server_optimizer)

  def init(self, params, key, num_clients):
    zeros = _host(optax.tree.zeros_like(params))
    return ServerState(params, self.server_optimizer.init(params), 0, key,
                       client_states=[zeros] * num_clients, algorithm_state=zeros)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    c, client_states = state.algorithm_state, list(state.client_states)
    deltas, changes, weights, loss_sum, count = [], [], [], 0.0, 0
    for i in ids:
      x, y = data.client(i)
      c_i = client_states[i]
      delta, l, n, k = self.trainer.train(state.params, x, y, client_key(train_key, i),
                                          _lin((1, c), (-1, c_i)))
      # Option II: c_i+ = c_i - c + (x - y_i) / (K lr); a client that took no step keeps c_i.
      new_c_i = _lin((1, c_i), (-1, c), (-1 / (k * self.lr), delta)) if k else c_i
      changes.append(_lin((1, new_c_i), (-1, c_i)))
      client_states[i] = new_c_i
      deltas.append(_host(delta))
      weights.append(self.weight(data, i))
      loss_sum, count = loss_sum + l, count + n
    total = sum(self.weight(data, j) for j in range(data.num_clients))
    c = _lin((1, c), (1, _combine([w / total for w in weights], changes)))
    mean = _combine(np.array(weights) / sum(weights), deltas)
    params, opt_state = self._server_step(state.params, state.opt_state, mean)
    return (ServerState(params, opt_state, state.round + 1, next_key, client_states, c),
            self.metrics(ids, loss_sum, count))


class ReferenceFedNova(_LoopAlgorithm):
  """FedNova, client by client (see `algorithms.fednova`)."""

  def __init__(self, apply, *, client_learning_rate, clients_per_round, batch_size, epochs=None,
               steps=None, momentum=0.0, server_optimizer=None, weighting="examples", loss=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.momentum = momentum
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    optimizer = optax.sgd(client_learning_rate, momentum=momentum or None)
    self.trainer = LoopTrainer(self.loss, optimizer, batch_size=batch_size, epochs=epochs,
                               steps=steps)
    self._server_step = _fedopt_step(self.server_optimizer)

  def gradient_weight(self, tau: int) -> float:
    """||a||_1: the summed weight of each step's gradient in the final update."""
    rho = self.momentum
    # Gradient j of tau reaches the model through the momentum of steps j..tau-1.
    return float(sum(sum(rho**s for s in range(tau - j)) for j in range(tau)))

  def init(self, params, key, num_clients=None):
    return ServerState(params, self.server_optimizer.init(params), 0, key)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    normalized, a, weights, loss_sum, count = [], [], [], 0.0, 0
    for i in ids:
      x, y = data.client(i)
      delta, l, n, tau = self.trainer.train(state.params, x, y, client_key(train_key, i))
      a.append(self.gradient_weight(tau))
      normalized.append(_lin((1 / a[-1], delta)))
      weights.append(self.weight(data, i))
      loss_sum, count = loss_sum + l, count + n
    p = np.array(weights) / sum(weights)
    tau_eff = float(np.dot(p, a))
    delta = _combine(tau_eff * p, normalized)
    params, opt_state = self._server_step(state.params, state.opt_state, delta)
    return (ServerState(params, opt_state, state.round + 1, next_key),
            self.metrics(ids, loss_sum, count, tau_eff=tau_eff))


class ReferenceFedDyn(_LoopAlgorithm):
  """FedDyn, client by client (see `algorithms.feddyn`)."""

  def __init__(self, apply, *, alpha, client_optimizer, clients_per_round, batch_size,
               epochs=None, steps=None, weighting="examples", loss=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.alpha = alpha

    def regularizer(params, context):
      grad_k, anchor, alpha_k = context
      diff = jax.tree_util.tree_map(jnp.subtract, params, anchor)
      return -_vdot(grad_k, params) + 0.5 * alpha_k * _vdot(diff, diff)

    self.trainer = LoopTrainer(self.loss, client_optimizer, batch_size=batch_size, epochs=epochs,
                               steps=steps, regularizer=regularizer)

  def init(self, params, key, num_clients):
    zeros = _host(optax.tree.zeros_like(params))
    return ServerState(params, (), 0, key, client_states=[zeros] * num_clients,
                       algorithm_state=zeros)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    m, theta = data.num_clients, state.params
    mean_weight = sum(self.weight(data, j) for j in range(m)) / m
    grads, deltas, loss_sum, count = list(state.client_states), [], 0.0, 0
    for i in ids:
      x, y = data.client(i)
      alpha_k = self.alpha * mean_weight / self.weight(data, i)
      delta, l, n, _ = self.trainer.train(theta, x, y, client_key(train_key, i),
                                          (grads[i], theta, np.float32(alpha_k)))
      grads[i] = _lin((1, grads[i]), (-alpha_k, delta))
      deltas.append(_host(delta))
      loss_sum, count = loss_sum + l, count + n
    h = _lin((1, state.algorithm_state), (-self.alpha / m, _combine([1.0] * len(ids), deltas)))
    mean = _combine([1 / len(ids)] * len(ids), deltas)
    params = _lin((1, theta), (1, mean), (-1 / self.alpha, h))
    params = jax.tree_util.tree_map(lambda a, p: np.asarray(a, p.dtype), params, theta)
    return (ServerState(params, (), state.round + 1, next_key, grads, h),
            self.metrics(ids, loss_sum, count))


class ReferenceMimeLite(_LoopAlgorithm):
  """MimeLite with SGD with momentum, client by client (see `algorithms.mimelite`)."""

  def __init__(self, apply, *, client_learning_rate, clients_per_round, batch_size, epochs=None,
               steps=None, momentum=0.9, server_learning_rate=1.0, weighting="examples",
               loss=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.beta, self.server_lr = momentum, server_learning_rate
    # y <- y - lr ((1 - beta) g + beta m) is SGD at lr (1 - beta) on f + beta/(1-beta) <m, y>.
    ratio = momentum / (1 - momentum)
    self.trainer = LoopTrainer(self.loss, optax.sgd(client_learning_rate * (1 - momentum)),
                               batch_size=batch_size, epochs=epochs, steps=steps,
                               regularizer=lambda params, m: ratio * _vdot(m, params))

  def init(self, params, key, num_clients=None):
    return ServerState(params, (), 0, key, algorithm_state=_host(optax.tree.zeros_like(params)))

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    m = state.algorithm_state
    m32 = jax.tree_util.tree_map(np.float32, m)
    deltas, grads, weights, loss_sum, count = [], [], [], 0.0, 0
    for i in ids:
      x, y = data.client(i)
      delta, l, n, _ = self.trainer.train(state.params, x, y, client_key(train_key, i), m32)
      grads.append(_host(self.loss_and_grad(state.params, x, y)[1]))
      deltas.append(_host(delta))
      weights.append(self.weight(data, i))
      loss_sum, count = loss_sum + l, count + n
    p = np.array(weights) / sum(weights)
    m = _lin((1 - self.beta, _combine(p, grads)), (self.beta, m))
    params = _lin((1, state.params), (self.server_lr, _combine(p, deltas)))
    params = jax.tree_util.tree_map(lambda a, q: np.asarray(a, q.dtype), params, state.params)
    return (ServerState(params, (), state.round + 1, next_key, algorithm_state=m),
            self.metrics(ids, loss_sum, count))


class ReferenceDitto:
  """Ditto: ReferenceFedAvg for the global model, then each sampled client's personal
  steps from Python (see `algorithms.ditto`)."""

  def __init__(self, apply, *, lam, client_optimizer, clients_per_round, batch_size,
               epochs=None, steps=None, personal_optimizer=None, loss=None, **fedavg_args):
    self.global_reference = ReferenceFedAvg(
        apply, client_optimizer=client_optimizer, clients_per_round=clients_per_round,
        batch_size=batch_size, epochs=epochs, steps=steps, loss=loss, **fedavg_args)
    prox = lambda v, w: 0.5 * lam * sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(w)))
    self.trainer = LoopTrainer(loss or cross_entropy(apply), personal_optimizer or client_optimizer,
                               batch_size=batch_size, epochs=epochs, steps=steps,
                               regularizer=prox)

  def init(self, params, key, num_clients):
    return self.global_reference.init(params, key)._replace(
        client_states=[params] * num_clients)

  def round(self, state, data):
    new_state, metrics = self.global_reference.round(state, data)
    personal, key = list(state.client_states), personal_train_key(state.key)
    loss_sum, count = 0.0, 0
    for i in metrics["client_ids"]:
      x, y = data.client(int(i))
      delta, l, n, _ = self.trainer.train(personal[i], x, y, client_key(key, int(i)), state.params)
      personal[i] = jax.tree_util.tree_map(jnp.add, personal[i], delta)
      loss_sum, count = loss_sum + l, count + n
    metrics["personal_train_loss"] = loss_sum / count
    return new_state._replace(client_states=personal), metrics

  run = ReferenceFedAvg.run


class ReferenceQFFL(_LoopAlgorithm):
  """q-FedAvg, client by client (see `algorithms.qffl`)."""

  def __init__(self, apply, *, q, client_learning_rate, clients_per_round, batch_size,
               epochs=None, steps=None, weighting="examples", loss=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.q, self.lipschitz = q, 1.0 / client_learning_rate
    self.trainer = LoopTrainer(self.loss, optax.sgd(client_learning_rate), batch_size=batch_size,
                               epochs=epochs, steps=steps)

  def init(self, params, key, num_clients=None):
    return ServerState(params, (), 0, key)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    q, L = self.q, self.lipschitz
    numerator, denominator, loss_sum, count = [], 0.0, 0.0, 0
    for i in ids:
      x, y = data.client(i)
      f = self.loss_and_grad(state.params, x, y)[0] + 1e-10
      delta, l, n, _ = self.trainer.train(state.params, x, y, client_key(train_key, i))
      step = _lin((-L, delta))  # L (w^t - wbar_k)
      h = q * f ** (q - 1) * _sq_norm(step) + L * f**q if q else L
      numerator.append(_lin((self.weight(data, i) * f**q, step)))
      denominator += self.weight(data, i) * h
      loss_sum, count = loss_sum + l, count + n
    params = _lin((1, state.params), (-1 / denominator, _combine([1.0] * len(ids), numerator)))
    params = jax.tree_util.tree_map(lambda a, p: np.asarray(a, p.dtype), params, state.params)
    return (ServerState(params, (), state.round + 1, next_key), self.metrics(ids, loss_sum, count))


class ReferenceFedExP(_LoopAlgorithm):
  """FedExP, client by client (see `algorithms.fedexp`), eta_g in float64 on the host.

  `aggregator`, if given, is a host-side `aggregate(uploads, weights, ids, key) ->
  upload` over the clients' `{'delta', 'sq_norm'}` (tests/aggregation_reference.py),
  drawing from the round's aggregation key, in place of the weighted means.
  """

  def __init__(self, apply, *, client_optimizer, clients_per_round, batch_size, epochs=None,
               steps=None, eps=1e-3, server_optimizer=None, weighting="examples", loss=None,
               aggregator=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.eps, self.aggregator = eps, aggregator
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    self.trainer = LoopTrainer(self.loss, client_optimizer, batch_size=batch_size, epochs=epochs,
                               steps=steps)
    self._server_step = _fedopt_step(self.server_optimizer)

  def init(self, params, key, num_clients=None):
    return ServerState(params, self.server_optimizer.init(params), 0, key)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    uploads, weights, loss_sum, count = [], [], 0.0, 0
    for i in ids:
      x, y = data.client(i)
      delta, l, n, _ = self.trainer.train(state.params, x, y, client_key(train_key, i))
      uploads.append({"delta": _host(delta), "sq_norm": _sq_norm(delta)})
      weights.append(self.weight(data, i))
      loss_sum, count = loss_sum + l, count + n
    if self.aggregator is None:
      mean = _combine(np.array(weights) / sum(weights), uploads)
    else:
      mean = self.aggregator(uploads, np.array(weights), np.array(ids),
                             aggregation_key(round_keys(state.key)[1]))
    # eta_g = max(1, sum_i p_i ||Delta_i||^2 / (2 (||sum_i p_i Delta_i||^2 + eps))).
    eta = max(1.0, float(mean["sq_norm"]) / (2 * (_sq_norm(mean["delta"]) + self.eps)))
    params, opt_state = self._server_step(state.params, state.opt_state,
                                          _lin((eta, mean["delta"])))
    return (ServerState(params, opt_state, state.round + 1, next_key),
            self.metrics(ids, loss_sum, count, eta_g=eta))


class ReferenceFedRep(_LoopAlgorithm):
  """FedRep, client by client (see `algorithms.fedrep`). Each phase trains the whole model
  with an optimizer that zeroes the frozen part's updates (`optax.multi_transform` with
  `set_to_zero`): another way of freezing it than the vectorized one, which
  differentiates the trained part only. `client_states` is a list of heads (the params
  pytree with None in place of the body); `aggregator` as in ReferenceFedExP, over the
  body deltas.
  """

  def __init__(self, apply, *, head, client_optimizer, clients_per_round, batch_size,
               epochs=None, steps=None, head_optimizer=None, head_epochs=None, head_steps=None,
               server_optimizer=None, weighting="examples", loss=None, aggregator=None):
    super().__init__(apply, clients_per_round=clients_per_round, weighting=weighting, loss=loss)
    self.head, self.aggregator = head, aggregator
    self.server_optimizer = server_optimizer or optax.sgd(1.0)
    self._server_step = _fedopt_step(self.server_optimizer)
    if head_epochs is None and head_steps is None:
      head_epochs, head_steps = epochs, steps

    def only(optimizer, train_head: bool):
      labels = lambda params: jax.tree_util.tree_map(
          lambda m: "trained" if bool(m) == train_head else "frozen",
          head_mask(head, params))
      return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)

    self.head_trainer = LoopTrainer(self.loss, only(head_optimizer or client_optimizer, True),
                                    batch_size=batch_size, epochs=head_epochs, steps=head_steps)
    self.body_trainer = LoopTrainer(self.loss, only(client_optimizer, False),
                                    batch_size=batch_size, epochs=epochs, steps=steps)

  def init(self, params, key, num_clients):
    head = split(self.head, params)[1]
    return ServerState(params, self.server_optimizer.init(params), 0, key,
                       client_states=[head] * num_clients)

  def round(self, state, data):
    next_key, ids, train_key = self.draw(state, data)
    head_key = personal_train_key(state.key)
    heads, bodies, weights = list(state.client_states), [], []
    loss_sum, count, head_loss_sum, head_count = 0.0, 0, 0.0, 0
    for i in ids:
      x, y = data.client(i)
      start = merge(state.params, heads[i])
      delta, l, n, _ = self.head_trainer.train(start, x, y, client_key(head_key, i))
      tuned = jax.tree_util.tree_map(jnp.add, start, delta)
      heads[i] = jax.device_get(split(self.head, tuned)[1])
      head_loss_sum, head_count = head_loss_sum + l, head_count + n
      delta, l, n, _ = self.body_trainer.train(tuned, x, y, client_key(train_key, i))
      bodies.append(_host(split(self.head, delta)[0]))
      weights.append(self.weight(data, i))
      loss_sum, count = loss_sum + l, count + n
    if self.aggregator is None:
      mean = _combine(np.array(weights) / sum(weights), bodies)
    else:
      mean = self.aggregator(bodies, np.array(weights), np.array(ids),
                             aggregation_key(round_keys(state.key)[1]))
    delta = merge(_host(optax.tree.zeros_like(state.params)), mean)
    params, opt_state = self._server_step(state.params, state.opt_state, delta)
    return (ServerState(params, opt_state, state.round + 1, next_key, heads),
            self.metrics(ids, loss_sum, count, head_train_loss=head_loss_sum / head_count))
