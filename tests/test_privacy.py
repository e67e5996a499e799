"""DP-FedAvg: clipping bounds every update, noise has the stated std, adaptive clipping
tracks its quantile, the loop reference agrees, and epsilon is dp-accounting's."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, keys, privacy
import aggregation_reference as ref

SMALL_ORDERS = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # fast RDP for tests


def stacked(seed, num_clients=7, scales=None):
  """Stacked updates {'w': [C, 3, 4], 'b': [C, 4]} with per-client norms spread widely."""
  rng = np.random.default_rng(seed)
  scales = np.geomspace(0.01, 100.0, num_clients) if scales is None else np.asarray(scales)
  w = rng.normal(size=(num_clients, 3, 4)) * scales[:, None, None]
  b = rng.normal(size=(num_clients, 4)) * scales[:, None]
  return {"b": jnp.asarray(b, jnp.float32), "w": jnp.asarray(w, jnp.float32)}


def unstack(tree, num):
  return [jax.tree_util.tree_map(lambda a: np.asarray(a[i]), tree) for i in range(num)]


def norms(tree):
  return np.asarray(jax.vmap(optax.tree.norm)(tree))


def test_clip_bounds_every_update_and_matches_loop(count_compiles):
  deltas = stacked(0)
  before = norms(deltas)
  stage = privacy.clip(1.5)
  clipped, _, _, metrics = jax.jit(stage.apply)(None, deltas, jnp.ones(7), jnp.arange(7),
                                                jax.random.key(0))
  after = norms(clipped)
  assert np.all(after <= 1.5 * (1 + 1e-6))
  small = before <= 1.5
  assert small.any() and (~small).any()
  np.testing.assert_allclose(after[~small], 1.5, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(clipped["w"])[small], np.asarray(deltas["w"])[small])
  assert float(metrics["clipped_fraction"]) == pytest.approx((~small).mean())
  # Over the clients whose update counts (weight > 0; zero updates of clients dropped
  # under systems= were counted as not clipped).
  counts = np.array([0, 1, 0, 1, 1, 0, 1], bool)
  _, _, _, counted = jax.jit(stage.apply)(None, deltas, jnp.asarray(counts, jnp.float32),
                                          jnp.arange(7), jax.random.key(0))
  assert float(counted["clipped_fraction"]) == pytest.approx((~small)[counts].mean())
  assert float(counted["mean_client_norm"]) == pytest.approx(before[counts].mean(), rel=1e-6)
  expected, _ = ref.Clip(1.5)(unstack(deltas, 7), np.ones(7), np.arange(7), None)
  for i, e in enumerate(expected):
    np.testing.assert_allclose(np.asarray(clipped["w"][i]), e["w"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adaptive", [None, privacy.AdaptiveClipping(count_stddev=2.0)],
                         ids=["fixed", "adaptive"])
def test_dp_noise_has_the_stated_stddev(adaptive):
  # Zero updates: the output is pure noise, N(0, (z_delta C / m)^2) per coordinate.
  m, d, c, z = 4, 200_000, 0.7, 1.3
  agg = privacy.dp_mean(c, z, adaptive=adaptive)
  deltas = {"v": jnp.zeros((m, d))}
  out, _, metrics = jax.jit(agg.aggregate)(agg.init(None, None), deltas, jnp.ones(m),
                                           jnp.arange(m), jax.random.key(1))
  z_delta = z if adaptive is None else (z ** -2 - (2 * 2.0) ** -2) ** -0.5
  expected = z_delta * c / m
  sample = np.asarray(out["v"], np.float64)
  # Sample std of 2e5 normals: relative standard error 1/sqrt(2 d) = 0.16%.
  assert sample.std() == pytest.approx(expected, rel=0.01)
  assert abs(sample.mean()) < 5 * expected / math.sqrt(d)
  assert float(metrics["noise_stddev"]) == pytest.approx(expected, rel=1e-6)
  if adaptive is not None:
    assert z_delta > z  # the update's share is noisier than the total multiplier


def test_dp_mean_matches_loop_reference_over_rounds():
  # Fixed and adaptive clipping over 4 rounds, the clipping norm carried in the state.
  for adaptive in (None, privacy.AdaptiveClipping(0.3, 0.5, count_stddev=1.0)):
    agg = privacy.dp_mean(1.0, 0.8, adaptive=adaptive)
    loop = ref.DPMean(1.0, 0.8, *(() if adaptive is None else (0.3, 0.5, 1.0)))
    step = jax.jit(agg.aggregate)
    state = agg.init(None, None)
    for r in range(4):
      deltas, ids, key = stacked(r), jnp.arange(7) + 10 * r, jax.random.key(r)
      out, state, metrics = step(state, deltas, jnp.ones(7), ids, key)
      expected = loop(unstack(deltas, 7), np.ones(7), np.asarray(ids), key)
      for leaf in ("b", "w"):
        np.testing.assert_allclose(np.asarray(out[leaf]), expected[leaf], rtol=1e-5, atol=1e-6)
      assert float(state.clip_norm) == pytest.approx(loop.clip_norm, rel=1e-5)
    if adaptive is not None:
      assert float(state.clip_norm) != 1.0


def test_adaptive_clipping_tracks_the_target_quantile():
  # Norms 1..9 every round, no noise: the clipping norm settles where a fraction
  # `target_quantile` of them is at most C (between the 3rd and 4th norm for 0.35).
  agg = privacy.dp_mean(0.1, 0.0, adaptive=privacy.AdaptiveClipping(0.35, 0.1, count_stddev=0.0))
  deltas = {"v": jnp.diag(jnp.arange(1.0, 10.0))}

  def body(state, key):
    _, state, metrics = agg.aggregate(state, deltas, jnp.ones(9), jnp.arange(9), key)
    return state, metrics["clip_norm"]

  _, path = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(0), 400)))(
      agg.init(None, None))
  assert np.all((np.asarray(path[-50:]) >= 3.0 * 0.9) & (np.asarray(path[-50:]) <= 4.0 * 1.1))


def test_epsilon_equals_dp_accounting_for_the_simulated_sampling():
  # (tests/test_attacks.py checks that every round's metrics carry it through the runner.)
  z, m, n, delta = 1.1, 3, 6, 1e-3
  accountant = privacy.DPAccountant(z, m, n, delta, orders=SMALL_ORDERS)
  for rounds in (1, 5, 40):
    direct = dp_accounting.rdp.RdpAccountant(
        SMALL_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        n, m, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    assert accountant.epsilon(rounds) == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
  assert accountant(5) == {"epsilon": accountant.epsilon(5)}  # the runner's round_metrics


def test_pld_with_everyone_sampled_is_the_analytic_gaussian_with_sensitivity_2c():
  # Replacing one client moves the clipped sum by up to 2C, so T rounds of noise z C compose
  # to one Gaussian mechanism with noise / sensitivity = z / (2 sqrt(T)) (Balle & Wang 2018).
  z, n, delta, rounds = 4.0, 20, 1e-5, 10
  pld = privacy.DPAccountant(z, n, n, delta, accountant="pld").epsilon(rounds)
  analytic = dp_accounting.get_epsilon_gaussian(z / 2 / math.sqrt(rounds), delta)
  assert pld == pytest.approx(analytic, rel=1e-3)
  rdp = privacy.DPAccountant(z, n, n, delta, orders=SMALL_ORDERS).epsilon(rounds)
  assert rdp > pld  # RDP's conversion is looser; both account for the same mechanism
  # Sampling fewer clients lowers RDP's epsilon (amplification), not the PLD bound's.
  assert privacy.DPAccountant(z, 5, n, delta, orders=SMALL_ORDERS).epsilon(rounds) < rdp
  assert privacy.DPAccountant(z, 5, n, delta, accountant="pld").epsilon(rounds) == pld


def test_target_epsilon_calibrates_noise_or_bounds_rounds():
  kwargs = dict(rounds=20, clients_per_round=10, num_clients=200, delta=1e-4,
                orders=SMALL_ORDERS)
  z = privacy.calibrate_noise_multiplier(3.0, tol=1e-3, **kwargs)
  eps = lambda z: privacy.DPAccountant(z, 10, 200, 1e-4, orders=SMALL_ORDERS).epsilon(20)
  assert eps(z) <= 3.0 < eps(z - 2e-3)
  accountant = privacy.DPAccountant(2.0, 10, 200, 1e-4, orders=SMALL_ORDERS)
  last = accountant.max_rounds(3.0)
  assert 0 < last and accountant.epsilon(last) <= 3.0 < accountant.epsilon(last + 1)
  assert accountant.epsilon(0) == 0.0
  assert privacy.DPAccountant(0.0, 10, 200, 1e-4).epsilon(1) == math.inf


@pytest.mark.parametrize("make,match", [
    (lambda: privacy.dp_mean(0.0, 1.0), "clipping norm must be a positive number"),
    (lambda: privacy.dp_mean(-1.0, 1.0), "clipping norm must be a positive number"),
    (lambda: privacy.clip(float("nan")), "clipping norm must be a positive number"),
    (lambda: privacy.dp_mean(1.0, -0.5), "noise multiplier must be a number >= 0"),
    (lambda: privacy.gaussian_noise(-1.0), "noise multiplier must be a number >= 0"),
    (lambda: privacy.dp_mean(1.0, 1.0, adaptive=privacy.AdaptiveClipping(1.5)),
     "target_quantile must lie in"),
    (lambda: privacy.dp_mean(1.0, 1.0, adaptive=privacy.AdaptiveClipping(count_stddev=0.0)
                             ).validate(10, None), "needs count noise > 0"),
    (lambda: privacy.DPAccountant(1.0, 10, 5, 1e-5), "clients_per_round must be an integer"),
    (lambda: privacy.DPAccountant(1.0, 2, 5, 0.0), "delta must lie in"),
    (lambda: privacy.DPAccountant(1.0, 2, 5, 1e-5, accountant="gdp"), "accountant must be"),
    (lambda: privacy.calibrate_noise_multiplier(-1.0, rounds=5, clients_per_round=2,
                                                num_clients=5, delta=1e-5),
     "target epsilon must be a finite number > 0"),
    # inf halved the multiplier to 0 for a minute, then failed inside dp-accounting
    (lambda: privacy.calibrate_noise_multiplier(float("inf"), rounds=5, clients_per_round=2,
                                                num_clients=5, delta=1e-5),
     "target epsilon must be a finite number > 0, got inf"),
])
def test_bad_privacy_configurations(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_adaptive_count_noise_too_small_errors_before_compiling(small_mlp, count_compiles):
  # With 10 clients the paper's count noise is 10 / 20 = 0.5 <= z / 2: it alone would
  # spend more than the whole budget.
  before = count_compiles()
  with pytest.raises(ValueError, match="count noise"):
    fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=10,
              batch_size=4, epochs=1,
              aggregator=privacy.dp_mean(1.0, 2.0, adaptive=privacy.AdaptiveClipping()))
  assert count_compiles() == before


def test_chain_rejects_misordered_stages():
  with pytest.raises(ValueError, match="exactly one reducer"):
    aggregators.chain(privacy.clip(1.0))
  with pytest.raises(ValueError, match="per-client transforms come before the reducer"):
    aggregators.chain(aggregators.mean(), privacy.clip(1.0))


@pytest.mark.parametrize("name", ["scaffold", "feddyn"])
def test_with_dp_no_example_count_reaches_the_model_around_the_noise(name):
  # Neighbouring datasets: client 5's data replaced (12 -> 30 examples), the same key,
  # and client 5 not sampled. DP's reducer ignores the weights, so the round must not
  # read example counts elsewhere either (SCAFFOLD's control variate step scaled by the
  # sampled share of all examples, FedDyn's alpha_k by the client's): the two states are
  # the same to the bit. With the weighted mean the counts do reach SCAFFOLD's state.
  from conftest import ragged_clients, tiny_mlp
  apply, params = tiny_mlp()
  xs, ys = ragged_clients()
  more_x, more_y = ragged_clients(seed=1, sizes=(30,))
  datasets = [fs.from_clients(xs, ys, num_classes=3),
              fs.from_clients(xs[:5] + more_x, ys[:5] + more_y, num_classes=3)]
  key = next(jax.random.key(s) for s in range(20)
             if 5 not in np.asarray(fs.sample_clients(keys.round_keys(jax.random.key(s))[1], 6, 2)))

  def states(aggregator):
    build = dict(scaffold=lambda **kw: fs.algorithms.scaffold(apply, client_learning_rate=0.1, **kw),
                 feddyn=lambda **kw: fs.algorithms.feddyn(apply, alpha=0.1,
                                                          client_optimizer=optax.sgd(0.1), **kw))
    algorithm = build[name](clients_per_round=2, batch_size=4, steps=2, aggregator=aggregator)
    return [jax.jit(algorithm.round)(algorithm.init(params, key, 6), data)[0]
            for data in datasets]

  first, second = states(privacy.dp_mean(0.5, 1.0))
  for a, b in zip(jax.tree_util.tree_leaves((first.params, first.algorithm_state)),
                  jax.tree_util.tree_leaves((second.params, second.algorithm_state))):
    np.testing.assert_array_equal(a, b)
  if name == "scaffold":
    first, second = states(None)
    assert optax.tree.norm(first.algorithm_state) != optax.tree.norm(second.algorithm_state)


def test_bfloat16_updates_are_clipped_and_noised_in_float32():
  # bfloat16 rounding after the scaling left norms up to 0.3% over the bound, and
  # dp_mean's float32 clipping norm met bfloat16 leaves in a select (a TypeError).
  deltas = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), stacked(3))
  clipped, _, _, _ = privacy.clip(0.7).apply(None, deltas, jnp.ones(7), jnp.arange(7), None)
  as64 = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(clipped)]
  assert np.sqrt(sum((a.reshape(7, -1) ** 2).sum(1) for a in as64)).max() <= 0.7 * (1 + 1e-6)
  aggregator = privacy.dp_mean(0.7, 1.0)
  delta, _, _ = jax.jit(aggregator.aggregate)(aggregator.init(None, 7), deltas, jnp.ones(7),
                                              jnp.arange(7), jax.random.key(0))
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(delta))


def test_an_accountant_of_another_population_is_refused_before_compiling(ragged, small_mlp,
                                                                         count_compiles):
  # Its epsilon was reported for 1,000 clients while the run sampled 3 of 6.
  _, _, train = ragged
  algorithm = fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=3,
                        batch_size=4, epochs=1, aggregator=privacy.dp_mean(1.0, 0.1))
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  accountant = privacy.DPAccountant(0.1, 3, 1000, 1e-5, orders=SMALL_ORDERS)
  before = count_compiles()
  with pytest.raises(ValueError, match="num_clients=1000 but the training data has 6"):
    fs.run(algorithm, state, train, rounds=1, round_metrics=accountant, progress=False)
  other_m = privacy.DPAccountant(0.1, 5, 6, 1e-5, orders=SMALL_ORDERS)
  with pytest.raises(ValueError, match="clients_per_round=5 but the algorithm aggregates 3"):
    fs.run(algorithm, state, train, rounds=1, round_metrics=other_m, progress=False)
  assert count_compiles() == before
