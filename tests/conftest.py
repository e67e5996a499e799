"""Shared small fixtures: tiny shapes so that every compile is quick on a 2-core CPU."""

import jax
import numpy as np
import pytest

from fedjax_sim import data as data_lib
from fedjax_sim import models


def ragged_clients(seed=0, sizes=(3, 17, 8, 30, 1, 12), num_features=5, num_classes=3):
  """Per-client (xs, ys) with ragged sizes, including a one-example client."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, num_features)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, num_classes, n).astype(np.int32) for n in sizes]
  return xs, ys


@pytest.fixture(scope="session")
def ragged():
  xs, ys = ragged_clients()
  return xs, ys, data_lib.from_clients(xs, ys, num_classes=3)


@pytest.fixture(scope="session")
def small_mlp():
  # A real nnx MLP with a small hidden layer: nonlinear, so ordering bugs show.
  return models.mlp(num_features=5, num_classes=3, seed=1)


def max_relative_error(a, b):
  errs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12))
          for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(errs)


_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kw: _compiles.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)


@pytest.fixture
def count_compiles():
  """Returns a function giving the number of XLA compilations since the test began."""
  start = len(_compiles)
  return lambda: len(_compiles) - start
