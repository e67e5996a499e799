"""Client profiles and simulated time (fedjax_sim.systems)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import systems


def test_client_seconds_hand_computed():
  p = systems.make_profiles(2, examples_per_s=[100.0, 10.0], downlink_bytes_per_s=[1e6, 2e6],
                            uplink_bytes_per_s=[5e5, 1e6], latency_s=[0.1, 0.0])
  # client 0: 0.1 + 4e6/1e6 + 3*20/100 + 1e6/5e5 = 0.1 + 4 + 0.6 + 2 = 6.7
  # client 1: 0 + 4e6/2e6 + 3*20/10 + 1e6/1e6 = 2 + 6 + 1 = 9
  t = systems.client_seconds(p, jnp.array([3, 3]), 20, 4e6, 1e6)
  np.testing.assert_allclose(t, [6.7, 9.0], rtol=1e-6)


def test_full_steps():
  counts = jnp.array([0, 1, 20, 21])
  np.testing.assert_array_equal(systems.full_steps(counts, 10, 2, None), [0, 2, 4, 6])
  # A client without examples takes no step in steps= mode either (local.py), so it is
  # neither timed for 7 nor found late for them.
  np.testing.assert_array_equal(systems.full_steps(counts, 10, None, 7), [0, 7, 7, 7])


def test_sample_profiles_deterministic_and_distributions():
  a = systems.sample_profiles(500, seed=3)
  b = systems.sample_profiles(500, seed=3)
  c = systems.sample_profiles(500, seed=4)
  np.testing.assert_array_equal(a.examples_per_s, b.examples_per_s)
  assert not np.array_equal(a.examples_per_s, c.examples_per_s)
  assert a.num_clients == 500
  # lognormal median is the given median
  assert abs(np.median(a.examples_per_s) / systems.DEFAULT_SPEED[1] - 1) < 0.15
  tiers = systems.sample_profiles(1000, examples_per_s=("choice", [10.0, 100.0], [0.25, 0.75]),
                                  availability=("uniform", 0.5, 1.0))
  assert set(np.unique(tiers.examples_per_s)) == {10.0, 100.0}
  assert 0.2 < np.mean(tiers.examples_per_s == 10.0) < 0.3
  assert 0.5 <= float(tiers.availability.min()) and float(tiers.availability.max()) <= 1.0


@pytest.mark.parametrize("field, value, message", [
    ("examples_per_s", 0.0, "examples_per_s must be > 0"),
    ("uplink_bytes_per_s", -1.0, "uplink_bytes_per_s must be > 0"),
    ("downlink_bytes_per_s", [1.0, 0.0, 1.0], "client 1 has 0.0"),
    ("latency_s", -0.5, "latency_s must be >= 0"),
    ("availability", 1.5, "availability must be in \\[0, 1\\]"),
    ("examples_per_s", [1.0, 2.0], "shape \\(3,\\)"),
    ("examples_per_s", ("gamma", 1.0), "unknown distribution"),
])
def test_bad_profiles(field, value, message):
  kwargs = dict(examples_per_s=1.0, downlink_bytes_per_s=1.0, uplink_bytes_per_s=1.0)
  kwargs[field] = value
  with pytest.raises(ValueError, match=message):
    systems.make_profiles(3, **kwargs)


def test_profiles_must_match_data():
  p = systems.sample_profiles(4)
  with pytest.raises(ValueError, match="4 clients but the data has 5"):
    systems.check_profiles(p, 5)


# --- Time-varying client data. ---

def _padded(values, slots):
  x = np.full((slots, 1), -9.0, np.float32)
  x[:len(values), 0] = values
  y = np.full((slots,), -1, np.int32)
  y[:len(values)] = np.asarray(values) % 3
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("round_index, expected", [(0, [0, 1, 2]), (1, [2, 3, 4]),
                                                   (2, [4, 0, 1]), (3, [1, 2, 3])])
def test_sliding_window_by_hand(round_index, expected):
  schedule = systems.sliding_window(3, 2)  # a client of 5 examples: 0 1 2 3 4
  for slots in (5, 8):  # padding changes nothing in the real slots
    x, y = _padded([0, 1, 2, 3, 4], slots)
    wx, wy, n = schedule(x, y, jnp.int32(5), jnp.int32(0), jnp.int32(round_index))
    assert int(n) == 3
    np.testing.assert_array_equal(wx[:3, 0], expected)
    np.testing.assert_array_equal(wy[:3], np.asarray(expected) % 3)
    assert wx.shape == x.shape


def test_sliding_window_wider_than_the_client_and_empty_clients():
  x, y = _padded([0, 1, 2, 3, 4], 8)
  wx, _, n = systems.sliding_window(10, 1)(x, y, jnp.int32(5), jnp.int32(0), jnp.int32(1))
  assert int(n) == 5
  np.testing.assert_array_equal(wx[:5, 0], [1, 2, 3, 4, 0])
  np.testing.assert_array_equal(wx[5:, 0], [-9, -9, -9])  # padding stays after
  _, _, n = systems.sliding_window(3, 1)(x, y, jnp.int32(0), jnp.int32(0), jnp.int32(4))
  assert int(n) == 0


@pytest.mark.parametrize("n, stride, round_index", [
    (46340, 46339, 46339), (50000, 49999, 49999), (70000, 69999, 69998), (70000, 12345, 3)])
def test_sliding_window_start_on_large_clients(n, stride, round_index):
  # (r mod n) * (stride mod n) passes 2^31 once n > 46,340 (and 2^32 past 65,536)
  x, y = _padded(np.arange(n), n)
  wx, _, _ = jax.jit(systems.sliding_window(2, stride))(x, y, jnp.int32(n), jnp.int32(0),
                                                         jnp.int32(round_index))
  np.testing.assert_array_equal(wx[:2, 0], [round_index * stride % n,
                                            (round_index * stride + 1) % n])


def test_label_drift_by_hand():
  drift = systems.label_drift(3, period=2)
  x, y = jnp.zeros((4, 1)), jnp.array([0, 1, 2, -1])  # -1: an ignored (padding) label
  for r, expected in [(0, [0, 1, 2, -1]), (1, [0, 1, 2, -1]), (2, [1, 2, 0, -1]),
                      (5, [2, 0, 1, -1]), (6, [0, 1, 2, -1])]:
    np.testing.assert_array_equal(drift(x, y, 3, 0, jnp.int32(r))[1], expected)
  both = systems.chain_schedules(systems.sliding_window(2, 1), drift)
  x, y = _padded([0, 1, 2], 4)
  bx, by, n = both(x, y, jnp.int32(3), jnp.int32(0), jnp.int32(2))
  np.testing.assert_array_equal(bx[:2, 0], [2, 0])
  np.testing.assert_array_equal(by[:2], [0, 1])  # labels 2, 0 shifted by 1
  with pytest.raises(ValueError, match="period must be a positive integer"):
    systems.label_drift(3, 0)
  with pytest.raises(ValueError, match="window must be a positive integer"):
    systems.sliding_window(0, 1)


def test_label_drift_must_fit_the_data_and_the_model():
  """A drift over more classes than the model's outputs gave labels past the last logit
  (a NaN loss from the first shift on); one over fewer than the data's labels rewrote
  them in round 0. Both are refused by validate, also inside a chain; the edges pass."""
  import fedjax_sim as fs
  from fedjax_sim.algorithms import features
  setup = features.default_setup()  # 3 classes, 3 outputs
  for num_classes, match in ((4, "over 4 classes but the model has 3 outputs"),
                             (2, "over 2 classes but the data's labels go up to 2")):
    for schedule in (systems.label_drift(num_classes, 1),
                     systems.chain_schedules(systems.sliding_window(4, 1),
                                             systems.label_drift(num_classes, 1))):
      algorithm = features.build("fedavg", setup=setup, client_data_schedule=schedule)
      with pytest.raises(ValueError, match=match):
        algorithm.validate(algorithm.init(setup.model.params, jax.random.key(0)), setup.data)
  fits = features.build("fedavg", setup=setup, client_data_schedule=systems.label_drift(3, 1))
  fits.validate(fits.init(setup.model.params, jax.random.key(0)), setup.data)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "feddyn"])
def test_trains_on_the_scheduled_window(ragged, name):
  # SCAFFOLD's control variate step and FedDyn's alpha_k read the total weight of all
  # clients, which must be on the scheduled counts' scale too (it summed the full ones).
  import optax
  import fedjax_sim as fs
  from conftest import max_relative_error
  xs, ys, train = ragged
  model = fs.logistic_regression(5, 3, seed=0)
  build = {"fedavg": lambda **kw: fs.fedavg(model.apply, client_optimizer=optax.sgd(0.5), **kw),
           "scaffold": lambda **kw: fs.algorithms.scaffold(model.apply, client_learning_rate=0.5,
                                                          **kw),
           "feddyn": lambda **kw: fs.algorithms.feddyn(model.apply, alpha=0.1,
                                                      client_optimizer=optax.sgd(0.5), **kw)}
  kwargs = dict(clients_per_round=3, batch_size=4, epochs=1)
  window, stride, r = 5, 4, 3
  scheduled = build[name](client_data_schedule=systems.sliding_window(window, stride), **kwargs)
  state = scheduled.init(model.params, jax.random.key(0), 6)._replace(round=jnp.int32(r))
  a, ma = jax.jit(scheduled.round)(state, train)
  # The same round on data windowed by hand: client i keeps min(5, n) examples from 12 mod n.
  by_hand = []
  for x, y in zip(xs, ys):
    idx = (r * stride + np.arange(min(window, len(x)))) % len(x)
    by_hand.append((x[idx], y[idx]))
  windowed = fs.from_clients([x for x, _ in by_hand], [y for _, y in by_hand], num_classes=3)
  plain = build[name](**kwargs)
  b, mb = jax.jit(plain.round)(state, windowed)
  assert max_relative_error(a.params, b.params) < 1e-6
  for got, want in zip(jax.tree_util.tree_leaves((a.algorithm_state, a.client_states)),
                       jax.tree_util.tree_leaves((b.algorithm_state, b.client_states))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert int(ma["num_examples"]) == int(mb["num_examples"])
  assert max_relative_error(a.params, model.params) > 1e-3
