"""Client profiles and simulated time (fedjax_sim.systems)."""

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
  np.testing.assert_array_equal(systems.full_steps(counts, 10, None, 7), [7, 7, 7, 7])


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
