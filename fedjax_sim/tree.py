"""Pytree helpers over a leading client axis, below every layer that uses them (the
algorithms, the aggregators, compression), so none of those imports another for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def gather_rows(tree: Any, ids: jax.Array) -> Any:
  """The rows `ids` of every leaf (per-client state of the sampled clients)."""
  return jax.tree_util.tree_map(lambda a: a[ids], tree)


def scatter_rows(tree: Any, ids: jax.Array, rows: Any) -> Any:
  """`tree` with the rows `ids` of every leaf replaced by `rows`."""
  return jax.tree_util.tree_map(lambda a, r: a.at[ids].set(r), tree, rows)


def weighted_sum(weights: jax.Array, stacked: Any) -> Any:
  """sum_c weights[c] * stacked[c] over the leading client axis of every leaf.

  A multiply and a sum, as DrJAX's `reduce_weighted_mean`: XLA fuses it with the
  update's producer into one pass (a dot read the updates after they were written out;
  benchmarks/README.md, "The weighted mean"), and it is float32 arithmetic on
  accelerators, where a default-precision dot rounds its inputs (to TensorFloat-32 on
  recent NVIDIA GPUs, bfloat16 on TPUs)."""
  def leaf_sum(d):
    w = weights.reshape(weights.shape + (1,) * (d.ndim - 1))
    return jnp.sum(w * d, axis=0)
  return jax.tree_util.tree_map(leaf_sum, stacked)


def same_dtypes(new: Any, old: Any) -> Any:
  """`new` cast leaf by leaf to `old`'s dtypes: what a scan's carry needs when float32
  hyperparameters or means meet bfloat16 leaves (they promote them to float32)."""
  return jax.tree_util.tree_map(lambda n, o: n.astype(jnp.result_type(o)), new, old)


def vmap_clients(fn: Callable, args: Any) -> Any:
  """`jax.vmap(fn)(args)` over the leading client axis, except that one client runs
  without vmap: a vmap of size 1 puts a batch dimension of 1 on every op, and XLA:CPU
  then transposed the dense gradients and copied the weights on every local step."""
  if jax.tree_util.tree_leaves(args)[0].shape[0] == 1:
    one = fn(jax.tree_util.tree_map(lambda a: a[0], args))
    return jax.tree_util.tree_map(lambda a: a[None], one)
  return jax.vmap(fn)(args)


def copy(tree: Any) -> Any:
  """A copy of every array in `tree` in new buffers (what a donated argument needs), each
  where it was.

  Arrays this process holds whole are copied by `device_put`, which compiles nothing (a
  jitted copy is one program: 7-10 ms of a run's start-up). Anything else (a
  multi-process run's global arrays, which `device_put` rejects on jax 0.12; numpy
  leaves) goes through one jitted program: leaf by leaf, eagerly, would compile one per
  leaf shape, about 30 ms each."""
  if all(isinstance(a, jax.Array) and a.is_fully_addressable
         for a in jax.tree_util.tree_leaves(tree)):
    return jax.tree_util.tree_map(_put_copy, tree)
  return _jitted_copy(tree)


def _put_copy(a: jax.Array) -> jax.Array:
  # A committed array's sharding is given: without it device_put moves a sharded key
  # array to one device. An uncommitted one stays uncommitted, which jit's cache tells
  # apart (the evaluation prepared ahead of a run would compile again).
  return jax.device_put(a, a.sharding if a.committed else None, may_alias=False)


@jax.jit
def _jitted_copy(tree: Any) -> Any:
  return jax.tree_util.tree_map(jnp.copy, tree)

