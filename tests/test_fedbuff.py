"""FedBuff (asynchronous buffered aggregation by event time): equal to FedAvg when the
buffer is the whole cohort and every client is equally fast; event order, staleness
weights and parameters equal to a numpy replay on quadratic clients; the invariants
of random dispatch (earliest arrivals, no client in flight twice); bad configuration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, algorithms, compression, systems
from conftest import max_relative_error, ragged_clients, tiny_mlp


@pytest.fixture(scope="module")
def uneven():
  xs, ys = ragged_clients(sizes=(8, 1, 8, 4, 12, 4))
  return fs.from_clients(xs, ys, num_classes=3)


def equal_profiles(num_clients):
  return systems.make_profiles(num_clients, examples_per_s=100.0, downlink_bytes_per_s=1e6,
                               uplink_bytes_per_s=1e6, latency_s=0.01)


def test_full_buffer_on_equally_fast_clients_is_fedavg(uneven):
  # Fixed local steps make every client equally fast: the whole cohort arrives at once, so
  # each update is a FedAvg round (same ids, keys, deltas) and no update is stale.
  apply, params = tiny_mlp()
  common = dict(client_optimizer=optax.sgd(0.3), batch_size=4, steps=2)
  fedbuff = algorithms.fedbuff(apply, profiles=equal_profiles(6), concurrency=3, buffer_size=3,
                               **common)
  fedavg = algorithms.fedavg(apply, clients_per_round=3, **common)
  key = jax.random.key(3)
  state, sync_state = fedbuff.init(params, key), fedavg.init(params, key)
  fedbuff.validate(state, uneven)
  step, sync_step = jax.jit(fedbuff.round), jax.jit(fedavg.round)
  nbytes = 4 * (5 * 8 + 8 + 8 * 3 + 3)
  seconds = 0.01 + 2 * nbytes / 1e6 + 2 * 4 / 100.0
  for r in range(3):
    state, metrics = step(state, uneven)
    sync_state, sync_metrics = sync_step(sync_state, uneven)
    np.testing.assert_array_equal(metrics["client_ids"], sync_metrics["client_ids"])
    assert float(metrics["train_loss"]) == pytest.approx(float(sync_metrics["train_loss"]),
                                                         rel=1e-6)
    np.testing.assert_array_equal(metrics["client_staleness"], 0)
    assert float(metrics["sim_time_s"]) == pytest.approx((r + 1) * seconds, rel=1e-5)
    assert float(metrics["round_time_s"]) == pytest.approx(seconds, rel=1e-4)
  assert max_relative_error(state.params, sync_state.params) < 1e-5
  assert int(state.round) == 3
  # The next cohort is fedavg's next one, holding the updated model.
  np.testing.assert_array_equal(np.asarray(state.algorithm_state.versions), 3)
  assert float(optax.tree.norm(optax.tree.sub(state.params, params))) > 0.1


# --- Quadratic clients with deterministic local training ------------------------------------
# f_i(w) = 1/2 sum_j a_ij (w_j - b_ij)^2, every example of client i carrying (a_i, b_i): any
# minibatch gives the full gradient, so K local SGD steps of lr give b + (1 - lr a)^K (w - b).

DIM = 2
CURVATURE = np.array([[1.0, 0.2], [0.2, 1.0], [2.0, 0.5], [0.5, 2.0]])
TARGET = np.array([[1.0, -1.0], [-1.0, 2.0], [3.0, 0.0], [0.0, -3.0]])


def quadratic_loss(params, x, y):
  del y
  a, b = x[:, :DIM], x[:, DIM:]
  return 0.5 * jnp.sum(a * (params["w"] - b) ** 2, axis=1)


def quadratic_clients(sizes):
  xs = [np.tile(np.concatenate([a, b]), (n, 1)).astype(np.float32)
        for a, b, n in zip(CURVATURE, TARGET, sizes)]
  return fs.from_clients(xs, [np.zeros(n, np.int32) for n in sizes])


def replay(slot_ids, seconds, sizes, rounds, buffer_size, lr, steps, weight_of):
  """FedBuff by hand, event by event, when every client is in flight: an arriving client
  is the only one free, so it is dispatched again at once with the current model."""
  slot_ids, sizes = np.asarray(slot_ids), np.asarray(sizes, float)
  w, version = np.zeros(DIM), 0
  start = np.zeros(len(slot_ids))
  downloaded = [w.copy() for _ in slot_ids]
  versions = np.zeros(len(slot_ids), int)
  out = []
  for _ in range(rounds):
    arrivals, refilled = [], []
    while len(arrivals) < buffer_size:
      finish = start + seconds[slot_ids]
      j = int(np.argmin(finish))  # ties: the lower slot
      arrivals.append((slot_ids[j], downloaded[j], versions[j], finish[j]))
      start[j], downloaded[j], versions[j] = finish[j], w.copy(), version
      refilled.append(j)
    ids = np.array([c for c, *_ in arrivals])
    tau = np.array([version - v for _, _, v, _ in arrivals])
    update_time = arrivals[-1][3]
    total = np.zeros(DIM)
    for (c, x, _, _), s in zip(arrivals, weight_of(tau.astype(float))):
      trained = TARGET[c] + (1 - lr * CURVATURE[c]) ** steps * (x - TARGET[c])
      total += sizes[c] * s * (trained - x)
    w = w + total / sizes[ids].sum()
    for j in refilled:  # dispatched at the update: they get the new model
      if start[j] == update_time:
        downloaded[j], versions[j] = w.copy(), version + 1
    version += 1
    out.append(dict(ids=ids, tau=tau, times=np.array([t for *_, t in arrivals]), w=w.copy()))
  return out


@pytest.mark.parametrize("staleness, weight_of", [
    ("polynomial", lambda tau: 1 / np.sqrt(1 + tau)),
    (lambda tau: 0.5 ** tau, lambda tau: 0.5 ** tau),
], ids=["polynomial", "callable"])
def test_event_order_staleness_and_updates_match_a_hand_replay(staleness, weight_of):
  # Model bytes 8 (two float32) at 8 B/s: 1 s down, 1 s up; 2 steps of 2 examples at
  # 4, 2, 1, 0.5 examples/s: clients take 3, 4, 6 and 10 s, exactly in float32. Client 0
  # comes back twice within an update (dispatched before it, it downloads the old model),
  # client 3 arrives stale, and arrivals tie (at 6, 12...), broken by slot.
  sizes, lr, steps, buffer_size, rounds = [2, 4, 2, 6], 0.1, 2, 3, 8
  profiles = systems.make_profiles(4, examples_per_s=[4.0, 2.0, 1.0, 0.5],
                                   downlink_bytes_per_s=8.0, uplink_bytes_per_s=8.0)
  algorithm = algorithms.fedbuff(
      lambda p, x: jnp.zeros((x.shape[0], 1)), client_optimizer=optax.sgd(lr), profiles=profiles,
      concurrency=4, buffer_size=buffer_size, batch_size=2, steps=steps, staleness=staleness,
      loss=quadratic_loss)
  data = quadratic_clients(sizes)
  state = algorithm.init({"w": jnp.zeros(DIM)}, jax.random.key(0))
  expected = replay(np.asarray(state.algorithm_state.client_ids), np.array([3.0, 4.0, 6.0, 10.0]),
                    sizes, rounds, buffer_size, lr, steps, weight_of)
  step = jax.jit(algorithm.round)
  for want in expected:
    state, metrics = step(state, data)
    np.testing.assert_array_equal(metrics["client_ids"], want["ids"])
    np.testing.assert_array_equal(metrics["client_staleness"], want["tau"])
    np.testing.assert_array_equal(metrics["client_arrival_s"], want["times"])
    assert float(state.sim_time) == want["times"][-1]
    np.testing.assert_allclose(np.asarray(state.params["w"]), want["w"], rtol=1e-5, atol=1e-6)
  # Round 0 by hand: client 0 at 3 s, client 1 at 4 s, then client 0 again or client 2 at 6 s.
  np.testing.assert_array_equal(expected[0]["times"], [3.0, 4.0, 6.0])
  assert any(len(set(e["ids"])) < buffer_size for e in expected)  # a client came back twice
  assert max(e["tau"].max() for e in expected) >= 2
  assert np.abs(expected[-1]["w"]).max() > 0.5  # the model moved


def test_random_dispatch_takes_the_earliest_arrivals_and_never_doubles_a_client(
    uneven, count_compiles, tmp_path):
  # Heterogeneous speeds and ragged data (epochs): finish times all differ. Per update:
  # every in-flight client finishing before T is aggregated, none finishing after it is,
  # refilled slots start at an arrival with the model current then, and the clients in
  # flight are always distinct. Runs through the runner, one round per call.
  apply, params = tiny_mlp()
  profiles = systems.sample_profiles(6, seed=1)
  concurrency, buffer_size, batch_size = 4, 2, 4
  algorithm = algorithms.fedbuff(apply, client_optimizer=optax.sgd(0.1), profiles=profiles,
                                 concurrency=concurrency, buffer_size=buffer_size,
                                 batch_size=batch_size, epochs=1, weighting="uniform")
  state = algorithm.init(params, jax.random.key(1), num_clients=6)
  nbytes = 4 * (5 * 8 + 8 + 8 * 3 + 3)
  p = {k: np.asarray(v, np.float64) for k, v in profiles._asdict().items()}
  steps = np.ceil(np.asarray(uneven.counts) / batch_size)
  seconds = (p["latency_s"] + nbytes / p["downlink_bytes_per_s"]
             + steps * batch_size / p["examples_per_s"] + nbytes / p["uplink_bytes_per_s"])
  previous_time, stale, path = 0.0, 0, tmp_path / "metrics.jsonl"
  seen = {"arrived": 0, "in flight": 0}
  for r in range(8):
    if r == 2:
      compiles = count_compiles()
    before = jax.device_get(state.algorithm_state)
    state, history = fs.run(algorithm, state, uneven, rounds=1, rounds_per_chunk=1,
                            progress=False, metrics_path=path)
    row, after = history[0], jax.device_get(state.algorithm_state)
    times, ids, tau = row["client_arrival_s"], row["client_ids"], row["client_staleness"]
    update_time = row["sim_time_s"]
    assert row["round"] == r + 1 and int(state.round) == r + 1
    assert len(ids) == buffer_size and np.all(np.diff(times) >= 0)
    assert update_time == times[-1] == float(state.sim_time) >= previous_time
    assert row["round_time_s"] == pytest.approx(update_time - previous_time, rel=1e-5, abs=1e-6)
    assert row["staleness_max"] == tau.max() and row["staleness_mean"] == pytest.approx(tau.mean())
    finish = before.start_s + seconds[before.client_ids]
    tol = 1e-5 * update_time
    for s in range(concurrency):
      client = before.client_ids[s]
      if finish[s] < update_time - tol:  # arrived: aggregated, with its staleness
        (k,) = np.flatnonzero((ids == client) & np.isclose(times, finish[s], rtol=1e-5))
        assert tau[k] == r - before.versions[s]
        seen["arrived"] += 1
      elif finish[s] > update_time + tol:  # still in flight: untouched
        assert client not in ids
        assert (after.client_ids[s], after.versions[s], after.start_s[s]) == (
            client, before.versions[s], before.start_s[s])
        seen["in flight"] += 1
      if after.start_s[s] != before.start_s[s]:  # refilled at an arrival, with its model
        assert after.start_s[s] in times
        assert after.versions[s] == (r + 1 if after.start_s[s] == update_time else r)
    assert len(set(after.client_ids.tolist())) == concurrency
    previous_time, stale = update_time, max(stale, int(tau.max()))
  assert stale > 0 and min(seen.values()) >= 4, seen
  assert count_compiles() == compiles  # one compiled round, reused
  line = json.loads(path.read_text().splitlines()[-1])
  assert line["round"] == 8 and line["sim_time_s"] == pytest.approx(previous_time)
  assert "staleness_mean" in line and "client_ids" not in line


def test_bad_configuration_is_rejected_before_compiling(uneven, count_compiles):
  apply, params = tiny_mlp()
  six = equal_profiles(6)
  kwargs = dict(client_optimizer=optax.sgd(0.1), batch_size=4, steps=1)
  with pytest.raises(ValueError, match="buffer_size=4 is larger than concurrency=3"):
    algorithms.fedbuff(apply, profiles=six, concurrency=3, buffer_size=4, **kwargs)
  with pytest.raises(ValueError, match="concurrency=7 but the profiles describe only 6"):
    algorithms.fedbuff(apply, profiles=six, concurrency=7, buffer_size=2, **kwargs)
  with pytest.raises(ValueError, match="concurrency must be a positive integer"):
    algorithms.fedbuff(apply, profiles=six, concurrency=0, buffer_size=1, **kwargs)
  # numpy integers are integers (buffer_size np.int64(2) was refused as clients_per_round)
  algorithms.fedbuff(apply, profiles=six, concurrency=np.int64(3), buffer_size=np.int64(2),
                     **kwargs)
  with pytest.raises(ValueError, match="staleness must be"):
    algorithms.fedbuff(apply, profiles=six, concurrency=3, buffer_size=2, staleness="linear",
                       **kwargs)
  with pytest.raises(ValueError, match="staleness callable must map"):
    algorithms.fedbuff(apply, profiles=six, concurrency=3, buffer_size=2,
                       staleness=lambda tau: tau.sum(), **kwargs)
  with pytest.raises(ValueError, match="profiles must be a systems.ClientProfiles"):
    algorithms.fedbuff(apply, profiles=None, concurrency=3, buffer_size=2, **kwargs)
  five = algorithms.fedbuff(apply, profiles=equal_profiles(5), concurrency=3, buffer_size=2,
                            **kwargs)
  with pytest.raises(ValueError, match="num_clients=6 but the profiles describe 5"):
    five.init(params, jax.random.key(0), num_clients=6)
  state = five.init(params, jax.random.key(0))
  start = count_compiles()
  with pytest.raises(ValueError, match="the profiles describe 5 clients but the data has 6"):
    fs.run(five, state, uneven, rounds=1, progress=False)
  fedbuff = algorithms.fedbuff(apply, profiles=six, concurrency=3, buffer_size=2, **kwargs)
  with pytest.raises(ValueError, match="not made by this fedbuff's init"):
    fedbuff.validate(fs.fedavg(apply, clients_per_round=2, **kwargs).init(params, jax.random.key(0)),
                     uneven)
  assert count_compiles() == start


def test_stages_that_need_each_client_once_are_refused():
  # A fast client can arrive twice before the buffer fills (random dispatch's test above
  # sees it): DP's sensitivity and accountant, secure aggregation's masks by id, and
  # top-k's per-client residuals all assume it cannot.
  from fedjax_sim import aggregators, compression, privacy, robust, secure_aggregation
  apply, params = tiny_mlp()
  kwargs = dict(client_optimizer=optax.sgd(0.1), batch_size=4, steps=1,
                profiles=equal_profiles(6), concurrency=3, buffer_size=2)
  for reducer, name in ((privacy.dp_mean(0.5, 1.0), "dp_mean"),
                        (secure_aggregation.secure_mean(), "secure_mean")):
    for aggregator in (reducer, aggregators.chain(compression.quantize(8), reducer)):
      with pytest.raises(ValueError, match=f"fedbuff cannot aggregate with {name}"):
        algorithms.fedbuff(apply, aggregator=aggregator, **kwargs)
  stateful = algorithms.fedbuff(
      apply, aggregator=aggregators.chain(compression.top_k(3), aggregators.mean()), **kwargs)
  with pytest.raises(ValueError, match="per-client transforms that keep state"):
    stateful.init(params, jax.random.key(0))
  # what stays allowed: stateless compression, robust reducers, top-k without feedback
  for aggregator in (aggregators.chain(compression.top_k(3, error_feedback=False),
                                       compression.quantize(8), aggregators.mean()),
                     robust.coordinate_median()):
    algorithms.fedbuff(apply, aggregator=aggregator, **kwargs).init(params, jax.random.key(0))


def test_fedbuff_builds_by_name():
  apply, params = tiny_mlp()
  kwargs = dict(clients_per_round=2, batch_size=4, epochs=1)
  algorithm = algorithms.build_algorithm("fedbuff", apply, concurrency=3, num_clients=6,
                                         server_optimizer="fedadam", server_lr=0.01, **kwargs)
  state = algorithm.init(params, jax.random.key(0), 6)
  assert state.algorithm_state.client_ids.shape == (3,) and int(state.round) == 0
  assert "fedbuff" in algorithms.ASYNC and "fedbuff" not in algorithms.ALGORITHMS
  with pytest.raises(ValueError, match="give profiles= or num_clients="):
    algorithms.build_algorithm("fedbuff", apply, **kwargs)
  with pytest.raises(ValueError, match="fedbuff takes no systems"):
    algorithms.build_algorithm("fedbuff", apply, num_clients=6, systems=fs.systems.SystemsConfig(
        fs.systems.sample_profiles(6, seed=0), deadline_s=1.0), **kwargs)
  robust = algorithms.build_algorithm(
      "fedbuff", apply, num_clients=6, aggregator=fs.aggregators.chain(
          fs.robust.coordinate_median()), **kwargs)
  assert robust.init(params, jax.random.key(0), 6).aggregator_state is not None


def test_arrival_times_count_the_compressed_upload():
  # 72 bytes of logistic regression each way at 72 bytes/s, 2 steps of 2 examples; a
  # 4-bit quantizer sends 17 bytes up: the first arrival 1 + 1 + 17/72 s (it was 3 s,
  # the update's full bytes, while the round reported 17 bytes uplinked).
  rng = np.random.default_rng(0)
  data = fs.from_clients([rng.normal(size=(4, 5)).astype(np.float32) for _ in range(4)],
                         [rng.integers(0, 3, 4).astype(np.int32) for _ in range(4)],
                         num_classes=3)
  model = fs.logistic_regression(5, 3, seed=0)
  profiles = systems.make_profiles(4, examples_per_s=[4.0, 2.0, 1.0, 0.5],
                                   downlink_bytes_per_s=72.0, uplink_bytes_per_s=72.0)
  quantized = aggregators.chain(compression.quantize(4), aggregators.mean())
  up = compression.uplink_bytes_per_client(quantized, 18)
  assert up == 17
  algorithm = algorithms.fedbuff(model.apply, client_optimizer=optax.sgd(0.1), profiles=profiles,
                                 concurrency=2, buffer_size=1, batch_size=2, steps=2,
                                 aggregator=quantized)
  state = algorithm.init(model.params, jax.random.key(0))
  ids = np.asarray(state.algorithm_state.client_ids)
  _, m = jax.jit(algorithm.round)(state, data)
  train_s = 4 / np.array([4.0, 2.0, 1.0, 0.5])
  assert float(m["client_arrival_s"][0]) == pytest.approx(np.min(1 + train_s[ids] + up / 72),
                                                          rel=1e-6)
