"""Local training of one client, written for a padded client so that it vmaps.

A client with `n` real examples among `max_examples` padded slots trains exactly as
it would alone on its `n` examples: each epoch visits its examples in a fresh
random order in minibatches of `batch_size` (the last one smaller), and padded
slots and the steps a smaller client does not take are masked out.

Those masks are paid only where a batch can hold a padded slot: when the host knows
that every client has the same count `n` and `n` divides into batches (`n` given as a
Python int, as the engine does from `FederatedData.count_range`), the step is a plain
minibatch step in a loop of static length, with the same example order and results.
Epoch orders are sorted once per epoch in both modes (all needed ones up front where
they fit in `_ORDER_SLOTS`).

A client's data may be a `ClientRows` view of the round's dataset: a step then gathers
its minibatch straight from the dataset, with no copy of the client's data made first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import checks
from fedjax_sim.tree import same_dtypes

Params = Any
# loss(params, x, y) -> per-example losses [batch]; for sequences, the mean over tokens.
PerExampleLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClientRows:
  """Client `row`'s examples in `source` (`[clients, max_examples, ...]`), not copied
  out: indexing it gathers the rows straight from `source`.

  Local training reads its data only by minibatch index, so handing it this instead
  of `source[row]` spares the copy of every sampled client's data before the steps
  (under vmap a `[clients, max_examples, ...]` buffer, the largest of the round for
  the peers' 600-example MLP), and each step gathers its batch from `source`.
  """

  source: jax.Array
  row: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.source.shape[1:])

  def __getitem__(self, index) -> jax.Array:
    return self.source[self.row, index]


class LocalResult(NamedTuple):
  """What a client sends back and reports."""

  delta: Params           # trained params minus the params it started from
  loss_sum: jax.Array     # sum of per-example training losses over all local steps
  num_trained: jax.Array  # examples processed over all local steps (repeats counted)
  num_steps: jax.Array    # local steps taken (FedNova normalizes by it)


# regularizer(params, context) -> scalar added to every local step's objective, where
# `context` is whatever the algorithm passes per client (FedProx: the global params).
Regularizer = Callable[[Params, Any], jax.Array]


def _sort_keys(key: jax.Array, size: int) -> jax.Array:
  """Example i's sort key: a uniform draw from `fold_in(key, i)`, for i < size."""
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(size))


def epoch_order(key: jax.Array, num_examples: jax.Array, max_examples: int) -> jax.Array:
  """A random order of the real examples `0..num_examples-1`, then the padding slots.

  Each example's sort key depends only on `(key, index)`, so the order of the real
  examples is the same whatever the padding: that is what makes padding invariant.
  """
  index = jnp.arange(max_examples)
  u = _sort_keys(key, max_examples)
  return jnp.argsort(jnp.where(index < num_examples, u, 2.0), stable=True)


# The most epoch-order slots (int32, per client) computed up front, before the steps;
# past it orders are computed in the loop (once per epoch where counts are static, in
# every step for ragged clients in `steps=` mode), so memory stays bounded.
_ORDER_SLOTS = 1 << 16


def steps_per_epoch(num_examples, batch_size: int):
  return (num_examples + batch_size - 1) // batch_size


def make_local_update(
    loss: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    regularizer: Regularizer | None = None,
) -> Callable[..., LocalResult]:
  """Builds `local_update(params, x, y, n, key, context=None, step_budget=None, *,
  min_examples=None)`.

  The returned function trains one padded client: `x [max_examples, ...]`,
  `y [max_examples, ...]`, `n` real examples, a per-client `key`. It vmaps over clients.
  `n` may be a Python int, known on the host to be every client's count: then, without
  a `step_budget` and when `n` divides into batches, no batch has a padded slot and the
  step is compiled without masks (the same results to float rounding). `min_examples`
  (static, optional) is a lower bound on `n` over the clients trained together: it
  bounds how many epoch orders `steps=` mode computes up front.

  Args:
    loss: per-example loss function.
    optimizer: the client's optax optimizer, initialised afresh each round.
    batch_size: minibatch size B.
    epochs: E local epochs (each client takes E * ceil(n / B) steps), or
    steps: a fixed number of local steps for every client, cycling through
      reshuffled epochs of its data. Give exactly one of the two.
    regularizer: optional `regularizer(params, context)` added to each step's
      objective (not to the reported training loss); `context` is the
      `local_update` argument of that name.

  `step_budget`, if given, caps the steps this client takes (a straggler's
  partial work); steps past it are masked out like padding.
  """
  check_schedule(batch_size, epochs, steps)

  def objective(params, xb, yb, mask, context):
    per_example = loss(params, xb, yb)
    data_loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    total = data_loss if regularizer is None else data_loss + regularizer(params, context)
    return total, data_loss

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def full_objective(params, xb, yb, context):
    data_loss = jnp.sum(loss(params, xb, yb)) / float(batch_size)
    total = data_loss if regularizer is None else data_loss + regularizer(params, context)
    return total, data_loss

  full_grad_fn = jax.value_and_grad(full_objective, has_aux=True)

  def train_step(carry, x, y, index, mask, context, budget):
    params, opt_state, loss_sum, count, taken = carry
    active = taken < budget
    mask = mask.astype(jnp.float32)
    (_, value), grads = grad_fn(params, x[index], y[index], mask, context)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    # A float32 hyperparameter (FedNova's momentum, from the state's hp) turned a bfloat16
    # model's momentum trace float32, which the scan over steps refuses as its carry.
    new_opt_state = same_dtypes(new_opt_state, opt_state)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(active, new, old)
    params = jax.tree_util.tree_map(keep, new_params, params)
    opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
    num = jnp.where(active, jnp.sum(mask), 0.0)
    return params, opt_state, loss_sum + value * num, count + num, taken + active

  def full_batches_update(params, x, y, n: int, key, context) -> LocalResult:
    """Every client has exactly `n` examples, a multiple of the batch size (static):
    every batch is full, so a step has no mask, no normalisation by a count and no
    keep-or-discard select, and the loops have static lengths. The same order and
    arithmetic as the general path (to float rounding)."""
    spe = n // batch_size
    total = epochs * spe if epochs is not None else steps
    full_epochs, rest = divmod(total, spe)

    def step(carry, index):
      params, opt_state, loss_sum = carry
      (_, value), grads = full_grad_fn(params, x[index], y[index], context)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), same_dtypes(new_opt_state, opt_state),
              loss_sum + value * float(batch_size)), None

    def order(epoch):
      return jnp.argsort(_sort_keys(jax.random.fold_in(key, epoch), n), stable=True)

    carry = (params, optimizer.init(params), jnp.zeros(()))
    num_epochs = full_epochs + (rest > 0)
    if num_epochs * n <= _ORDER_SLOTS:
      # Every epoch's order once, up front, then one scan over the steps' index rows.
      rows = jax.vmap(order)(jnp.arange(num_epochs)).reshape(-1, batch_size)[:total]
      carry = jax.lax.scan(step, carry, rows)[0]
    else:  # bounded memory: a scan over epochs, each sorting its order once
      run_epoch = lambda carry, epoch, length: jax.lax.scan(
          step, carry, order(epoch).reshape(spe, batch_size)[:length])[0]
      if full_epochs:
        carry = jax.lax.scan(lambda c, e: (run_epoch(c, e, spe), None), carry,
                             jnp.arange(full_epochs))[0]
      if rest:  # steps= mode: the last epoch is cut short
        carry = run_epoch(carry, full_epochs, rest)
    trained, _, loss_sum = carry
    delta = jax.tree_util.tree_map(jnp.subtract, trained, params)
    return LocalResult(delta, loss_sum, jnp.float32(total * batch_size), jnp.int32(total))

  def local_update(params, x, y, n, key, context=None, step_budget=None, *,
                   min_examples: int | None = None) -> LocalResult:
    x, y = (a if isinstance(a, ClientRows) else jnp.asarray(a) for a in (x, y))
    max_n = x.shape[0]
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
      n = int(n)
      if not 0 <= n <= max_n:
        raise ValueError(f"n={n} examples but the client has {max_n} slots")
      if step_budget is None and n > 0 and n % batch_size == 0:
        return full_batches_update(params, x, y, n, key, context)
      min_examples = n
      n = jnp.asarray(n, jnp.int32)
    num_batches = math.ceil(max_n / batch_size)
    positions = jnp.arange(batch_size)
    spe = steps_per_epoch(n, batch_size)
    budget = jnp.iinfo(jnp.int32).max if step_budget is None else step_budget
    if steps is not None and not (min_examples or 0) > 0:
      # A client without examples takes no step, as in epochs= mode (steps on zero
      # gradients would still move it by weight decay, momentum or a regularizer).
      budget = jnp.where(n > 0, budget, 0)
    zero = jnp.zeros(())
    carry = (params, optimizer.init(params), zero, zero, jnp.zeros((), jnp.int32))

    def padded_order(epoch):
      order = epoch_order(jax.random.fold_in(key, epoch), n, max_n)
      # A batch's padded positions read a real example (the first of the order; slot 0,
      # the pad value, is real too) whose loss the mask zeroes: a padding slot's zeros
      # may make the model non-finite, and 0 x NaN in the gradient is NaN.
      order = jnp.where(jnp.arange(max_n) < n, order, order[0])
      return jnp.pad(order, (0, num_batches * batch_size - max_n))

    if epochs is not None:
      def epoch_body(carry, epoch):
        batches = padded_order(epoch).reshape(num_batches, batch_size)

        # A loop of this client's own `spe` steps: under vmap it runs as many steps as
        # the largest client trained together needs (finished clients are held), not
        # the padded maximum; clients trained one at a time take exactly their own.
        def batch_body(state):
          b, carry = state
          mask = b * batch_size + positions < n
          return b + 1, train_step(carry, x, y, batches[b], mask, context, budget)

        return jax.lax.while_loop(lambda state: state[0] < spe, batch_body,
                                  (jnp.zeros((), jnp.int32), carry))[1], None

      carry = jax.lax.scan(epoch_body, carry, jnp.arange(epochs))[0]
    else:
      # Epochs a client with >= min_examples examples starts within `steps` steps.
      num_epochs = steps
      if min_examples is not None and min_examples > 0:
        num_epochs = min(steps, -(-steps // -(-min_examples // batch_size)))
      if num_epochs * num_batches * batch_size <= _ORDER_SLOTS:
        # Every epoch's order once, up front; a step slices its batch out of it.
        orders = jax.vmap(padded_order)(jnp.arange(num_epochs))
        batch_of = lambda epoch, b: jax.lax.dynamic_slice(
            orders, (epoch, b * batch_size), (1, batch_size))[0]
      else:
        batch_of = lambda epoch, b: jax.lax.dynamic_slice(
            padded_order(epoch), (b * batch_size,), (batch_size,))

      def step_body(carry, s):
        epoch, b = s // spe, s % spe
        mask = b * batch_size + positions < n
        return train_step(carry, x, y, batch_of(epoch, b), mask, context, budget), None

      carry = jax.lax.scan(step_body, carry, jnp.arange(steps))[0]

    trained, _, loss_sum, count, taken = carry
    delta = jax.tree_util.tree_map(jnp.subtract, trained, params)
    return LocalResult(delta, loss_sum, count, taken)

  return local_update


def check_schedule(batch_size: int, epochs: int | None, steps: int | None) -> None:
  """Raises ValueError for a schedule that is not exactly one of epochs/steps, >= 1."""
  if not checks.is_count(batch_size):
    raise checks.count_error("batch_size", batch_size)
  if (epochs is None) == (steps is None):
    raise ValueError("give exactly one of epochs= or steps=")
  value, name = (epochs, "epochs") if epochs is not None else (steps, "steps")
  if not checks.is_count(value):
    raise checks.count_error(name, value)
