"""FedProx, SCAFFOLD, FedNova, FedDyn, MimeLite, Ditto and q-FFL: each against its loop
reference on the same keys, and each against its defining behaviour on a problem whose
answer is known in closed form (heterogeneous quadratic clients) or by construction."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms, evaluation
from fedjax_sim import reference_algorithms as ref
from conftest import max_relative_error, ragged_clients, tiny_mlp


def run_rounds(algorithm, state, data, rounds):
  """`rounds` rounds of the jitted round function (one compile; cheaper than the runner's
  scan over rounds, which other tests cover); returns (state, per-round metrics)."""
  algorithm.validate(state, data)
  step, history = jax.jit(algorithm.round), []
  for _ in range(rounds):
    state, metrics = step(state, data)
    history.append(jax.device_get(metrics))
  return state, history


# --- Agreement with the loop references --------------------------------------------------


# Epochs over ragged clients give unequal local step counts (SCAFFOLD's K_i, FedNova's tau_i);
# every case weights by examples, so padding and weights are exercised too. Some vectorized
# runs train 2 clients at a time (`client_chunk_size`, which the loop has no use for).
CASES = {
    "fedprox": (algorithms.fedprox, ref.ReferenceFedProx,
                dict(mu=0.5, client_optimizer=optax.sgd(0.3), steps=3), {}),
    "scaffold": (algorithms.scaffold, ref.ReferenceScaffold,
                 dict(client_learning_rate=0.3, epochs=1), dict(client_chunk_size=2)),
    "fednova": (algorithms.fednova, ref.ReferenceFedNova,
                dict(client_learning_rate=0.3, momentum=0.5, epochs=1), {}),
    "feddyn": (algorithms.feddyn, ref.ReferenceFedDyn,
               dict(alpha=0.1, client_optimizer=optax.sgd(0.3), steps=3), {}),
    "mimelite": (algorithms.mimelite, ref.ReferenceMimeLite,
                 dict(client_learning_rate=0.3, momentum=0.5, steps=3), dict(client_chunk_size=2)),
    "ditto": (algorithms.ditto, ref.ReferenceDitto,
              dict(lam=0.5, client_optimizer=optax.sgd(0.3), steps=3), dict(client_chunk_size=2)),
    "qffl": (algorithms.qffl, ref.ReferenceQFFL,
             dict(q=2.0, client_learning_rate=0.3, epochs=1), {}),
}


@pytest.fixture(scope="module")
def uneven():
  """Ragged clients (a one-example client, unequal step counts per epoch) whose batches of 4
  come in two shapes only, so that the loop's per-shape compiles stay few."""
  xs, ys = ragged_clients(sizes=(8, 1, 8, 4, 12, 4))
  return fs.from_clients(xs, ys, num_classes=3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorized_equals_loop_reference(uneven, name):
  train = uneven
  apply, params = tiny_mlp()
  factory, reference_class, kwargs, chunking = CASES[name]
  kwargs = dict(clients_per_round=4, batch_size=4, **kwargs)
  algorithm, reference = factory(apply, **kwargs, **chunking), reference_class(apply, **kwargs)
  key, rounds = jax.random.key(3), 3
  state = algorithm.init(params, key, train.num_clients)
  state, history = run_rounds(algorithm, state, train, rounds)
  stateful = name in algorithms.registry.STATEFUL
  ref_state = (reference.init(params, key, train.num_clients) if stateful
               else reference.init(params, key))
  ref_state, ref_history = reference.run(ref_state, train, rounds)

  assert max_relative_error(state.params, ref_state.params) < 1e-5
  if stateful:
    assert max_relative_error(state.client_states, ref.stacked(ref_state)) < 1e-5
  if name in ("scaffold", "feddyn", "mimelite"):  # c, h, m
    assert max_relative_error(state.algorithm_state, ref_state.algorithm_state) < 1e-5
  for row, ref_row in zip(history, ref_history):
    np.testing.assert_array_equal(row["client_ids"], ref_row["client_ids"])
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-5)
  # The model really moved (so the comparison is not vacuous), and so did the state.
  assert float(optax.tree.norm(optax.tree.sub(state.params, params))) > 0.1
  if stateful:
    assert float(optax.tree.norm(state.client_states)) > 0.1


# --- Heterogeneous quadratic clients -------------------------------------------------------
# Client i's objective is f_i(w) = 1/2 sum_j a_ij (w_j - b_ij)^2: every example of client i
# carries (a_i, b_i) as its features, so any minibatch gives the full gradient and local
# SGD is deterministic. Everything below then has a closed form, coordinate by coordinate.

DIM = 2
CURVATURE = np.array([[1.0, 0.2], [0.2, 1.0], [2.0, 0.5], [0.5, 2.0]])
TARGET = np.array([[1.0, -1.0], [-1.0, 2.0], [3.0, 0.0], [0.0, -3.0]])
START = {"w": jnp.zeros(DIM)}


def quadratic_apply(params, x):
  del params
  return jnp.zeros((x.shape[0], 1))  # one "class": the labels are unused zeros


def quadratic_loss(params, x, y):
  del y
  a, b = x[:, :DIM], x[:, DIM:]
  return 0.5 * jnp.sum(a * (params["w"] - b) ** 2, axis=1)


def quadratic_clients(curvature, target, sizes):
  xs = [np.tile(np.concatenate([a, b]), (n, 1)).astype(np.float32)
        for a, b, n in zip(curvature, target, sizes)]
  return fs.from_clients(xs, [np.zeros(n, np.int32) for n in sizes])


def minimizer(weights, curvature, target):
  """argmin_w sum_i weights_i f_i(w), or a fixed point with 'curvatures' M_i."""
  weights = np.asarray(weights, np.float64).reshape(-1, 1) * curvature
  return (weights * target).sum(0) / weights.sum(0)


def run_to_end(algorithm, data, rounds, num_clients=None):
  state = algorithm.init(START, jax.random.key(0), num_clients)
  state, _ = run_rounds(algorithm, state, data, rounds)
  return np.asarray(state.params["w"], np.float64)


def test_scaffold_and_feddyn_reach_the_minimizer_where_fedavg_is_biased():
  # Equal sizes, 20 local steps of lr 0.1, all clients every round. FedAvg's fixed point
  # solves sum_i (1 - (1 - lr a_i)^K) (b_i - x) = 0, not sum_i a_i (b_i - x) = 0.
  data = quadratic_clients(CURVATURE, TARGET, [2] * 4)
  lr, k = 0.1, 20
  common = dict(clients_per_round=4, batch_size=2, steps=k, loss=quadratic_loss)
  optimum = minimizer(np.ones(4), CURVATURE, TARGET)
  fedavg_point = minimizer(np.ones(4), 1 - (1 - lr * CURVATURE) ** k, TARGET)

  fedavg = run_to_end(algorithms.fedavg(quadratic_apply, client_optimizer=optax.sgd(lr),
                                        **common), data, 60)
  scaffold = run_to_end(algorithms.scaffold(quadratic_apply, client_learning_rate=lr, **common),
                        data, 60, 4)
  feddyn = run_to_end(algorithms.feddyn(quadratic_apply, alpha=0.5,
                                        client_optimizer=optax.sgd(lr), **common), data, 60, 4)
  assert np.abs(fedavg_point - optimum).max() > 0.5  # the bias is large
  np.testing.assert_allclose(fedavg, fedavg_point, atol=1e-5)
  np.testing.assert_allclose(scaffold, optimum, atol=1e-5)
  np.testing.assert_allclose(feddyn, optimum, atol=1e-5)


def test_fednova_removes_the_bias_of_unequal_local_step_counts():
  # Identical curvatures, sizes 1, 2, 4, 8, one epoch of batch 1: client i takes tau_i = n_i
  # steps. The example-weighted optimum is sum_i p_i b_i. FedAvg's fixed point weights
  # client i by p_i (1 - (1 - lr)^tau_i), about p_i tau_i lr: towards the busy clients.
  # FedNova divides by tau_i, leaving p_i (1 - (1 - lr)^tau_i) / tau_i = p_i lr (1 - O(lr tau_i)).
  sizes, lr = np.array([1, 2, 4, 8]), 0.02
  ones = np.ones_like(CURVATURE)
  p = sizes / sizes.sum()
  optimum = minimizer(p, ones, TARGET)
  reach = 1 - (1 - lr) ** sizes
  fedavg_point = minimizer(p * reach, ones, TARGET)  # checked against FedAvg above
  fednova_point = minimizer(p * reach / sizes, ones, TARGET)
  fednova = run_to_end(
      algorithms.fednova(quadratic_apply, client_learning_rate=lr, clients_per_round=4,
                         batch_size=1, epochs=1, loss=quadratic_loss),
      quadratic_clients(ones, TARGET, sizes), 200)
  np.testing.assert_allclose(fednova, fednova_point, atol=1e-5)
  assert np.linalg.norm(fednova - optimum) < 0.1 * np.linalg.norm(fedavg_point - optimum)


def test_fedprox_with_a_huge_mu_keeps_clients_at_the_server_model():
  # The prox step y <- y - lr (a (y - b) + mu (y - x)) contracts to y* = (a b + mu x) / (a + mu)
  # by r = 1 - lr (a + mu) per step: after K steps the client moved (1 - r^K) (y* - x), never
  # more than |a (b - x)| / (a + mu) however long it trains.
  mu, lr, k = 1e4, 1e-4, 1000
  data = quadratic_clients(CURVATURE, TARGET, [2] * 4)
  algorithm = algorithms.fedprox(quadratic_apply, mu=mu, client_optimizer=optax.sgd(lr),
                                 clients_per_round=4, batch_size=2, steps=k, loss=quadratic_loss)
  state, metrics = jax.jit(algorithm.round)(algorithm.init(START, jax.random.key(0)), data)
  r = 1 - lr * (CURVATURE + mu)
  client_moves = (1 - r**k) * CURVATURE * TARGET / (CURVATURE + mu)  # from x = 0
  np.testing.assert_allclose(np.asarray(state.params["w"]), client_moves.mean(0), rtol=1e-4)
  assert np.abs(client_moves).max() < 1e-3
  # FedAvg's clients, the same 1000 steps at the same lr, move (1 - (1 - lr a)^K) b: 1000x more.
  fedavg_moves = (1 - (1 - lr * CURVATURE) ** k) * TARGET
  assert np.abs(fedavg_moves).max() > 0.5
  assert float(metrics["update_norm"]) < 1e-3


def test_mimelite_with_one_full_batch_step_is_centralized_momentum_sgd():
  # With every client and one full-batch local step, MimeLite's round is a step of SGD with
  # momentum (m <- (1-beta) grad f + beta m, x <- x - lr m) on the example-weighted global
  # objective f = sum_i p_i f_i: the centralized algorithm Mime mimics.
  sizes, beta, lr, rounds = np.array([1, 2, 4, 8]), 0.9, 0.1, 30
  p = sizes / sizes.sum()
  mimelite = run_to_end(
      algorithms.mimelite(quadratic_apply, client_learning_rate=lr, momentum=beta,
                          clients_per_round=4, batch_size=8, steps=1, loss=quadratic_loss),
      quadratic_clients(CURVATURE, TARGET, sizes), rounds)
  x, m = np.zeros(DIM), np.zeros(DIM)
  for _ in range(rounds):
    grad = (p[:, None] * CURVATURE * (x - TARGET)).sum(0)
    m = (1 - beta) * grad + beta * m
    x = x - lr * m
  np.testing.assert_allclose(mimelite, x, atol=1e-5)
  assert np.abs(x).max() > 0.5  # it moved far from the start


# --- Fairness and personalization on threshold classifiers ---------------------------------


def threshold_clients(thresholds, flip=None, n=100):
  """Client k labels x in [-2, 2] (an even grid) as 1 where x > thresholds[k] (or, if
  flip[k], where x <= thresholds[k])."""
  xs, ys = [], []
  for k, t in enumerate(thresholds):
    x = np.linspace(-2, 2, n, dtype=np.float32)[:, None]
    y = (x[:, 0] > t).astype(np.int32)
    xs.append(x)
    ys.append(1 - y if flip is not None and flip[k] else y)
  return xs, ys


@pytest.fixture(scope="module")
def line_model():
  return fs.models.logistic_regression(num_features=1, num_classes=2)


def client_accuracies(apply, params, xs, ys):
  return np.array([np.mean(np.argmax(np.asarray(apply(params, jnp.asarray(x))), -1) == y)
                   for x, y in zip(xs, ys)])


def test_qffl_raises_the_worst_clients_accuracy(line_model):
  # Four clients put the boundary at 0, one at 1.5: the average loss favours the four,
  # q = 5 weighs the one with the higher loss more.
  xs, ys = threshold_clients([0.0, 0.0, 0.0, 0.0, 1.5])
  data = fs.from_clients(xs, ys)
  accuracies = {}
  for q in (0.0, 5.0):
    algorithm = algorithms.qffl(line_model.apply, q=q, client_learning_rate=0.5,
                                clients_per_round=5, batch_size=10, epochs=1)
    state, _ = run_rounds(algorithm, algorithm.init(line_model.params, jax.random.key(0)), data,
                          100)
    accuracies[q] = client_accuracies(line_model.apply, state.params, xs, ys)
  assert accuracies[5.0].min() > accuracies[0.0].min() + 0.05
  assert accuracies[5.0].std() < accuracies[0.0].std()  # more uniform across clients


def test_ditto_personalized_models_beat_the_global_model(line_model):
  # Half the clients label x > 0 as 1, the other half as 0: no global model fits both.
  xs, ys = threshold_clients([0.0] * 6, flip=[0, 0, 0, 1, 1, 1], n=50)
  train_x, train_y, test_x, test_y = fs.split_clients(xs, ys, 0.4, seed=0)
  train, test = fs.from_clients(train_x, train_y), fs.from_clients(test_x, test_y)
  algorithm = algorithms.ditto(line_model.apply, lam=0.1, client_optimizer=optax.sgd(0.5),
                               clients_per_round=6, batch_size=10, epochs=1)
  state = algorithm.init(line_model.params, jax.random.key(0), train.num_clients)
  state, history = run_rounds(algorithm, state, train, 30)
  shared = fs.make_evaluator(line_model.apply, client_test=test)(state.params)
  personal = evaluation.make_personalized_evaluator(line_model.apply, test)(state.client_states)
  assert shared["client_test_accuracy"] < 0.7
  assert personal["personal_client_test_accuracy"] > 0.9
  assert personal["personal_client_test_accuracy_p10"] > shared["client_test_accuracy_p10"] + 0.3
  assert history[-1]["personal_train_loss"] < history[-1]["train_loss"]
  with pytest.raises(ValueError, match="models for \\[5\\] clients"):
    evaluation.make_personalized_evaluator(line_model.apply, test)(
        jax.tree_util.tree_map(lambda a: a[:5], state.client_states))
  # The whole state (its round counter is 0-d) where its client_states were meant.
  with pytest.raises(ValueError, match="pass state.client_states"):
    evaluation.make_personalized_evaluator(line_model.apply, test)(state)
  # Nothing to score: no example, or only ignored tokens (0/0 failed in np.percentile).
  empty = test._replace(counts=jnp.zeros_like(test.counts), count_range=None)
  ignored = test._replace(y=jnp.full_like(test.y, fs.losses.IGNORE_LABEL))
  for bad, match in ((empty, "hold no example"), (ignored, "no labels to score")):
    for build in (lambda t: evaluation.make_personalized_evaluator(line_model.apply, t),
                  lambda t: evaluation.make_merged_personalized_evaluator(
                      line_model.apply, t, lambda shared, row: row)):
      with pytest.raises(ValueError, match=match):
        build(bad)


# --- Per-client state, validation, names ------------------------------------------------


def test_per_client_state_size_is_reported_and_checked(ragged, small_mlp):
  _, _, train = ragged
  kwargs = dict(clients_per_round=2, batch_size=4, steps=1)
  scaffold = algorithms.scaffold(small_mlp.apply, client_learning_rate=0.1, **kwargs)
  state = scaffold.init(small_mlp.params, jax.random.key(0), train.num_clients)
  model_bytes = sum(a.size * 4 for a in jax.tree_util.tree_leaves(small_mlp.params))
  assert algorithms.client_state_bytes(state) == train.num_clients * model_bytes
  stateless = algorithms.fednova(small_mlp.apply, client_learning_rate=0.1, **kwargs)
  assert algorithms.client_state_bytes(stateless.init(small_mlp.params, jax.random.key(0))) == 0
  with pytest.raises(ValueError, match="num_clients"):
    scaffold.init(small_mlp.params, jax.random.key(0))
  other = scaffold.init(small_mlp.params, jax.random.key(0), train.num_clients + 1)
  with pytest.raises(ValueError, match="state for 7 clients but the data has 6"):
    fs.run(scaffold, other, train, rounds=1, progress=False)


@pytest.mark.parametrize("name", algorithms.ALGORITHMS)
def test_every_algorithm_builds_by_name(small_mlp, name):
  algorithm = algorithms.build_algorithm(name, small_mlp.apply, clients_per_round=2,
                                         batch_size=4, epochs=1)
  num_clients = 6 if name in algorithms.registry.STATEFUL else None
  state = algorithm.init(small_mlp.params, jax.random.key(0), num_clients)
  assert int(state.round) == 0


def test_bad_hyperparameters_are_rejected_before_compiling(small_mlp):
  kwargs = dict(clients_per_round=2, batch_size=4, epochs=1)
  with pytest.raises(ValueError, match="mu must be"):
    algorithms.fedprox(small_mlp.apply, mu=-1.0, client_optimizer=optax.sgd(0.1), **kwargs)
  with pytest.raises(ValueError, match="momentum must lie"):
    algorithms.mimelite(small_mlp.apply, client_learning_rate=0.1, momentum=1.0, **kwargs)
  with pytest.raises(ValueError, match="q must be"):
    algorithms.qffl(small_mlp.apply, q=-1, client_learning_rate=0.1, **kwargs)
  with pytest.raises(ValueError, match="alpha must be positive"):
    algorithms.feddyn(small_mlp.apply, alpha=0.0, client_optimizer=optax.sgd(0.1), **kwargs)
  with pytest.raises(ValueError, match="client optimizer must be one of"):
    algorithms.build_algorithm("scaffold", small_mlp.apply, client_optimizer="adam", **kwargs)
  with pytest.raises(ValueError, match="own server update"):
    algorithms.build_algorithm("feddyn", small_mlp.apply, server_optimizer="fedadam", **kwargs)
  with pytest.raises(ValueError, match="unknown algorithm"):
    algorithms.build_algorithm("fedsgd", small_mlp.apply, **kwargs)


def test_cli_runs_an_algorithm_with_per_client_state(tmp_path, capsys):
  from fedjax_sim import cli
  out = tmp_path / "ditto"
  code = cli.main(["run", "--algorithm", "ditto", "--ditto-lambda", "0.5", "--rounds", "2",
                   "--eval-every", "2", "--output", str(out), "--no-progress"])
  assert code == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed"
  assert 0.0 <= summary["personalized"]["personal_client_test_accuracy"] <= 1.0
  assert json.loads((out / "config.json").read_text())["algorithm"] == "ditto"
  assert "personalized models" in capsys.readouterr().out
  assert cli.main(["run", "--algorithm", "mimelite", "--server-optimizer", "fedyogi",
                   "--no-progress", "--output", str(tmp_path / "x")]) == 2
  assert "mimelite has its own server update" in capsys.readouterr().err


def test_scaffold_client_without_examples_keeps_its_control_variate(small_mlp):
  # With no step, option II's change was -c: the client's c_i, and the server's c after
  # it, drifted towards -c each time it was sampled.
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (4, 0, 4)]
  ys = [rng.integers(0, 3, n) for n in (4, 0, 4)]
  data = fs.from_clients(xs, ys, allow_empty=True)
  algorithm = algorithms.scaffold(small_mlp.apply, client_learning_rate=0.1, clients_per_round=3,
                                  batch_size=2, epochs=1, weighting="uniform")
  state = algorithm.init(small_mlp.params, jax.random.key(0), 3)
  for _ in range(3):
    state, _ = algorithm.round(state, data)
  rows = [np.asarray(a) for a in jax.tree_util.tree_leaves(state.client_states)]
  assert all(not np.any(a[1]) for a in rows)  # the empty client's c_1 is still 0
  assert any(np.any(a[0]) for a in rows)      # the others' moved
