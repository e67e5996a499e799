"""Pytree helpers over a leading client axis, below every layer that uses them (the
algorithms, the aggregators, compression), so none of those imports another for them."""

from __future__ import annotations

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
  """sum_c weights[c] * stacked[c] over the leading client axis of every leaf."""
  return jax.tree_util.tree_map(lambda d: jnp.tensordot(weights, d, axes=1), stacked)
