"""Federated data: every client's examples padded to one length, on the device.

A `FederatedData` holds `x [num_clients, max_examples, ...]`, `y [num_clients,
max_examples, ...]` and `counts [num_clients]`. Slots past a client's count are
padding; local training and evaluation mask them out, so padding never changes a
result (tests/test_engine.py checks that).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.losses import IGNORE_LABEL
from fedjax_sim.partition import seeded_rng


class FederatedData(NamedTuple):
  """Padded per-client arrays plus per-client example counts (a pytree).

  `count_range`, when not None, is `(min(counts), max(counts))` as Python ints, known on
  the host when the data was built (`from_clients` sets it). It is static pytree data,
  not a leaf, so a jitted round sees it at trace time: when every client has the same
  count that divides into minibatches, local training compiles without padding masks
  (`local.make_local_update`). Data built by hand may leave it None (the general path).
  """

  x: jax.Array
  y: jax.Array
  counts: jax.Array
  count_range: tuple[int, int] | None = None

  @property
  def num_clients(self) -> int:
    return self.x.shape[0]

  @property
  def max_examples(self) -> int:
    return self.x.shape[1]

  @property
  def padding_efficiency(self) -> float:
    """Real examples divided by padded slots (1.0 means no padding)."""
    return float(np.sum(np.asarray(self.counts))) / (self.num_clients * self.max_examples)

  @property
  def equal_count(self) -> int | None:
    """The count every client has, when `count_range` says they all have the same."""
    if self.count_range is None or self.count_range[0] != self.count_range[1]:
      return None
    return self.count_range[0]

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `i`'s real examples as host arrays, padding removed."""
    n = int(self.counts[i])
    return np.asarray(self.x[i, :n]), np.asarray(self.y[i, :n])


# count_range is static (aux) data: leaves are x, y, counts, as for the plain NamedTuple.
jax.tree_util.register_pytree_with_keys(
    FederatedData,
    lambda d: (((jax.tree_util.GetAttrKey("x"), d.x), (jax.tree_util.GetAttrKey("y"), d.y),
                (jax.tree_util.GetAttrKey("counts"), d.counts)), d.count_range),
    lambda count_range, leaves: FederatedData(*leaves, count_range),
    flatten_func=lambda d: ((d.x, d.y, d.counts), d.count_range))


def count_range_of(counts) -> tuple[int, int]:
  """`(min, max)` of concrete per-client counts, as Python ints."""
  counts = np.asarray(counts)
  return (int(counts.min()), int(counts.max())) if counts.size else (0, 0)


def check_count_range(data: FederatedData) -> None:
  """Raises ValueError where `data.count_range` disagrees with its concrete counts (a
  FederatedData rebuilt with `_replace(counts=...)` keeps the old range)."""
  if data.count_range is None:
    return
  actual = count_range_of(data.counts)
  if tuple(data.count_range) != actual:
    raise ValueError(f"the data's count_range {tuple(data.count_range)} is not its counts' "
                     f"(min, max) {actual}: rebuild it with from_clients, or pass "
                     f"count_range=None")


# Padded arrays at least this large get their memory from an `mmap` of small pages, not
# from numpy (see `_aligned_zeros`).
_SMALL_PAGES_BYTES = 1 << 24


def _aligned_zeros(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
  """`np.zeros(shape, dtype)` starting on an `align`-byte boundary.

  XLA:CPU takes a host array of at least its 64-byte alignment as the device buffer
  itself; numpy's allocations are 16-byte aligned, so `jax.device_put` copied the whole
  padded dataset into fresh memory. For 1,000 MNIST-shaped clients of 100 examples
  `from_clients` took 0.58 s that way and 0.36 s aligned, both on one thread (medians of
  12 fresh processes; this VM's first touch of fresh memory makes single runs vary up
  to 1.4 s), the process's peak memory 1.13 against 0.76 GB (benchmarks/dataset_setup.py).

  A large array is an anonymous `mmap` (zeroed, page-aligned) advised against
  transparent huge pages. numpy asks for them for large arrays, and where the kernel
  must first compact memory to find them (`defrag` at `madvise`, a common setting) the
  first touch stalls: `from_clients` of the clients above took 0.46-0.78 s in 7 of 12
  fresh processes and 0.13-0.26 s in the rest, with small pages 0.18-0.33 s, median 0.20
  against 0.49 s (benchmarks/results/dataset_setup_cpu_small_pages.md)."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  if size >= _SMALL_PAGES_BYTES and hasattr(mmap, "MADV_NOHUGEPAGE"):
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
      pages.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: small pages anyway
      pass
    return np.frombuffer(pages, np.uint8).view(dtype).reshape(shape)
  raw = np.zeros(size + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + size].view(dtype).reshape(shape)


# Padded arrays at least this large are filled by a thread per core.
_PARALLEL_FILL_BYTES = 1 << 24


def _fill(out: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
  """`out[i, :len(a)] = a` for every client's `a`, blocks of clients on parallel threads.

  numpy lets go of the GIL while it copies, and a large dataset's copy is mostly the
  first touch of `out`'s fresh pages, which a cloud VM can be slow to back: there the
  threads take their page faults side by side. 1,000 MNIST-shaped clients of 100 on a
  2-core VM: 0.36 s on one thread, 0.13 s on two (medians of 12 fresh processes; one
  thread's runs 0.16-0.85 s, two threads' 0.11-0.14 s but one of 0.53 s;
  benchmarks/dataset_setup.py)."""
  def fill(block):
    for i in block:
      out[i, :len(arrays[i])] = arrays[i]

  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  threads = min(cores, len(arrays)) if out.nbytes >= _PARALLEL_FILL_BYTES else 1
  if threads == 1:
    fill(range(len(arrays)))
    return
  with ThreadPoolExecutor(threads) as pool:  # list(): a thread's exception is raised here
    list(pool.map(fill, np.array_split(np.arange(len(arrays)), threads)))


def from_clients(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    *,
    num_classes: int | None = None,
    pad_to: int | None = None,
    x_dtype=np.float32,
    allow_empty: bool = False,
    max_examples: int | None = None,
) -> FederatedData:
  """Builds `FederatedData` from one (x, y) pair of host arrays per client.

  Args:
    xs: per-client inputs, each `[n_i, ...]` with the same trailing shape.
    ys: per-client integer labels, each `[n_i, ...]`.
    num_classes: if given, every label must lie in `[0, num_classes)`.
    pad_to: pad every client to this many slots (default: the largest client).
    x_dtype: dtype of the stored inputs.
    allow_empty: accept clients with no examples (for per-client test splits).
    max_examples: keep at most this many examples per client, to bound padding:
      every client is padded to the largest, so one huge client makes every client
      cost as much as it does. Capping DROPS the examples past the cap: each client
      keeps its first `max_examples`, deterministically (`iid`, `dirichlet`, `shards`
      and `quantity` give each client its examples in a random order, so that is a
      random subset; `natural` and the LEAF tasks keep the files' order). `counts` then holds
      the capped sizes; see `padding_efficiency` and `partition.summarize`.

  Returns:
    FederatedData on the default device.

  Raises:
    ValueError: naming the client and what is wrong with it (features of other shapes,
      NaN or inf in the features, labels that are not integers or out of range).
  """
  if len(xs) != len(ys):
    raise ValueError(f"got inputs for {len(xs)} clients but labels for {len(ys)}")
  if len(xs) == 0:  # len: an array of stacked clients has no truth value
    raise ValueError("federated data needs at least one client")
  if max_examples is not None and (not isinstance(max_examples, (int, np.integer))
                                   or isinstance(max_examples, bool) or max_examples <= 0):
    raise ValueError(f"max_examples must be a positive integer, got {max_examples!r}")
  xs = [np.asarray(x) for x in xs]
  ys = [np.asarray(y) for y in ys]
  if max_examples is not None:
    xs = [x[:max_examples] if x.ndim else x for x in xs]
    ys = [y[:max_examples] if y.ndim else y for y in ys]
  feature_shape, label_shape = xs[0].shape[1:], ys[0].shape[1:]
  for i, (x, y) in enumerate(zip(xs, ys)):
    if x.ndim == 0 or y.ndim == 0:
      raise ValueError(f"client {i}: x and y must have a leading example axis")
    if len(x) != len(y):
      raise ValueError(f"client {i}: x has {len(x)} examples but y has {len(y)}")
    if len(x) == 0 and not allow_empty:
      raise ValueError(f"client {i} has no examples; drop it or give it data")
    if x.shape[1:] != feature_shape:
      raise ValueError(f"client {i}: inputs of shape {x.shape[1:]}, client 0 has {feature_shape}")
    if y.shape[1:] != label_shape:
      raise ValueError(f"client {i}: labels of shape {y.shape[1:]}, client 0 has {label_shape}")
    # jnp's issubdtype: numpy's does not count bfloat16 (ml_dtypes) as inexact.
    if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all():
      bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
      j = int(np.flatnonzero(bad)[0])
      kind = "NaN" if np.isnan(x[j]).any() else "inf"
      raise ValueError(f"client {i}'s features contain {kind} (example {j}; {int(bad.sum())} "
                       f"example(s) of this client): clean or drop those examples")
    _check_fits(x, x_dtype, f"client {i}'s features")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"client {i}: labels must be integers, got {y.dtype}")
    _check_fits(y, np.int32, f"client {i}'s labels")
    # Per-token labels (extra axes) may hold IGNORE_LABEL at padded positions.
    lowest = IGNORE_LABEL if y.ndim > 1 else 0
    if num_classes is not None and len(y) and (y.min() < lowest or y.max() >= num_classes):
      raise ValueError(
          f"client {i}: labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")
  counts = np.array([len(x) for x in xs], dtype=np.int32)
  max_n = max(int(counts.max()), 1)
  if pad_to is not None:
    if pad_to < max_n:
      raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max_n} examples)")
    max_n = pad_to
  x = _aligned_zeros((len(xs), max_n, *feature_shape), x_dtype)
  y = _aligned_zeros((len(ys), max_n, *label_shape), np.int32)
  _fill(x, xs)
  _fill(y, ys)
  # device_put, not jnp.asarray: that compiles a staging program per array (~50 ms each).
  # On CPU it aliases these aligned arrays, which nothing else holds, instead of copying.
  x, y, device_counts = jax.device_put((x, y, counts))
  return FederatedData(x, y, device_counts, count_range_of(counts))


def _check_fits(values: np.ndarray, dtype, what: str) -> None:
  """Raises ValueError if `values` hold a number that `dtype`, what they are stored as,
  cannot (int64 labels past int32 wrapped around; float64 features past float32's
  range became inf)."""
  dtype = np.dtype(dtype)
  if not values.size or values.dtype == dtype or not jnp.issubdtype(dtype, jnp.number):
    return
  # jnp's iinfo/finfo: numpy's do not know bfloat16.
  info = jnp.iinfo(dtype) if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype)
  low, high = values.min(), values.max()
  if low < info.min or high > info.max:
    show = str if jnp.issubdtype(dtype, jnp.integer) else (lambda v: f"{float(v):.4g}")
    raise ValueError(f"{what} go from {show(low)} to {show(high)}, beyond what they are "
                     f"stored as ({dtype.name}: {show(info.min)} to {show(info.max)})")


def split_clients(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], test_fraction: float, seed: int = 0
) -> tuple[list, list, list, list]:
  """Splits each client's examples into train and test, keeping >= 1 train example.

  Returns:
    (train_xs, train_ys, test_xs, test_ys); a client too small for a test
    example gets an empty test split.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
  if len(xs) != len(ys):
    raise ValueError(f"got inputs for {len(xs)} clients but labels for {len(ys)}")
  rng = seeded_rng(seed)
  out = ([], [], [], [])
  for i, (x, y) in enumerate(zip(xs, ys)):
    if len(x) != len(y):
      raise ValueError(f"client {i}: x has {len(x)} examples but y has {len(y)}")
    order = rng.permutation(len(x))
    n_test = min(int(round(test_fraction * len(x))), len(x) - 1)
    test, train = order[:n_test], order[n_test:]
    for lst, arr in zip(out, (x[train], y[train], x[test], y[test])):
      lst.append(arr)
  return out
