"""Robust aggregators ignore a minority of arbitrarily large updates, agree with their
loop references, and reject configurations they cannot honour before compiling."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import robust
import aggregation_reference as ref
from test_privacy import stacked, unstack

HONEST, BAD = 6, 3  # 9 clients per round, 3 of them Byzantine

AGGREGATORS = {
    "median": (robust.coordinate_median, ref.Median),
    "trimmed_mean": (lambda: robust.trimmed_mean(num_trim=BAD), lambda: ref.TrimmedMean(BAD)),
    "krum": (lambda: robust.krum(BAD), lambda: ref.Krum(BAD)),
    "multi_krum": (lambda: robust.multi_krum(BAD), lambda: ref.Krum(BAD, HONEST)),
    "geometric_median": (robust.geometric_median, ref.GeometricMedian),
}


def with_attackers(magnitude):
  """6 honest updates near 1, then 3 Byzantine ones of the given magnitude."""
  honest = stacked(0, num_clients=HONEST, scales=np.full(HONEST, 0.1))
  honest = jax.tree_util.tree_map(lambda a: a + 1.0, honest)
  bad = jax.tree_util.tree_map(lambda a: jnp.full((BAD, *a.shape[1:]), magnitude, a.dtype), honest)
  return jax.tree_util.tree_map(lambda h, b: jnp.concatenate([h, b]), honest, bad), honest


@pytest.fixture(scope="module")
def compiled():
  """Each aggregator jitted once for the 9-client shapes."""
  return {name: (make(), jax.jit(make().aggregate)) for name, (make, _) in AGGREGATORS.items()}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_ignores_a_minority_of_arbitrarily_large_updates(compiled, name):
  agg, aggregate = compiled[name]
  outs = []
  # inf and NaN too (a diverged client, or scaling that overflows float32): the order
  # statistics take them as the largest values, the geometric median drops them
  for magnitude in (1e3, 1e12, np.inf, np.nan):
    deltas, honest = with_attackers(magnitude)
    out, _, _ = aggregate(agg.init(None, None), deltas, jnp.ones(9), jnp.arange(9),
                          jax.random.key(0))
    outs.append(ref.flat(out))
    lo, hi = ref.flat(jax.tree_util.tree_map(lambda a: a.min(0), honest)), ref.flat(
        jax.tree_util.tree_map(lambda a: a.max(0), honest))
    if name == "geometric_median":  # a point of the honest updates' neighbourhood
      assert np.linalg.norm(outs[-1] - (lo + hi) / 2) < np.linalg.norm(hi - lo)
    else:  # coordinate-wise within the honest range
      assert np.all(outs[-1] >= lo - 1e-6) and np.all(outs[-1] <= hi + 1e-6)
  if name == "geometric_median":  # it moves by at most the smoothing's effect
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)
    assert all(np.isfinite(out).all() for out in outs)  # inf and NaN rows dropped
  else:  # exactly unaffected by how large the outliers are
    for out in outs[1:]:
      np.testing.assert_array_equal(outs[0], out)
  # The mean is dragged away by the same attackers.
  mean = ref.Mean()(unstack(with_attackers(1e3)[0], 9), np.ones(9), None, None)
  assert np.abs(ref.flat(mean)).max() > 100


@pytest.mark.parametrize("scalar", [False, True], ids=["update", "with_scalar"])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_agrees_with_loop_reference(compiled, name, scalar):
  agg, aggregate = compiled[name]
  deltas = stacked(7, num_clients=9)
  if scalar:  # a scalar sent beside the update, as FedNova's gradient weight
    deltas = {"update": deltas, "gradient_weight": jnp.arange(9.0, 0.0, -1.0) * 3}
  weights = jnp.asarray(np.arange(1.0, 10.0), jnp.float32)
  out, _, metrics = aggregate(agg.init(None, None), deltas, weights, jnp.arange(9),
                              jax.random.key(0))
  expected = AGGREGATORS[name][1]()(unstack(deltas, 9), np.asarray(weights), np.arange(9), None)
  np.testing.assert_allclose(ref.flat(out), ref.flat(expected), rtol=2e-5, atol=1e-5)
  if "krum" in name:
    assert int(np.sum(metrics["krum_selected"])) == (1 if name == "krum" else HONEST)


def upload(update, scalar):
  """Stacked uploads of a 1-coordinate update and a scalar beside it (FedNova's shape)."""
  return {"normalized_delta": {"w": jnp.asarray(update, jnp.float32)[:, None]},
          "gradient_weight": jnp.asarray(scalar, jnp.float32)}


def test_krum_and_geometric_median_measure_distances_between_updates_alone():
  # Updates 0, 0.1, 0.3, 5 (f = 0, two nearest): Krum scores .1, .05, .13, 46.1 by
  # hand, so client 1. With the scalar (1, 50, 50, 50) in the distance, client 0 would
  # lie 49 away from the rest and client 2 would win (22.13 against 24.05).
  out, _, metrics = robust.krum(0).aggregate(
      None, upload([0.0, 0.1, 0.3, 5.0], [1.0, 50.0, 50.0, 50.0]), jnp.ones(4), jnp.arange(4),
      None)
  np.testing.assert_array_equal(np.asarray(metrics["krum_selected"]), [False, True, False, False])
  np.testing.assert_allclose(float(out["normalized_delta"]["w"][0]), 0.1, rtol=1e-6)
  assert float(out["gradient_weight"]) == 50.0
  # Two updates at 0 and one at 10: the geometric median stays at 0, with the two
  # clients' equal shares of it, so the scalar is their mean, 2; with the scalars
  # 1, 3, 100 in the distance it started at the median (0, 3) and stayed at client 1's.
  out, _, _ = robust.geometric_median().aggregate(
      None, upload([0.0, 0.0, 10.0], [1.0, 3.0, 100.0]), jnp.ones(3), jnp.arange(3), None)
  np.testing.assert_allclose(float(out["normalized_delta"]["w"][0]), 0.0, atol=1e-5)
  np.testing.assert_allclose(float(out["gradient_weight"]), 2.0, rtol=1e-5)
  # A client whose scalar is not finite is dropped with its update.
  out, _, _ = robust.geometric_median().aggregate(
      None, upload([0.0, 0.0, 10.0], [1.0, 3.0, np.nan]), jnp.ones(3), jnp.arange(3), None)
  np.testing.assert_allclose(float(out["gradient_weight"]), 2.0, rtol=1e-5)


def test_norm_bound_clips_the_update_alone_and_dp_clips_everything_sent():
  # Updates (3, 4) and (0.3, 0.4), norms 5 and 0.5, with gradient weights 12 and 1.2.
  # Bounded to 1: the first becomes (0.6, 0.8), its weight stays 12; the second is left.
  deltas = {"normalized_delta": {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4]])},
            "gradient_weight": jnp.asarray([12.0, 1.2])}
  bound = robust.norm_bound(1.0)
  out, _, _, metrics = bound.apply(bound.init(None, 2), deltas, jnp.ones(2), jnp.arange(2), None)
  np.testing.assert_allclose(np.asarray(out["normalized_delta"]["w"]),
                             [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["gradient_weight"]), np.float32([12.0, 1.2]))
  np.testing.assert_allclose(float(metrics["mean_client_norm"]), 2.75, rtol=1e-6)
  assert float(metrics["clipped_fraction"]) == 0.5
  # A model of 0-d parameters alone: all of it is the update (no update was left: a crash).
  only = {"w": jnp.asarray([3.0, 0.5])}
  out, _, _, _ = bound.apply(bound.init(None, 2), only, jnp.ones(2), jnp.arange(2), None)
  np.testing.assert_allclose(np.asarray(out["w"]), [1.0, 0.5], rtol=1e-6)
  # DP's clip bounds all a client sends: norms 13 and 1.3, both scaled with their weight.
  clip = fs.privacy.clip(1.0)
  out, _, _, metrics = clip.apply(clip.init(None, 2), deltas, jnp.ones(2), jnp.arange(2), None)
  np.testing.assert_allclose(np.asarray(out["gradient_weight"]), [12 / 13, 1.2 / 1.3], rtol=1e-6)
  assert float(metrics["clipped_fraction"]) == 1.0


def test_krum_picks_honest_updates(compiled):
  deltas, _ = with_attackers(50.0)
  for name in ("krum", "multi_krum"):
    agg, aggregate = compiled[name]
    _, _, metrics = aggregate(None, deltas, jnp.ones(9), jnp.arange(9), jax.random.key(0))
    assert not np.any(np.asarray(metrics["krum_selected"])[HONEST:])


@pytest.mark.parametrize("make,match", [
    (lambda: robust.krum(3), "needs at least 2\\*3\\+3 = 9 clients per round, got 8"),
    (lambda: robust.krum(1, num_selected=8), "num_selected=8 exceeds"),
    (lambda: robust.trimmed_mean(num_trim=4), "leaves none of the 8 clients"),
])
def test_impossible_robust_configurations_error_before_compiling(small_mlp, count_compiles,
                                                                  make, match):
  before = count_compiles()
  with pytest.raises(ValueError, match=match):
    fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=8,
              batch_size=4, epochs=1, aggregator=make())
  assert count_compiles() == before


@pytest.mark.parametrize("make,match", [
    (lambda: robust.trimmed_mean(0.5), "trim_fraction must lie in"),
    (lambda: robust.krum(-1), "num_byzantine must be an integer"),
    (lambda: robust.geometric_median(0), "num_iterations must be a positive integer"),
    (lambda: robust.norm_bound(0.0), "clipping norm must be a positive number"),
])
def test_bad_robust_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_a_trimmed_mean_that_trims_nobody_is_warned_of():
  # The default fraction 0.1 trims floor(0.1 x 9) = 0: the plain unweighted mean.
  with pytest.warns(UserWarning, match=r"trim_fraction 0.1 of 9 clients per round trims none"):
    robust.trimmed_mean().validate(9)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    robust.trimmed_mean().validate(10)  # trims 1 from each end
    robust.trimmed_mean(num_trim=0).validate(9)  # asked for
    robust.trimmed_mean(0.0).validate(9)


def test_fractions_are_rounded_off_before_floor_and_ceil():
  # 0.29 * 100 is 28.999999999999996 and 0.14 * 50 is 7.000000000000001 in floats: the
  # trimmed mean trims floor(0.29 * 100) = 29 a side, Krum's f is ceil(0.14 * 50) = 7.
  import argparse
  from fedjax_sim import aggregation_options
  values = np.arange(100.0) ** 2
  deltas = {"w": jnp.asarray(values[::-1, None], jnp.float32)}
  out, _, _ = robust.trimmed_mean(0.29).aggregate(None, deltas, jnp.ones(100),
                                                   jnp.arange(100), None)
  np.testing.assert_allclose(out["w"], [values[29:71].mean()], rtol=1e-6)
  krum = aggregation_options._reducer(
      argparse.Namespace(aggregator="krum", malicious_fraction=0.14), 50)
  with pytest.raises(ValueError, match="num_byzantine=7 needs"):
    krum.validate(10, None)
