"""Secure aggregation: the masks cancel exactly in the modular sum (with dropouts too),
one masked update is uniform whatever the update, and the result is the loop
reference's plain mean of the survivors' quantized updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_sim import secure_aggregation as sa
import aggregation_reference as ref
from test_privacy import stacked, unstack


@pytest.fixture(scope="module")
def protocol():
  return jax.jit(sa.masked_inputs), jax.jit(sa.unmask_sum)


def test_masks_cancel_exactly_with_and_without_dropouts(protocol):
  mask, unmask = protocol
  rng = np.random.default_rng(0)
  m, d = 6, 50
  levels = jnp.asarray(rng.integers(0, 2 ** 16, (m, d)), jnp.uint32)
  ids = jnp.array([11, 3, 27, 8, 0, 19])
  key = jax.random.key(1)
  masked = mask(levels, ids, key)
  assert np.mean(np.asarray(masked) == np.asarray(levels)) < 0.01  # really masked
  for alive in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]):
    alive = np.array(alive, bool)
    total = np.asarray(unmask(masked, ids, jnp.asarray(alive), key))
    expected = np.asarray(levels, np.uint64)[alive].sum(axis=0)
    np.testing.assert_array_equal(total.astype(np.uint64), expected)
  # Without the dropped clients' pairwise masks removed, the sum would be garbage.
  naive = np.asarray(masked, np.uint64)[alive].sum(axis=0) % 2 ** 32
  assert np.mean(naive == expected) < 0.01


def test_one_masked_update_is_independent_of_the_update(protocol):
  # Over random rounds (keys), what the server receives from client 0 is uniform on
  # Z_2^32 whether its update is all zeros or all at the top level: the self mask is a
  # one-time pad. Two-sample KS between the two, and a chi-square of uniformity.
  mask, _ = protocol
  ids = jnp.array([11, 3, 27, 8, 0, 19])
  rng = np.random.default_rng(4)
  inputs = {"zeros": np.zeros((6, 50)), "top": np.full((6, 50), 2 ** 16 - 1),
            "random": rng.integers(0, 2 ** 16, (40, 6, 50))}
  views = {name: [] for name in inputs}
  for r in range(40):
    key = jax.random.key(100 + r)
    for name, levels in inputs.items():
      levels = levels[r] if name == "random" else levels
      views[name].append(np.asarray(mask(jnp.asarray(levels, jnp.uint32), ids, key)[0]))
  views = {name: np.concatenate(v).astype(np.float64) for name, v in views.items()}
  assert scipy.stats.ks_2samp(views["zeros"], views["top"]).pvalue > 1e-3
  for name in ("zeros", "top"):
    counts = np.bincount((views[name] // 2 ** 28).astype(int), minlength=16)  # top 4 bits
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
  # And it is uncorrelated with a random update, coordinate by coordinate.
  r = np.corrcoef(inputs["random"][:, 0].ravel().astype(np.float64), views["random"])[0, 1]
  assert abs(r) < 4 / np.sqrt(views["random"].size)


def test_secure_mean_is_the_survivors_quantized_mean():
  # Dropouts at random: over a few rounds (keys) everyone survives, some drop, or too
  # many drop and the protocol aborts (threshold 5 of 7); one compiled aggregator.
  agg = sa.secure_mean(bits=12, clip_range=2.0, dropout=0.3, threshold=5)
  aggregate = jax.jit(agg.aggregate)
  loop = ref.SecureMean(12, 2.0, 0.3, 5)
  deltas = stacked(4, scales=np.full(7, 0.5))
  ids = jnp.array([3, 1, 4, 15, 9, 2, 6])
  true = ref.flat(ref.Mean()(unstack(deltas, 7), np.ones(7), None, None))
  seen = set()
  for seed in range(40):
    key = jax.random.key(seed)
    out, _, metrics = aggregate(None, deltas, jnp.ones(7), ids, key)
    expected = loop(unstack(deltas, 7), np.ones(7), np.asarray(ids), key)
    np.testing.assert_allclose(ref.flat(out), ref.flat(expected), rtol=1e-5, atol=1e-6)
    survivors, aborted = int(metrics["secagg_survivors"]), bool(metrics["secagg_aborted"])
    assert aborted == (survivors < 5)
    assert float(metrics["uplink_bytes"]) == survivors * 16 * 4
    if aborted:
      assert not np.any(ref.flat(out))
      seen.add("aborted")
    elif survivors == 7:  # within a quantization step of the true mean
      assert np.max(np.abs(ref.flat(out) - true)) <= 4.0 / (2 ** 12 - 1)
      seen.add("all")
    else:
      seen.add("dropouts")
  assert seen == {"all", "dropouts", "aborted"}


@pytest.mark.parametrize("make,match", [
    (lambda: sa.secure_mean(bits=0), "bits must be an integer"),
    (lambda: sa.secure_mean(clip_range=0.0), "clip_range must be a finite number in \\(0, "),
    (lambda: sa.secure_mean(clip_range=float("inf")), "clip_range must be a finite number"),
    (lambda: sa.secure_mean(clip_range=float("nan")), "clip_range must be a finite number"),
    (lambda: sa.secure_mean(clip_range=1e39), r"clip_range .* \(0, 1.701e\+38\] .* got 1e\+39"),
    (lambda: sa.secure_mean(clip_range=True), "clip_range must be a finite number"),
    (lambda: sa.secure_mean(bits=True), "bits must be an integer"),
    (lambda: sa.secure_mean(threshold=True), "threshold must be an integer or None"),
    (lambda: sa.secure_mean(dropout=1.0), "dropout must lie in"),
    (lambda: sa.secure_mean(bits=25), "bits must be an integer in \\[1, 24\\]"),
    (lambda: sa.secure_mean(bits=24).validate(512, None), "overflow the 32-bit modular sum"),
    (lambda: sa.secure_mean(threshold=11).validate(10, None), "threshold must be an integer"),
])
def test_bad_secure_aggregation_configurations(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_the_largest_clip_range_allowed_decodes_finitely():
  # 2 x clip_range is the largest float32: finite levels and a finite mean.
  deltas = stacked(3, num_clients=4)
  agg = sa.secure_mean(clip_range=sa.MAX_CLIP_RANGE)
  out, _, metrics = agg.aggregate(agg.init(None, None), deltas, jnp.ones(4),
                                  jnp.arange(4), jax.random.key(0))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(out))


def test_the_most_bits_and_clients_allowed_decode_a_saturated_update_exactly():
  # 24 bits and 2^8 clients fill the 32-bit ring: every client at +clip_range sends the
  # top level 2^24 - 1 (float32 rounded it up to 2^24 at 25 bits, and the sum wrapped).
  m, aggregator = 256, sa.secure_mean(bits=24, clip_range=1.0, threshold=256)
  aggregator.validate(m, None)
  deltas = {"w": jnp.full((m, 4), 1.0, jnp.float32)}
  mean, _, metrics = aggregator.aggregate(None, deltas, jnp.ones(m), jnp.arange(m),
                                          jax.random.key(0))
  assert not metrics["secagg_aborted"]
  np.testing.assert_array_equal(mean["w"], np.ones(4, np.float32))


def test_scalars_beside_the_update_are_averaged_exactly_over_the_survivors():
  # FedNova's gradient weight went through the ring with the update: clipped to
  # clip_range, 10 became 1, a server step ten times too small.
  agg = sa.secure_mean(bits=12, clip_range=1.0, dropout=0.3, threshold=2)
  deltas = {"update": stacked(4, scales=np.full(7, 0.5)),
            "gradient_weight": jnp.arange(7.0) + 10.0}
  ids = jnp.array([3, 1, 4, 15, 9, 2, 6])
  loop = ref.SecureMean(12, 1.0, 0.3, 2)
  dropped_some = False
  for seed in range(6):
    key = jax.random.key(seed)
    out, _, metrics = agg.aggregate(None, deltas, jnp.ones(7), ids, key)
    expected = loop(unstack(deltas, 7), np.ones(7), np.asarray(ids), key)
    np.testing.assert_allclose(ref.flat(out), ref.flat(expected), rtol=1e-5, atol=1e-6)
    alive = np.asarray(metrics[sa.SURVIVORS])
    assert alive.sum() == int(metrics["secagg_survivors"])
    np.testing.assert_allclose(float(out["gradient_weight"]), (np.arange(7.0) + 10)[alive].mean(),
                               rtol=1e-6)
    assert float(metrics["uplink_bytes"]) == alive.sum() * (16 + 1) * 4
    dropped_some |= not alive.all()
  assert dropped_some


def test_an_aborted_round_moves_nothing_and_dropped_clients_keep_their_state():
  # The aborted round's zero mean counted as aggregated: server momentum went on moving
  # the model (q-FFL divided by an aggregated h of 0: NaN); dropped clients' SCAFFOLD
  # rows changed though their uploads were not in the mean.
  import optax
  import fedjax_sim as fs
  from fedjax_sim.algorithms import features
  setup = features.default_setup()
  agg = sa.secure_mean(dropout=0.4, threshold=6)  # 8 clients a round: some rounds abort
  common = dict(clients_per_round=8, batch_size=4, epochs=1, aggregator=agg)
  momentum = fs.fedavg(setup.model.apply, client_optimizer=optax.sgd(0.1),
                       server_optimizer=optax.sgd(1.0, momentum=0.9), **common)
  scaffold = fs.scaffold(setup.model.apply, client_learning_rate=0.1, **common)
  seen = set()
  for algorithm in (momentum, scaffold):
    state = algorithm.init(setup.model.params, jax.random.key(0), setup.num_clients)
    step = jax.jit(algorithm.round)
    for _ in range(8):
      new, m = step(state, setup.data)
      moved = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
          jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)))
      aborted = bool(m["secagg_aborted"])
      assert moved != aborted, (algorithm, m["secagg_survivors"])
      if algorithm is scaffold:  # rows of the survivors alone change
        rows = lambda s: np.concatenate([np.asarray(a).reshape(setup.num_clients, -1)
                                         for a in jax.tree_util.tree_leaves(s.client_states)], 1)
        changed = np.any(rows(new) != rows(state), axis=1).sum()
        assert changed == (0 if aborted else int(m["secagg_survivors"]))
      seen.add(aborted)
      state = new
  assert seen == {True, False}
