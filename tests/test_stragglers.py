"""Synchronous rounds with client systems: deadlines, over-selection, stragglers, dropout
(fedavg(..., systems=...)), checked against numpy computations of the same rule and
against per-client training on the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, compression, local, robust, systems
from fedjax_sim.algorithms.base import client_key, round_keys, sample_clients
from conftest import max_relative_error, ragged_clients

# The ragged clients of conftest: sizes 3, 17, 8, 30, 1, 12; batch 4, one epoch.
COUNTS = np.array([3, 17, 8, 30, 1, 12])
BATCH = 4
FULL = -(-COUNTS // BATCH)                          # [1, 5, 2, 8, 1, 3] steps
STEP_S = np.array([1.0, 0.5, 2.0, 0.25, 3.0, 0.9])  # seconds per local step
MODEL_BYTES = (5 * 3 + 3) * 4                       # logistic regression 5 -> 3, float32
COMM_S = 2.0                                        # 1 s down + 1 s up at MODEL_BYTES / s
FULL_S = COMM_S + FULL * STEP_S                     # [3, 4.5, 6, 4, 5, 4.7]
DEADLINE = 4.6                                      # clients 0, 1, 3 fit


@pytest.fixture(scope="module")
def setup():
  xs, ys = ragged_clients()
  train = fs.from_clients(xs, ys, num_classes=3)
  model = fs.logistic_regression(5, 3, seed=0)
  profiles = systems.make_profiles(6, examples_per_s=BATCH / STEP_S,
                                   downlink_bytes_per_s=MODEL_BYTES,
                                   uplink_bytes_per_s=MODEL_BYTES)
  return train, model, profiles


def make(model, clients_per_round, **kwargs):
  return fs.fedavg(model.apply, client_optimizer=optax.sgd(0.5), clients_per_round=clients_per_round,
                   batch_size=BATCH, epochs=1, **kwargs)


def one_round(algorithm, params, train, seed=0):
  """(state before, state after, metrics) of one jitted round from key `seed`."""
  state = algorithm.init(params, jax.random.key(seed))
  new_state, metrics = jax.jit(algorithm.round)(state, train)
  return state, new_state, jax.device_get(metrics)


def expected_params(model, train, state, ids, budgets, weights):
  """params + the weighted mean of per-client local_update deltas on the round's keys."""
  update = jax.jit(local.make_local_update(fs.cross_entropy(model.apply), optax.sgd(0.5),
                                           batch_size=BATCH, epochs=1))
  _, _, train_key = round_keys(state.key)
  total = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  for i, budget, w in zip(ids, budgets, weights):
    if w == 0:
      continue
    r = update(state.params, train.x[i], train.y[i], train.counts[i],
               client_key(train_key, int(i)), state.params, jnp.int32(budget))
    assert int(r.num_steps) == budget  # LocalResult agrees with the plan
    total = jax.tree_util.tree_map(lambda t, d: t + w * d, total, r.delta)
  denom = max(float(np.sum(weights)), 1e-30)
  return jax.tree_util.tree_map(lambda p, t: p + t / denom, state.params, total)


def test_deadline_drop_aggregates_exactly_the_clients_that_fit(setup):
  train, model, profiles = setup
  cfg = systems.SystemsConfig(profiles, deadline_s=DEADLINE, stragglers="drop")
  algorithm = make(model, 4, systems=cfg, client_chunk_size=2)  # budgets by chunk too
  state, new_state, m = one_round(algorithm, model.params, train)
  ids = m["client_ids"]
  np.testing.assert_allclose(m["client_seconds"], FULL_S[ids], rtol=1e-5)
  fits = FULL_S[ids] <= DEADLINE
  np.testing.assert_array_equal(m["client_aggregated"], fits)
  assert 0 < fits.sum() < 4  # 4 of 6 sampled: always some of {0, 1, 3} and of {2, 4, 5}
  np.testing.assert_array_equal(m["client_steps"], np.where(fits, FULL[ids], 0))
  assert m["num_aggregated"] == fits.sum() and m["num_stragglers"] == (~fits).sum()
  assert m["num_dropped"] == 0
  # Fewer than 4 reported in time: the server waited out the deadline.
  assert m["round_time_s"] == pytest.approx(DEADLINE)
  assert float(new_state.sim_time) == pytest.approx(DEADLINE)
  # The update is FedAvg over just the clients that fit, against the loop reference.
  reference = fs.ReferenceFedAvg(model.apply, client_optimizer=optax.sgd(0.5),
                                 clients_per_round=4, batch_size=BATCH, epochs=1)
  _, _, train_key = round_keys(state.key)
  kept = [int(i) for i in ids[fits]]
  deltas = [reference.client_update(state.params, *train.client(i), client_key(train_key, i))[0]
            for i in kept]
  w = COUNTS[kept] / COUNTS[kept].sum()
  mean = jax.tree_util.tree_map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
  expected = jax.tree_util.tree_map(jnp.add, state.params, mean)
  assert max_relative_error(new_state.params, expected) < 1e-5
  assert max_relative_error(new_state.params, state.params) > 1e-3


def test_stage_metrics_count_only_the_aggregated_clients(setup):
  # Every client that reports is clipped (a tiny bound); those that missed the deadline
  # sent zero updates, which counted as not clipped: clipped_fraction read fits / 4.
  train, model, profiles = setup
  cfg = systems.SystemsConfig(profiles, deadline_s=DEADLINE, stragglers="drop")
  algorithm = make(model, 4, systems=cfg,
                   aggregator=aggregators.chain(robust.norm_bound(1e-6), aggregators.mean()))
  _, _, m = one_round(algorithm, model.params, train)
  assert 0 < m["client_aggregated"].sum() < 4
  assert float(m["clipped_fraction"]) == 1.0


def test_over_selection_keeps_the_fastest(setup):
  train, model, profiles = setup
  cfg = systems.SystemsConfig(profiles, over_selection=2)
  algorithm = make(model, 2, systems=cfg)
  state, new_state, m = one_round(algorithm, model.params, train, seed=1)
  ids = m["client_ids"]
  # Same sampling helper: 2 + 2 over-selected are the 4 that fedavg would sample.
  np.testing.assert_array_equal(
      ids, sample_clients(round_keys(state.key)[1], 6, 4))
  fastest = np.argsort(FULL_S[ids])[:2]
  np.testing.assert_array_equal(np.flatnonzero(m["client_aggregated"]), np.sort(fastest))
  # No deadline to wait for: the round ends at the 2nd report.
  assert m["round_time_s"] == pytest.approx(np.sort(FULL_S[ids])[1], rel=1e-6)
  assert m["round_time_s"] == pytest.approx(m["client_seconds"][m["client_aggregated"]].max())
  expected = expected_params(model, train, state, ids, FULL[ids],
                             np.where(m["client_aggregated"], COUNTS[ids], 0))
  assert max_relative_error(new_state.params, expected) < 1e-5


def _partial_steps(ids):
  fit = np.clip(np.floor((DEADLINE - COMM_S) / STEP_S), 0, FULL)  # [2->1, 5, 1, 10->8, 0, 2]
  return np.where(FULL_S <= DEADLINE, FULL, fit)[ids].astype(int)


@pytest.mark.parametrize("variant", ["fused", "stacked_mean_chunked"])
def test_deadline_partial_runs_the_steps_that_fit(setup, variant):
  train, model, profiles = setup
  cfg = systems.SystemsConfig(profiles, deadline_s=DEADLINE, stragglers="partial")
  extra = {"fused": {},
           "stacked_mean_chunked": {"aggregator": aggregators.mean(), "client_chunk_size": 3},
           }[variant]
  algorithm = make(model, 6, systems=cfg, **extra)  # every client, so every case shows
  state, new_state, m = one_round(algorithm, model.params, train)
  ids = m["client_ids"]
  steps = _partial_steps(ids)
  np.testing.assert_array_equal(m["client_steps"], steps)
  np.testing.assert_array_equal(m["client_aggregated"], steps > 0)  # client 4 cannot contribute
  # A client that trained nothing measured no loss: NaN, not 0.
  np.testing.assert_array_equal(np.isnan(m["client_train_loss"]), steps == 0)
  assert m["num_stragglers"] == 3 and m["num_aggregated"] == 5
  seconds = COMM_S + steps * STEP_S[ids]
  np.testing.assert_allclose(m["client_seconds"], seconds, rtol=1e-5)
  # Client 4 never reports, so the server waits out the deadline.
  assert m["round_time_s"] == pytest.approx(DEADLINE)
  expected = expected_params(model, train, state, ids, steps,
                             np.where(steps > 0, COUNTS[ids], 0))
  assert max_relative_error(new_state.params, expected) < 1e-5


@pytest.mark.parametrize("policy, schedule", [("partial", {"epochs": 3}), ("drop", {"steps": 4}),
                                              ("partial", {"steps": 4})],
                         ids=["partial-epochs", "drop-steps", "partial-steps"])
def test_protocol_stragglers(setup, policy, schedule):
  train, model, profiles = setup
  cfg = systems.SystemsConfig(profiles, stragglers=policy, straggler_fraction=0.4)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1), clients_per_round=5,
                        batch_size=BATCH, systems=cfg, **schedule)
  _, history = fs.run(algorithm, algorithm.init(model.params, jax.random.key(0)), train,
                      rounds=8, rounds_per_chunk=8, progress=False)
  spe = -(-COUNTS // BATCH)
  reduced = 0
  for row in history:
    ids, steps = row["client_ids"], row["client_steps"]
    assert row["num_stragglers"] == 2  # round(0.4 * 5)
    full = spe[ids] * schedule["epochs"] if "epochs" in schedule else np.full(5, schedule["steps"])
    if policy == "drop":
      assert row["num_aggregated"] == 3
      np.testing.assert_array_equal(steps[row["client_aggregated"]],
                                    full[row["client_aggregated"]])
    else:
      assert row["num_aggregated"] == 5
      short = steps < full
      assert short.sum() <= 2
      reduced += short.sum()
      assert (steps >= 1).all() and (steps <= full).all()
      if "epochs" in schedule:  # whole epochs: e * ceil(n / B), e in 1..E
        np.testing.assert_array_equal(steps % spe[ids], 0)
  if policy == "partial":
    assert reduced > 0


@pytest.mark.parametrize("speed,counts,fits", [(5.0, [1, 3], 1), (10.0, [2, 3], 2),
                                                (40.0, [8, 10], 8)])
def test_partial_work_that_ends_exactly_at_the_deadline_fits(speed, counts, fits):
  # 0.3 s of latency + `fits` steps end at 0.5 s exactly: the client planned for that
  # much is on time, and one planned for more is given as many steps, not one fewer
  # ((0.5 - 0.3) / 0.2 = 0.99999994 in float32 gave 0 steps: not aggregated).
  profiles = systems.make_profiles(2, examples_per_s=speed, downlink_bytes_per_s=1e6,
                                   uplink_bytes_per_s=1e6, latency_s=0.3)
  cfg = systems.SystemsConfig(profiles, deadline_s=0.5, stragglers="partial")
  plan = jax.device_get(jax.jit(lambda c: systems.plan_round(
      cfg, jnp.arange(2), c, jax.random.key(0), clients_per_round=2, batch_size=1, epochs=1,
      steps=None, downlink_bytes=0.0, uplink_bytes=0.0))(jnp.asarray(counts, jnp.int32)))
  np.testing.assert_array_equal(plan.step_budget, [fits, fits])
  np.testing.assert_array_equal(plan.aggregated, [True, True])
  assert plan.seconds.max() <= np.float32(0.5) and plan.round_time <= np.float32(0.5)


def test_steps_that_cost_two_trainings_and_steps_beside_the_budget_are_timed():
  # 0.25 s a step, 0.5 s latency, 4 steps planned; each budgeted step trains twice (Ditto)
  # and client 1 trains 2 steps besides (FedRep's head): 0.5 + 4 x 0.5 = 2.5 s and
  # 0.5 + 2 x 0.25 + 4 x 0.5 = 3 s. A 2 s deadline leaves them 3 and 2 steps.
  profiles = systems.make_profiles(2, examples_per_s=4.0, downlink_bytes_per_s=1e6,
                                   uplink_bytes_per_s=1e6, latency_s=0.5)

  def plan(deadline):
    cfg = systems.SystemsConfig(profiles, deadline_s=deadline, stragglers="partial")
    return jax.device_get(systems.plan_round(
        cfg, jnp.arange(2), jnp.asarray([4, 4]), jax.random.key(0), clients_per_round=2,
        batch_size=1, epochs=1, steps=None, downlink_bytes=0.0, uplink_bytes=0.0,
        trainings_per_step=2, unbudgeted_steps=jnp.asarray([0, 2])))

  np.testing.assert_allclose(plan(None).seconds, [2.5, 3.0])
  np.testing.assert_array_equal(plan(None).step_budget, [4, 4])
  np.testing.assert_array_equal(plan(2.0).step_budget, [3, 2])
  np.testing.assert_allclose(plan(2.0).seconds, [2.0, 2.0])


def test_a_client_that_cannot_contribute_reports_its_own_time():
  # 3 s of latency against a 2 s deadline: no step fits; under 'partial' it was reported
  # at the deadline, under 'drop' at its full time. Its own time is 3 s (no step tried)
  # under 'partial', 3 + 2 x 0.25 = 3.5 s under 'drop'; client 0 (0.5 s) is on time.
  profiles = systems.make_profiles(2, examples_per_s=4.0, downlink_bytes_per_s=1e6,
                                   uplink_bytes_per_s=1e6, latency_s=np.array([0.0, 3.0]))
  for policy, late_seconds in (("partial", 3.0), ("drop", 3.5)):
    cfg = systems.SystemsConfig(profiles, deadline_s=2.0, stragglers=policy)
    plan = jax.device_get(systems.plan_round(
        cfg, jnp.arange(2), jnp.asarray([2, 2]), jax.random.key(0), clients_per_round=2,
        batch_size=1, epochs=1, steps=None, downlink_bytes=0.0, uplink_bytes=0.0))
    np.testing.assert_allclose(plan.seconds, [0.5, late_seconds])
    np.testing.assert_array_equal(plan.aggregated, [True, False])


def test_a_round_refuses_profiles_of_other_clients(setup):
  # validate checks it, but a round jitted directly on other data read clamped ids:
  # another client's profile.
  train, model, profiles = setup
  other = systems.make_profiles(4, examples_per_s=1.0, downlink_bytes_per_s=1.0,
                                uplink_bytes_per_s=1.0)
  algorithm = make(model, 2, systems=systems.SystemsConfig(other))
  state = algorithm.init(model.params, jax.random.key(0))
  match = f"the profiles describe 4 clients but the data has {train.num_clients}"
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(algorithm.round, state, train)
  buffered = fs.fedbuff(model.apply, client_optimizer=optax.sgd(0.1), profiles=other,
                        concurrency=2, buffer_size=1, batch_size=4, epochs=1)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(buffered.round, buffered.init(model.params, jax.random.key(0)), train)


def test_plan_round_draws():
  """Distributions of the draws, over one large round of the plan alone (no training)."""
  num = 2000
  profiles = systems.make_profiles(num, examples_per_s=1.0, downlink_bytes_per_s=1.0,
                                   uplink_bytes_per_s=1.0, availability=0.6)
  cfg = systems.SystemsConfig(profiles, dropout=0.5, straggler_fraction=0.3, stragglers="partial")
  plan = jax.device_get(jax.jit(lambda k: systems.plan_round(
      cfg, jnp.arange(num), jnp.full((num,), 20), k, clients_per_round=num, batch_size=5,
      epochs=4, steps=None, downlink_bytes=1.0, uplink_bytes=1.0))(jax.random.key(0)))
  # each responds with probability 0.6 * (1 - 0.5); all who respond are aggregated
  assert abs(plan.responded.mean() - 0.3) < 0.03
  np.testing.assert_array_equal(plan.aggregated, plan.responded)
  # exactly round(0.3 * 2000) protocol stragglers, each doing e of 4 epochs, e uniform
  epochs = np.asarray(plan.seconds - 2.0) / 5 / 4  # 2 s of communication, 5 s per step
  np.testing.assert_allclose(epochs, np.round(epochs), atol=1e-3)
  counts = np.bincount(np.round(epochs).astype(int), minlength=5)
  assert counts[0] == 0
  for e in (1, 2, 3):  # 600 stragglers draw e uniformly in 1..4: about 150 each
    assert abs(counts[e] - 150) < 45
  np.testing.assert_array_equal(plan.step_budget, np.where(plan.responded, epochs * 4, 0))
  # the stragglers reported are the responding ones, every short one among them
  assert not (plan.straggler & ~plan.responded).any()
  assert (plan.straggler[(epochs < 4) & plan.responded]).all()
  assert abs(plan.straggler.sum() / plan.responded.sum() - 0.3) < 0.05


def test_noop_systems_equal_plain_fedavg(setup):
  train, model, profiles = setup
  _, plain, plain_metrics = one_round(make(model, 4), model.params, train, seed=2)
  for policy in ("drop", "partial"):
    algorithm = make(model, 4, systems=systems.SystemsConfig(profiles, stragglers=policy))
    _, state, m = one_round(algorithm, model.params, train, seed=2)
    assert max_relative_error(state.params, plain.params) < 1e-6
    np.testing.assert_array_equal(m["client_ids"], plain_metrics["client_ids"])
    assert m["num_aggregated"] == 4
    assert float(state.sim_time) == pytest.approx(FULL_S[m["client_ids"]].max(), rel=1e-5)


def test_everyone_dropped_gives_a_zero_update(setup):
  train, model, _ = setup
  gone = systems.make_profiles(6, examples_per_s=1.0, downlink_bytes_per_s=1.0,
                               uplink_bytes_per_s=1.0, availability=0.0)
  algorithm = make(model, 3, systems=systems.SystemsConfig(gone, deadline_s=9.0),
                   server_optimizer=optax.adam(0.1))
  state, new_state, m = one_round(algorithm, model.params, train)
  assert m["num_aggregated"] == 0 and m["num_dropped"] == 3
  # No loss was measured: NaN (a 0 plotted as a perfect round).
  assert m["round_time_s"] == 9.0 and np.isnan(m["train_loss"])
  for leaf in jax.tree_util.tree_leaves(new_state.params):
    assert np.isfinite(np.asarray(leaf)).all()
  assert max_relative_error(new_state.params, state.params) == 0.0
  # fs.run does not take that NaN for a divergence; the rounds are all written.
  _, history = fs.run(algorithm, state, train, rounds=2, progress=False)
  assert [r["round"] for r in history] == [1, 2]
  assert all(np.isnan(r["train_loss"]) for r in history)
  result = fs.sweep(lambda hp: algorithm, model.params, train, grid={"seed_only": [0]},
                    rounds=2)
  assert result.rows[0]["diverged"] is False


@pytest.mark.parametrize("server_optimizer", [optax.sgd(1.0, momentum=0.9), optax.adam(0.1)])
def test_a_round_nobody_reports_moves_neither_model_nor_server_optimizer(setup,
                                                                         server_optimizer):
  # After a round that trained, momentum (and Adam's moments) would move the model on a
  # zero pseudo-gradient: a round with nobody aggregated must leave state as it was.
  train, model, profiles = setup
  gone = systems.make_profiles(6, examples_per_s=1.0, downlink_bytes_per_s=1.0,
                               uplink_bytes_per_s=1.0, availability=0.0)
  trains = make(model, 3, systems=systems.SystemsConfig(profiles),
                server_optimizer=server_optimizer)
  nobody = make(model, 3, systems=systems.SystemsConfig(gone, deadline_s=9.0),
                server_optimizer=server_optimizer)
  _, state, _ = one_round(trains, model.params, train)
  new_state, m = jax.jit(nobody.round)(state, train)
  assert m["num_aggregated"] == 0
  for new, old in zip(jax.tree_util.tree_leaves((new_state.params, new_state.opt_state)),
                      jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(new, old)
  # and the next round that trains moves the model again
  after, m = jax.jit(trains.round)(new_state, train)
  assert m["num_aggregated"] > 0 and max_relative_error(after.params, new_state.params) > 0


def test_compressed_upload_time(setup):
  train, model, profiles = setup
  agg = aggregators.chain(compression.quantize(4), aggregators.mean())
  d = 5 * 3 + 3
  assert compression.uplink_bytes_per_client(agg, d) == (4 * d + 64) / 8
  assert compression.uplink_bytes_per_client(aggregators.mean(), d) is None
  assert compression.uplink_bytes_per_client(
      aggregators.chain(compression.top_k(3, error_feedback=False), aggregators.mean()), d) == 24
  algorithm = make(model, 3, systems=systems.SystemsConfig(profiles), aggregator=agg)
  _, _, m = one_round(algorithm, model.params, train)
  ids = m["client_ids"]
  up = (4 * d + 64) / 8 / MODEL_BYTES  # seconds at MODEL_BYTES / s
  np.testing.assert_allclose(m["client_seconds"], 1.0 + up + FULL[ids] * STEP_S[ids], rtol=1e-5)
  assert m["uplink_bytes"] == pytest.approx(3 * (4 * d + 64) / 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(deadline_s=0.0), "deadline_s must be a number > 0"),
    (dict(deadline_s=-1), "got -1"),
    (dict(deadline_s=1e39), "that float32 holds .* got 1e\\+39"),  # inf on the device
    (dict(over_selection=-1), "over_selection must be an integer >= 0, got -1"),
    (dict(stragglers="wait"), "stragglers must be 'drop' or 'partial', got 'wait'"),
    (dict(dropout=1.0), "dropout must lie in \\[0, 1\\), got 1.0"),
    (dict(straggler_fraction=1.5), "straggler_fraction must lie in \\[0, 1\\], got 1.5"),
])
def test_bad_config(setup, kwargs, message):
  with pytest.raises(ValueError, match=message):
    systems.SystemsConfig(setup[2], **kwargs)


def test_bad_setups_fail_before_compiling(setup):
  train, model, profiles = setup
  too_many = make(model, 5, systems=systems.SystemsConfig(profiles, over_selection=2))
  with pytest.raises(ValueError, match="5 \\+ 2 = 7 but the data has only 6 clients"):
    fs.run(too_many, too_many.init(model.params, jax.random.key(0)), train, rounds=1)
  wrong = make(model, 2, systems=systems.SystemsConfig(systems.sample_profiles(7)))
  with pytest.raises(ValueError, match="7 clients but the data has 6"):
    fs.run(wrong, wrong.init(model.params, jax.random.key(0)), train, rounds=1)
  with pytest.raises(ValueError, match="reducer must be the weighted mean|weighted mean"):
    make(model, 2, systems=systems.SystemsConfig(profiles), aggregator=robust.coordinate_median())
  feedback = make(model, 2, systems=systems.SystemsConfig(profiles),
                  aggregator=aggregators.chain(compression.top_k(2), aggregators.mean()))
  with pytest.raises(ValueError, match="per-client transforms that keep state"):
    feedback.init(model.params, jax.random.key(0), num_clients=6)
  with pytest.raises(ValueError, match="clients_per_round \\+ over_selection=3"):
    make(model, 2, systems=systems.SystemsConfig(profiles, over_selection=1), client_chunk_size=2)
