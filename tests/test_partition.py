"""Partitioners: each one's defining property, exact coverage, determinism, bad input;
summaries, plots and the per-client cap of `from_clients`. Host-side numpy only."""

import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import partition, systems

# 10 labels of unequal sizes (150..240 examples), in a scrambled order.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), np.arange(150, 250, 10)))


def _split(name, seed=0, **kwargs):
  if name == "natural":
    return partition.natural(np.random.default_rng(seed).integers(0, 25, len(LABELS)))
  return partition.partition(name, LABELS, 25, seed=seed, **kwargs)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity", "natural"])
def test_every_example_lands_in_exactly_one_client(name):
  parts = _split(name)
  assert len(parts) == 25 and all(len(p) > 0 for p in parts)
  everything = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_same_seed_same_split_other_seed_other_split(name):
  a, b, c = _split(name, seed=3), _split(name, seed=3), _split(name, seed=4)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one_and_labels_are_mixed():
  summary = partition.summarize(partition.iid(LABELS, 25), LABELS)
  assert summary.sizes.max() - summary.sizes.min() <= 1
  assert summary.labels_per_client.mean() > 9


def test_dirichlet_small_alpha_gives_few_labels_per_client_large_alpha_nearly_all():
  few = partition.summarize(partition.dirichlet(LABELS, 25, 0.05), LABELS)
  many = partition.summarize(partition.dirichlet(LABELS, 25, 1000.0), LABELS)
  assert few.labels_per_client.mean() < 2.5
  assert np.median(few.labels_per_client) <= 2
  # The last clients take the leftovers, so judge the typical client.
  assert np.median(many.labels_per_client) == 10 and many.labels_per_client.mean() > 9.5
  # Sizes are near-equal by default: the skew is in labels, not quantity.
  assert few.sizes.max() - few.sizes.min() <= 1


def test_quantity_with_a_huge_sigma_still_hands_out_every_example_once():
  # exp of normal draws with sigma 400 overflowed to inf: NaN shares duplicated examples
  # and left clients empty.
  parts = partition.quantity(1000, 50, 400.0, seed=0)
  everything = np.concatenate(parts)
  assert len(everything) == 1000 and len(np.unique(everything)) == 1000
  assert min(len(p) for p in parts) >= 1
  # Past float64's range the log sizes themselves overflow (inf - inf is NaN): refused.
  with pytest.raises(ValueError, match="sigma=1e\\+308 is too large"):
    partition.quantity(100, 10, 1e308, seed=2)


def test_dirichlet_takes_given_sizes_to_combine_with_quantity_skew():
  sizes = [len(p) for p in partition.quantity(LABELS, 25, 1.5, seed=1)]
  parts = partition.dirichlet(LABELS, 25, 0.1, sizes=sizes)
  assert [len(p) for p in parts] == sizes
  with pytest.raises(ValueError, match="sizes must be 25 positive integers summing to"):
    partition.dirichlet(LABELS, 25, 0.1, sizes=[1] * 25)


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_give_exactly_the_requested_labels_per_client(shards_per_client):
  parts = partition.shards(LABELS, 25, shards_per_client)
  summary = partition.summarize(parts, LABELS)
  assert (summary.labels_per_client == shards_per_client).all()
  # Shards are near-equal: clients differ in size only as much as labels do.
  assert summary.sizes.max() <= 1.6 * summary.sizes.min()


def test_quantity_skew_sizes_are_lognormal_and_labels_iid():
  parts = partition.quantity(LABELS, 25, sigma=1.5, min_size=5)
  sizes = np.array([len(p) for p in parts])
  assert sizes.min() >= 5 and sizes.max() > 5 * np.median(sizes) / 2
  assert sizes.max() / sizes.min() > 10
  big = max(parts, key=len)
  # A big client's labels follow the overall distribution (IID labels).
  hist = np.bincount(LABELS[big], minlength=10) / len(big)
  np.testing.assert_allclose(hist, np.bincount(LABELS) / len(LABELS), atol=0.06)


def test_natural_keeps_every_users_examples_together():
  users = np.array(["bo", "al", "bo", "cy", "al", "al", "cy", "bo", "dee"])
  parts = partition.natural(users)
  assert [users[p].tolist() for p in parts] == [
      ["al"] * 3, ["bo"] * 3, ["cy"] * 2, ["dee"]]
  assert [p.tolist() for p in parts][0] == [1, 4, 5]  # original order within a user


def test_take_builds_per_client_arrays_for_from_clients():
  x = np.arange(len(LABELS), dtype=np.float32)[:, None]
  parts = partition.shards(LABELS, 25, 2)
  xs, ys = partition.take(x, LABELS, parts)
  assert all(np.array_equal(xi[:, 0].astype(int), p) for xi, p in zip(xs, parts))
  data = fs.from_clients(xs, ys, num_classes=10)
  assert data.num_clients == 25 and int(data.counts.sum()) == len(LABELS)


@pytest.mark.parametrize("call,match", [
    (lambda: partition.dirichlet(LABELS, 10, 0.0), "alpha must be a positive number, got 0.0"),
    (lambda: partition.dirichlet(LABELS, 10, -1.0), "alpha must be a positive number"),
    (lambda: partition.dirichlet(LABELS, 10, float("nan")), "alpha must be a positive number"),
    (lambda: partition.iid(LABELS, len(LABELS) + 1), "cannot split 1950 examples into 1951"),
    (lambda: partition.dirichlet(LABELS[:5], 6, 1.0), "cannot split 5 examples into 6 clients"),
    (lambda: partition.iid(LABELS, 0), "num_clients must be a positive integer"),
    (lambda: partition.shards(LABELS, 4, 2), "8 shards cannot cover 10 labels"),
    (lambda: partition.shards(LABELS, 1000, 2), "cannot split 1950 examples into 1000 clients"),
    (lambda: partition.quantity(LABELS, 10, -1.0), "sigma must be a non-negative number"),
    # 0 would leave clients empty, a negative size would give examples to two clients
    (lambda: partition.quantity(LABELS, 10, min_size=0), "min_size must be a positive integer"),
    (lambda: partition.quantity(LABELS, 10, min_size=-3), "min_size must be a positive"),
    (lambda: partition.partition("pathological", LABELS, 10), "unknown partition 'pathological'"),
    (lambda: partition.dirichlet(LABELS.astype(float), 10, 1.0), "labels must be a 1-D integer"),
    (lambda: partition.natural([]), "user_ids must be a non-empty 1-D array"),
])
def test_bad_input_is_a_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_summary_describes_sizes_labels_and_padding():
  parts = partition.quantity(LABELS, 25, sigma=1.0, seed=2)
  summary = partition.summarize(parts, LABELS)
  assert summary.label_counts.shape == (25, 10)
  np.testing.assert_array_equal(summary.label_counts.sum(axis=1), summary.sizes)
  expected = summary.sizes.sum() / (25 * summary.sizes.max())
  assert summary.padding_efficiency() == pytest.approx(expected)
  cap = int(np.median(summary.sizes))
  assert summary.padding_efficiency(cap) > summary.padding_efficiency()
  assert summary.kept_fraction(cap) < 1.0
  # A cap above the largest client pads to the largest client, as from_clients does.
  assert summary.padding_efficiency(10 * summary.sizes.max()) == summary.padding_efficiency()
  # A histogram narrower than the labels is refused, not widened (or crashed in stack).
  with pytest.raises(ValueError, match="num_classes=5 but the labels go up to 9"):
    partition.summarize(parts, LABELS, num_classes=5)
  assert partition.summarize(parts, LABELS, num_classes=10).label_counts.shape == (25, 10)
  text = str(summary)
  assert text.startswith("25 clients, 1950 examples") and "padding efficiency" in text


def test_plot_draws_heatmap_and_size_histogram():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  summary = partition.summarize(partition.dirichlet(LABELS, 25, 0.1), LABELS)
  fig = partition.plot(summary, "Dirichlet 0.1")
  assert len(fig.axes) == 3  # heatmap, its colorbar, histogram
  assert fig.axes[0].images[0].get_array().shape == (10, 25)
  import matplotlib.pyplot as plt
  plt.close(fig)


def test_from_clients_caps_examples_per_client_deterministically():
  xs = [np.arange(n, dtype=np.float32)[:, None] for n in (3, 40, 7)]
  ys = [np.zeros(n, np.int32) for n in (3, 40, 7)]
  full = fs.from_clients(xs, ys)
  capped = fs.from_clients(xs, ys, max_examples=8)
  np.testing.assert_array_equal(capped.counts, [3, 8, 7])
  assert capped.max_examples == 8
  np.testing.assert_array_equal(capped.client(1)[0][:, 0], np.arange(8))  # the first 8 kept
  assert capped.padding_efficiency > full.padding_efficiency
  assert capped.padding_efficiency == pytest.approx(18 / 24)
  with pytest.raises(ValueError, match="max_examples must be a positive integer, got 0"):
    fs.from_clients(xs, ys, max_examples=0)


@pytest.mark.parametrize("make", [
    lambda seed: partition.iid(20, 4, seed=seed),
    lambda seed: partition.dirichlet(np.arange(20) % 2, 4, 0.5, seed=seed),
    lambda seed: fs.synthetic(num_clients=3, seed=seed),
    lambda seed: fs.split_clients([np.ones((4, 2))], [np.zeros(4)], 0.5, seed=seed),
    lambda seed: systems.make_profiles(3, examples_per_s=("lognormal", 1.0, 0.5),
                                       downlink_bytes_per_s=1e6, uplink_bytes_per_s=1e6,
                                       seed=seed),
])
@pytest.mark.parametrize("seed", [-1, 0.5, True])
def test_a_seed_is_an_integer_at_least_0(make, seed):
  # numpy's "expected non-negative integer" named no argument; 0.5 and True ran as others.
  with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed}"):
    make(seed)
