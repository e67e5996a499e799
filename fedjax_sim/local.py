"""Local training of one client, written for a padded client so that it vmaps.

A client with `n` real examples among `max_examples` padded slots trains exactly as
it would alone on its `n` examples: each epoch visits its examples in a fresh
random order in minibatches of `batch_size` (the last one smaller), and padded
slots and the steps a smaller client does not take are masked out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
# loss(params, x, y) -> per-example losses [batch]; for sequences, the mean over tokens.
PerExampleLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]


class LocalResult(NamedTuple):
  """What a client sends back and reports."""

  delta: Params           # trained params minus the params it started from
  loss_sum: jax.Array     # sum of per-example training losses over all local steps
  num_trained: jax.Array  # examples processed over all local steps (repeats counted)
  num_steps: jax.Array    # local steps taken (FedNova normalizes by it)


# regularizer(params, context) -> scalar added to every local step's objective, where
# `context` is whatever the algorithm passes per client (FedProx: the global params).
Regularizer = Callable[[Params, Any], jax.Array]


def epoch_order(key: jax.Array, num_examples: jax.Array, max_examples: int) -> jax.Array:
  """A random order of the real examples `0..num_examples-1`, then the padding slots.

  Each example's sort key depends only on `(key, index)`, so the order of the real
  examples is the same whatever the padding: that is what makes padding invariant.
  """
  index = jnp.arange(max_examples)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(index)
  return jnp.argsort(jnp.where(index < num_examples, u, 2.0), stable=True)


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
  """Builds `local_update(params, x, y, n, key, context=None, step_budget=None)`.

  The returned function trains one padded client: `x [max_examples, ...]`,
  `y [max_examples, ...]`, `n` real examples, a per-client `key`. It vmaps over clients.

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

  def train_step(carry, x, y, index, mask, context, budget):
    params, opt_state, loss_sum, count, taken = carry
    active = taken < budget
    mask = mask.astype(jnp.float32)
    (_, value), grads = grad_fn(params, x[index], y[index], mask, context)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(active, new, old)
    params = jax.tree_util.tree_map(keep, new_params, params)
    opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
    num = jnp.where(active, jnp.sum(mask), 0.0)
    return params, opt_state, loss_sum + value * num, count + num, taken + active

  def local_update(params, x, y, n, key, context=None, step_budget=None) -> LocalResult:
    max_n = x.shape[0]
    num_batches = math.ceil(max_n / batch_size)
    positions = jnp.arange(batch_size)
    spe = steps_per_epoch(n, batch_size)
    budget = jnp.iinfo(jnp.int32).max if step_budget is None else step_budget
    zero = jnp.zeros(())
    carry = (params, optimizer.init(params), zero, zero, jnp.zeros((), jnp.int32))

    def padded_order(epoch):
      order = epoch_order(jax.random.fold_in(key, epoch), n, max_n)
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
      def step_body(carry, s):
        epoch, b = s // spe, s % spe
        index = jax.lax.dynamic_slice(padded_order(epoch), (b * batch_size,), (batch_size,))
        mask = b * batch_size + positions < n
        return train_step(carry, x, y, index, mask, context, budget), None

      carry = jax.lax.scan(step_body, carry, jnp.arange(steps))[0]

    trained, _, loss_sum, count, taken = carry
    delta = jax.tree_util.tree_map(jnp.subtract, trained, params)
    return LocalResult(delta, loss_sum, count, taken)

  return local_update


def check_schedule(batch_size: int, epochs: int | None, steps: int | None) -> None:
  """Raises ValueError for a schedule that is not exactly one of epochs/steps, >= 1."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if (epochs is None) == (steps is None):
    raise ValueError("give exactly one of epochs= or steps=")
  value, name = (epochs, "epochs") if epochs is not None else (steps, "steps")
  if not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
