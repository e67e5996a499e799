"""Clients without examples (`from_clients(..., allow_empty=True)`) take no part in a
round: no vote under uniform weighting, no place among the first reports, no share of
the geometric median; a round of only such clients leaves the model as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import optimizers, privacy, robust, systems
from fedjax_sim.algorithms.base import round_keys, sample_clients
from conftest import max_relative_error


def clients(sizes, num_features=4, num_classes=3):
  xs = [np.random.default_rng(100 + i).normal(size=(n, num_features)).astype(np.float32)
        for i, n in enumerate(sizes)]
  ys = [np.random.default_rng(200 + i).integers(0, num_classes, n).astype(np.int32)
        for i, n in enumerate(sizes)]
  return fs.from_clients(xs, ys, num_classes=num_classes, allow_empty=True)


@pytest.fixture(scope="module")
def logreg():
  return fs.models.logistic_regression(4, 3)


def moved(new, old):
  return max((float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))),
             default=0.0)


def test_the_geometric_median_leaves_clients_of_weight_0_out():
  # They moved its start (the median of every row), and with it the result of its
  # fixed steps; with no weight at all it was 0 / 0.
  rng = np.random.default_rng(0)
  rows = {"w": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)}
  weights = jnp.asarray([3.0, 1.0, 2.0, 5.0, 1.0])
  median = robust.geometric_median()
  want, _, _ = median.aggregate((), rows, weights, None, None)
  padded = {"w": jnp.concatenate([rows["w"], jnp.zeros((2, 6))])}
  got, _, _ = median.aggregate((), padded, jnp.concatenate([weights, jnp.zeros(2)]), None, None)
  assert max_relative_error(got, want) < 1e-6
  none, _, _ = median.aggregate((), padded, jnp.zeros(7), None, None)
  np.testing.assert_array_equal(np.asarray(none["w"]), np.zeros(6))


def test_uniform_weighting_gives_clients_without_examples_no_vote(logreg):
  # Each of the 4 clients with examples counted 1/6, not 1/4: the update shrank by 4/6.
  kw = dict(client_optimizer=optimizers.client_optimizer("sgd", 0.1), batch_size=4,
            epochs=1, weighting="uniform")
  rounds = []
  for sizes in ((5, 7, 6, 4, 0, 0), (5, 7, 6, 4)):
    algorithm = fs.fedavg(logreg.apply, clients_per_round=len(sizes), **kw)
    state = algorithm.init(logreg.params, jax.random.key(0))
    rounds.append(jax.jit(algorithm.round)(state, clients(sizes)))
  (with_empty, m_empty), (without, m) = rounds
  assert max_relative_error(with_empty.params, without.params) < 1e-5
  assert float(m_empty["update_norm"]) == pytest.approx(float(m["update_norm"]), rel=1e-5)


def test_over_selection_keeps_the_first_reports_of_clients_with_examples(logreg):
  # A client without examples trains no step and reported first, taking a place.
  profiles = systems.make_profiles(6, examples_per_s=100.0, downlink_bytes_per_s=1e6,
                                   uplink_bytes_per_s=1e6)
  algorithm = fs.fedavg(logreg.apply, client_optimizer=optimizers.client_optimizer("sgd", 0.1),
                        clients_per_round=2, batch_size=4, epochs=1,
                        systems=systems.SystemsConfig(profiles, over_selection=4))
  data = clients((20, 20, 20, 0, 0, 0))
  state = algorithm.init(logreg.params, jax.random.key(0))
  _, metrics = jax.jit(algorithm.round)(state, data)
  kept = np.asarray(metrics["client_ids"])[np.asarray(metrics["client_aggregated"])]
  assert len(kept) == 2 and (np.asarray(data.counts)[kept] > 0).all()
  assert int(metrics["num_examples"]) == 40


def test_a_round_of_only_clients_without_examples_leaves_the_model(logreg):
  data = clients((5, 7, 0, 0, 0, 0))

  def ids(key):
    return set(np.asarray(sample_clients(round_keys(key)[1], 6, 3)).tolist())

  empty = next(k for k in map(jax.random.key, range(1000)) if ids(k) <= {2, 3, 4, 5})
  kw = dict(client_optimizer=optimizers.client_optimizer("sgd", 0.1), clients_per_round=3,
            batch_size=4, epochs=1)
  # FedDyn's mean is uniform, and moved the model by -h / alpha; a server Adam under
  # uniform weighting took the empty clients' zero updates for a round's update.
  for algorithm in (fs.feddyn(logreg.apply, alpha=0.1, **kw),
                    fs.fedavg(logreg.apply, weighting="uniform",
                              server_optimizer=optimizers.server_optimizer("fedadam"), **kw)):
    state = algorithm.init(logreg.params, jax.random.key(1), 6)
    state, _ = jax.jit(algorithm.round)(state, clients((5, 7, 6, 4, 3, 2)))  # a real start
    state = state._replace(key=empty)
    new, metrics = jax.jit(algorithm.round)(state, data)
    assert int(metrics["num_examples"]) == 0
    assert moved(new.params, state.params) == 0.0
    assert moved(new.opt_state, state.opt_state) == 0.0


def test_a_fedbuff_buffer_of_clients_without_examples_is_no_update(logreg):
  profiles = systems.make_profiles(6, examples_per_s=100.0, downlink_bytes_per_s=1e6,
                                   uplink_bytes_per_s=1e6,
                                   latency_s=np.array([0.01, 0.01, 5.0, 5.0, 5.0, 5.0]))
  algorithm = fs.fedbuff(logreg.apply, client_optimizer=optimizers.client_optimizer("sgd", 0.1),
                         server_optimizer=optimizers.server_optimizer("fedadam"),
                         profiles=profiles, concurrency=4, buffer_size=2, batch_size=4,
                         epochs=1)
  data = clients((40, 40, 0, 0, 0, 0))
  state = algorithm.init(logreg.params, jax.random.key(0))
  # Such clients finish first and fill the buffer: fedbuff refuses them up front, and a
  # round that meets them anyway makes no update.
  with pytest.raises(ValueError, match="fedbuff: 4 of the data's clients have no examples"):
    algorithm.validate(state, data)
  step, empty_buffers = jax.jit(algorithm.round), 0
  for _ in range(6):
    new, metrics = step(state, data)
    if int(metrics["num_examples"]) == 0:
      empty_buffers += 1
      assert moved(new.params, state.params) == 0.0
    state = new
  assert empty_buffers


def test_data_a_round_cannot_use_is_refused_before_compiling(logreg):
  kw = dict(client_optimizer=optimizers.client_optimizer("sgd", 0.1), clients_per_round=2,
            batch_size=4, epochs=1)
  median = fs.fedavg(logreg.apply, aggregator=robust.coordinate_median(), **kw)
  state = median.init(logreg.params, jax.random.key(0))
  with pytest.raises(ValueError, match="2 of the data's clients have no examples"):
    median.validate(state, clients((5, 7, 6, 0, 0)))
  # DP-FedAvg's mean divides by the clients sampled on purpose: a zero update is its due.
  dp = fs.fedavg(logreg.apply, aggregator=privacy.dp_mean(1.0, 0.01), **kw)
  dp.validate(dp.init(logreg.params, jax.random.key(0)), clients((5, 7, 6, 0, 0)))
  plain = fs.fedavg(logreg.apply, **kw)
  with pytest.raises(ValueError, match="the training data has no examples"):
    plain.validate(plain.init(logreg.params, jax.random.key(0)), clients((0, 0, 0)))


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("schedule", [{"epochs": 1}, {"steps": 3}])
def test_the_loop_reference_agrees_on_clients_without_examples(logreg, weighting, schedule):
  # It divided by 0 (steps= per epoch, the mean's weights, the round's loss) and, under
  # uniform weighting, gave such a client a vote.
  data = clients((5, 0, 7, 0, 6, 4))
  kw = dict(client_optimizer=optax.sgd(0.1), clients_per_round=4, batch_size=4,
            weighting=weighting, **schedule)
  algorithm, reference = fs.fedavg(logreg.apply, **kw), fs.ReferenceFedAvg(logreg.apply, **kw)
  state = algorithm.init(logreg.params, jax.random.key(0))
  ref_state = reference.init(logreg.params, jax.random.key(0))
  for _ in range(2):
    state, _ = jax.jit(algorithm.round)(state, data)
    ref_state, _ = reference.round(ref_state, data)
  assert max_relative_error(state.params, ref_state.params) < 1e-5


def test_the_loop_reference_leaves_the_model_on_a_round_of_only_empty_clients(logreg):
  data = clients((0, 0, 0, 5))
  key = next(k for k in map(jax.random.key, range(1000))
             if 3 not in np.asarray(sample_clients(round_keys(k)[1], 4, 2)).tolist())
  reference = fs.ReferenceFedAvg(logreg.apply, client_optimizer=optax.sgd(0.1),
                                 server_optimizer=optax.adam(0.1), clients_per_round=2,
                                 batch_size=4, epochs=1)
  state = reference.init(logreg.params, key)
  new, metrics = reference.round(state, data)
  assert np.isnan(metrics["train_loss"]) and moved(new.params, state.params) == 0.0
