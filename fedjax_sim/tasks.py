"""Named tasks for the CLI: federated train data, held-out data and a default model.

A task builder takes `seed` and returns a `Task`; `register_task` adds one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedjax_sim import data as data_lib
from fedjax_sim import models
from fedjax_sim.synthetic import synthetic


class Task(NamedTuple):
  train: data_lib.FederatedData
  test: tuple[np.ndarray, np.ndarray] | None  # central test set
  client_test: data_lib.FederatedData | None  # per-client test splits
  num_classes: int
  make_model: Callable[[str, int], models.Model]  # (model name, seed) -> Model
  default_model: str


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
  def register(builder):
    _TASKS[name] = builder
    return builder
  return register


def task_names() -> list[str]:
  return sorted(_TASKS)


def load_task(name: str, seed: int = 0, **options) -> Task:
  """Builds the task `name` (see `task_names()`)."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {task_names()}")
  return _TASKS[name](seed=seed, **options)


def from_client_splits(xs, ys, *, num_classes: int, test_fraction: float, seed: int,
                       make_model, default_model: str) -> Task:
  """A Task from per-client arrays: each client's split, the union of test splits as central test."""
  train_x, train_y, test_x, test_y = data_lib.split_clients(xs, ys, test_fraction, seed)
  return Task(
      train=data_lib.from_clients(train_x, train_y, num_classes=num_classes),
      test=(np.concatenate(test_x), np.concatenate(test_y)),
      client_test=data_lib.from_clients(test_x, test_y, num_classes=num_classes, allow_empty=True),
      num_classes=num_classes, make_model=make_model, default_model=default_model)


def _vector_model(num_features: int, num_classes: int):
  def make(name: str, seed: int) -> models.Model:
    if name == "logreg":
      return models.logistic_regression(num_features, num_classes, seed)
    if name == "mlp":
      return models.mlp(num_features, num_classes, seed)
    raise ValueError(f"model {name!r} does not fit vector inputs; use 'logreg' or 'mlp'")
  return make


@register_task("synthetic")
def synthetic_task(seed: int = 0, alpha: float = 1.0, beta: float = 1.0, iid: bool = False,
                   data_seed: int = 0) -> Task:
  """Synthetic(alpha, beta) of Li et al. 2020: 30 clients, 60 features, 10 classes,
  80/20 train/test split per client. The data is fixed by `data_seed`, not `seed`."""
  xs, ys = synthetic(alpha, beta, iid=iid, seed=data_seed)
  return from_client_splits(xs, ys, num_classes=10, test_fraction=0.2, seed=data_seed,
                            make_model=_vector_model(60, 10), default_model="logreg")
