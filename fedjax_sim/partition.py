"""Partitioners: split one centralized data set into federated clients, on the host.

Each partitioner returns one index array per client (indices into the data set), is
deterministic given its seed, and puts every example in exactly one client. `take`
turns the index arrays into the per-client `(xs, ys)` lists that `from_clients` takes.

- `iid`: a random permutation cut into near-equal clients.
- `dirichlet`: label skew of Hsu et al. 2019, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification": client k draws its label
  proportions q_k ~ Dir(alpha * p), p the label frequencies, and then its examples
  by q_k. Small alpha gives clients of one or two labels; large alpha gives IID.
- `shards`: the pathological split of McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data": sort by label, cut into
  `num_clients * shards_per_client` shards, give each client `shards_per_client`.
- `quantity`: quantity skew, IID labels but lognormal client sizes (as in the
  FedProx benchmarks of Li et al. 2020).
- `natural`: one client per value of a user or writer id column (LEAF's splits).

`summarize` and `plot` describe any partition: sizes, labels per client, padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "shards", "quantity")


def seeded_rng(seed) -> np.random.Generator:
  """numpy's generator of `seed`, which must be an integer >= 0 (numpy's own error for
  a negative one named no argument; a bool or a float ran as another seed)."""
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
  return np.random.default_rng(seed)


def _num_examples(labels) -> int:
  return int(labels) if np.ndim(labels) == 0 else len(labels)


def _check(num_examples: int, num_clients: int, min_per_client: int = 1) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if num_clients * min_per_client > num_examples:
    raise ValueError(
        f"cannot split {num_examples} examples into {num_clients} clients of at least "
        f"{min_per_client} example(s) each; use fewer clients")


def _labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} "
                     f"and dtype {labels.dtype}")
  if len(labels) and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, found {labels.min()}")
  return labels


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
  """Integers summing to `total`, proportional to `weights` (largest remainder)."""
  share = total * weights / weights.sum()
  counts = np.floor(share).astype(np.int64)
  remainder = share - counts
  # A stable sort so that ties are broken by position, deterministically.
  counts[np.argsort(-remainder, kind="stable")[: total - counts.sum()]] += 1
  return counts


def _equal_sizes(num_examples: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
  sizes = np.full(num_clients, num_examples // num_clients)
  sizes[rng.permutation(num_clients)[: num_examples % num_clients]] += 1
  return sizes


def iid(labels, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
  """An IID split: a random permutation cut into clients whose sizes differ by at most 1.

  Args:
    labels: the labels (only their number is used) or the number of examples.
    num_clients: number of clients.
    seed: numpy seed.

  Returns:
    One int64 index array per client.
  """
  n = _num_examples(labels)
  _check(n, num_clients)
  rng = seeded_rng(seed)
  sizes = _equal_sizes(n, num_clients, rng)
  return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def dirichlet(labels, num_clients: int, alpha: float, *, seed: int = 0,
              sizes: Sequence[int] | None = None) -> list[np.ndarray]:
  """Label skew of Hsu et al. 2019: client k's labels follow q_k ~ Dir(alpha * p).

  Clients are filled one after another, each drawing examples without replacement by
  its q_k; when a label runs out, the client's remaining draws are renormalized over
  the labels still available, so every example lands in exactly one client and the
  last clients may hold a mix of leftovers.

  Args:
    labels: integer labels [N].
    num_clients: number of clients.
    alpha: concentration (> 0); 0.1 gives about one label per client, 100 near IID.
    seed: numpy seed.
    sizes: examples per client (summing to N); default near-equal sizes. Pass the
      sizes of a `quantity` split to combine label and quantity skew.

  Returns:
    One int64 index array per client, in a random order.
  """
  labels = _labels(labels)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"dirichlet: alpha must be a positive number, got {alpha!r}")
  n = len(labels)
  _check(n, num_clients)
  rng = seeded_rng(seed)
  if sizes is None:
    sizes = _equal_sizes(n, num_clients, rng)
  sizes = np.asarray(sizes, dtype=np.int64)
  if sizes.shape != (num_clients,) or sizes.min() < 1 or sizes.sum() != n:
    raise ValueError(f"dirichlet: sizes must be {num_clients} positive integers summing to "
                     f"{n}, got {sizes.tolist()}")
  classes, counts = np.unique(labels, return_counts=True)
  prior = counts / n
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  used = np.zeros(len(classes), dtype=np.int64)
  parts = []
  for size in sizes:
    q = rng.dirichlet(alpha * prior)
    chosen = []
    need = int(size)
    while need:
      available = counts - used
      weights = q * (available > 0)
      if weights.sum() <= 0:  # every label this client favours has run out
        weights = available.astype(np.float64)
      draw = np.minimum(rng.multinomial(need, weights / weights.sum()), available)
      for c in np.flatnonzero(draw):
        chosen.append(pools[c][used[c]: used[c] + draw[c]])
        used[c] += draw[c]
      need -= int(draw.sum())
    parts.append(rng.permutation(np.concatenate(chosen)))
  return parts


def shards(labels, num_clients: int, shards_per_client: int = 2, *,
           seed: int = 0) -> list[np.ndarray]:
  """The pathological label split of McMahan et al. 2017, with label-pure shards.

  Examples are sorted by label and each label's examples are cut into near-equal
  shards, `num_clients * shards_per_client` in all, apportioned to labels by their
  frequency (at least one each). Unlike the paper, no shard straddles two labels,
  and shards are dealt so that no client gets two shards of one label: every client
  then holds exactly `shards_per_client` distinct labels, as long as no label has
  more than `num_clients` shards (no label is more than 1/shards_per_client of the
  data); otherwise a client may get two shards of a large label.

  Args:
    labels: integer labels [N].
    num_clients: number of clients.
    shards_per_client: shards (so labels) per client; the paper uses 2.
    seed: numpy seed.

  Returns:
    One int64 index array per client, in a random order.
  """
  labels = _labels(labels)
  n = len(labels)
  if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client <= 0:
    raise ValueError(f"shards_per_client must be a positive integer, got {shards_per_client!r}")
  _check(n, num_clients, shards_per_client)
  classes, counts = np.unique(labels, return_counts=True)
  total = num_clients * shards_per_client
  if total < len(classes):
    raise ValueError(
        f"shards: {num_clients} clients x {shards_per_client} shards = {total} shards cannot "
        f"cover {len(classes)} labels without mixing labels in a shard; use more clients or "
        f"shards per client")
  # At least one shard per label, then hand out the rest where shards are largest.
  per_label = np.ones(len(classes), dtype=np.int64)
  for _ in range(total - len(classes)):
    size = np.where(per_label < counts, counts / per_label, -1.0)
    per_label[int(np.argmax(size))] += 1
  rng = seeded_rng(seed)
  order = rng.permutation(len(classes))
  pieces = []  # shards grouped by label, labels in a random order
  for c in order:
    members = rng.permutation(np.flatnonzero(labels == classes[c]))
    pieces.extend(np.array_split(members, per_label[c]))
  # Shard j goes to client j % num_clients: a label's shards are consecutive, so
  # they reach distinct clients whenever the label has at most num_clients shards.
  owner = rng.permutation(num_clients)
  parts = [[] for _ in range(num_clients)]
  for j, piece in enumerate(pieces):
    parts[owner[j % num_clients]].append(piece)
  return [rng.permutation(np.concatenate(p)) for p in parts]


def quantity(labels, num_clients: int, sigma: float = 1.0, *, seed: int = 0,
             min_size: int = 1) -> list[np.ndarray]:
  """Quantity skew: IID labels, client sizes proportional to lognormal(0, sigma) draws.

  Args:
    labels: the labels (only their number is used) or the number of examples.
    num_clients: number of clients.
    sigma: standard deviation of the log sizes (> 0); 0 would be equal sizes.
    seed: numpy seed.
    min_size: examples every client gets before the skewed share (at least 1).

  Returns:
    One int64 index array per client.
  """
  n = _num_examples(labels)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"quantity: sigma must be a non-negative number, got {sigma!r}")
  if (not isinstance(min_size, (int, np.integer)) or isinstance(min_size, bool)
      or min_size < 1):
    raise ValueError(f"quantity: min_size must be a positive integer (every client gets "
                     f"at least one example), got {min_size!r}")
  _check(n, num_clients, min_size)
  rng = seeded_rng(seed)
  # Lognormal weights, scaled by exp(-max) (the shares are ratios): exp(z) itself
  # overflows to inf for sigma in the hundreds and made NaN sizes.
  z = rng.normal(0.0, sigma, num_clients)
  if not np.isfinite(z).all():  # past float64's range: inf - inf made NaN sizes
    raise ValueError(f"quantity: sigma={sigma!r} is too large: the log sizes overflow")
  weights = np.exp(z - z.max())
  sizes = min_size + _apportion(n - num_clients * min_size, weights)
  return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def natural(user_ids) -> list[np.ndarray]:
  """One client per distinct user id, in the order of `np.unique(user_ids)`.

  Args:
    user_ids: a user, writer or speaker id per example [N] (any sortable dtype).

  Returns:
    One int64 index array per user, its examples in their original order.
  """
  user_ids = np.asarray(user_ids)
  if user_ids.ndim != 1 or len(user_ids) == 0:
    raise ValueError(f"natural: user_ids must be a non-empty 1-D array, got shape "
                     f"{user_ids.shape}")
  _, inverse = np.unique(user_ids, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def partition(name: str, labels, num_clients: int, *, seed: int = 0, alpha: float = 0.5,
              shards_per_client: int = 2, sigma: float = 1.0) -> list[np.ndarray]:
  """Dispatches to a partitioner by name (one of `PARTITIONERS`), for the CLI and tasks.

  Arguments a partitioner does not use are ignored: `alpha` is Dirichlet's,
  `shards_per_client` the shards', `sigma` quantity skew's.
  """
  if name == "iid":
    return iid(labels, num_clients, seed=seed)
  if name == "dirichlet":
    return dirichlet(labels, num_clients, alpha, seed=seed)
  if name == "shards":
    return shards(labels, num_clients, shards_per_client, seed=seed)
  if name == "quantity":
    return quantity(labels, num_clients, sigma, seed=seed)
  raise ValueError(f"unknown partition {name!r}; choose from {list(PARTITIONERS)}")


def take(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray]
         ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per-client `(xs, ys)` lists from index arrays, ready for `from_clients`."""
  return [x[p] for p in parts], [y[p] for p in parts]


class PartitionSummary(NamedTuple):
  """What a partition looks like: `sizes [clients]`, `label_counts [clients, labels]`."""

  sizes: np.ndarray
  label_counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.sizes)

  @property
  def labels_per_client(self) -> np.ndarray:
    """Distinct labels each client holds."""
    return (self.label_counts > 0).sum(axis=1)

  def padding_efficiency(self, max_examples: int | None = None) -> float:
    """Real examples / padded slots once clients are padded to the largest (or capped)."""
    # from_clients pads to the largest client when the cap is above it
    largest = int(self.sizes.max())
    cap = largest if max_examples is None else min(int(max_examples), largest)
    return float(np.minimum(self.sizes, cap).sum()) / (self.num_clients * cap)

  def kept_fraction(self, max_examples: int) -> float:
    """Fraction of examples kept by `from_clients(..., max_examples=max_examples)`."""
    return float(np.minimum(self.sizes, max_examples).sum()) / float(self.sizes.sum())

  def __str__(self) -> str:
    s, k = self.sizes, self.labels_per_client
    return (f"{self.num_clients} clients, {int(s.sum())} examples; examples per client "
            f"min {s.min()}, median {int(np.median(s))}, max {s.max()}; labels per client "
            f"min {k.min()}, mean {k.mean():.1f}, max {k.max()} of {self.label_counts.shape[1]}; "
            f"padding efficiency {self.padding_efficiency():.2f}")


def summarize(parts: Sequence[np.ndarray], labels, num_classes: int | None = None
              ) -> PartitionSummary:
  """Sizes and per-client label histograms of a partition.

  Args:
    parts: per-client index arrays (from a partitioner).
    labels: the integer labels [N] the indices refer to.
    num_classes: histogram width (default: max label + 1).

  Returns:
    A PartitionSummary; `str()` of it is a one-line description.
  """
  labels = _labels(labels)
  if num_classes is not None and len(labels) and num_classes <= labels.max():
    raise ValueError(f"summarize: num_classes={num_classes} but the labels go up to "
                     f"{labels.max()}")
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
  return PartitionSummary(np.array([len(p) for p in parts]), counts)


def plot(summary: PartitionSummary, title: str | None = None, *, max_clients: int = 100):
  """Plots a partition: a clients x labels heatmap and a histogram of client sizes.

  Args:
    summary: from `summarize`.
    title: figure title.
    max_clients: show at most this many clients (the first ones) in the heatmap.

  Returns:
    The matplotlib Figure (matplotlib is the optional extra `plot`).
  """
  try:
    import matplotlib.pyplot as plt  # lazily: plotting is optional
  except ImportError as e:
    raise ImportError("plotting needs matplotlib: pip install 'fedjax_sim[plot]'") from e
  fig, (heat, hist) = plt.subplots(1, 2, figsize=(10, 3.6),
                                   gridspec_kw={"width_ratios": [2.2, 1]})
  counts = summary.label_counts[:max_clients]
  image = heat.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis")
  heat.set_xlabel("client")
  heat.set_ylabel("label")
  heat.set_title("examples per client and label")
  fig.colorbar(image, ax=heat)
  hist.hist(summary.sizes, bins=min(30, max(5, summary.num_clients // 2)), color="tab:blue")
  hist.set_xlabel("examples per client")
  hist.set_ylabel("clients")
  hist.set_title(f"sizes (padding efficiency {summary.padding_efficiency():.2f})")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
