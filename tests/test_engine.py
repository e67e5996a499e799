"""The vectorized round against the loop reference, goldens, determinism, traces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import local
from fedjax_sim.algorithms import fedavg
from conftest import max_relative_error

SERVERS = {
    "fedavg": lambda: fs.server_optimizer("fedavg"),
    "fedadam": lambda: fs.server_optimizer("fedadam", 0.05),
}


@pytest.mark.parametrize("server", sorted(SERVERS))
@pytest.mark.parametrize("schedule", [{"epochs": 2}, {"steps": 7}], ids=["epochs", "steps"])
def test_vectorized_equals_loop_reference(ragged, small_mlp, server, schedule):
  _, _, train = ragged
  kwargs = dict(client_optimizer=optax.sgd(0.1), server_optimizer=SERVERS[server](),
                clients_per_round=4, batch_size=4, **schedule)
  algorithm = fedavg(small_mlp.apply, **kwargs)
  reference = fs.ReferenceFedAvg(small_mlp.apply, **kwargs)
  key = jax.random.key(3)
  state, history = fs.run(algorithm, algorithm.init(small_mlp.params, key), train, rounds=3,
                          rounds_per_chunk=3, progress=False)
  ref_state, ref_history = reference.run(reference.init(small_mlp.params, key), train, 3)
  assert max_relative_error(state.params, ref_state.params) < 1e-5
  for row, ref_row in zip(history, ref_history):
    np.testing.assert_array_equal(row["client_ids"], ref_row["client_ids"])
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-5)
  # The model really moved, so the comparison above is not vacuous.
  assert max_relative_error(state.params, small_mlp.params) > 1e-2


def test_chunked_clients_equal_all_at_once(ragged, small_mlp):
  _, _, train = ragged
  kwargs = dict(client_optimizer=optax.sgd(0.1), clients_per_round=4, batch_size=4, epochs=1)
  whole = fedavg(small_mlp.apply, **kwargs)
  chunked = fedavg(small_mlp.apply, client_chunk_size=2, **kwargs)
  state = whole.init(small_mlp.params, jax.random.key(0))
  a, ma = jax.jit(whole.round)(state, train)
  b, mb = jax.jit(chunked.round)(state, train)
  assert max_relative_error(a.params, b.params) < 1e-6
  np.testing.assert_allclose(ma["client_train_loss"], mb["client_train_loss"], rtol=1e-6)


@pytest.mark.parametrize("schedule", [{"epochs": 2}, {"steps": 7}], ids=["epochs", "steps"])
def test_padding_does_not_change_a_client_update(ragged, small_mlp, schedule):
  xs, ys, _ = ragged
  update = jax.jit(local.make_local_update(fs.cross_entropy(small_mlp.apply), optax.sgd(0.1),
                                           batch_size=4, **schedule))
  x, y, key = xs[1], ys[1], jax.random.key(7)  # 17 examples
  results = []
  for pad in (17, 18, 40):
    xp = np.zeros((pad, x.shape[1]), np.float32); xp[:17] = x
    yp = np.zeros((pad,), np.int32); yp[:17] = y
    results.append(update(small_mlp.params, xp, yp, jnp.int32(17), key))
  for r in results[1:]:
    assert max_relative_error(r.delta, results[0].delta) < 1e-6
    assert float(r.num_trained) == float(results[0].num_trained)
  # 7 steps of batch 4 over 17 examples: an epoch of 4+4+4+4+1, then 4+4 of the next.
  expected = 17 * schedule["epochs"] if "epochs" in schedule else 25
  assert float(results[0].num_trained) == expected


def test_padding_slots_reach_no_gradient_and_no_metric():
  """A model not finite on a padding slot's zeros (log features of positive data): the
  last partial batch masked those slots by 0 x loss, whose gradient is 0 x NaN, so the
  round's parameters were NaN while each client alone trains finitely. Same for the
  full-batch gradient (MimeLite, q-FFL) and the evaluation sums."""
  apply = lambda p, x: jnp.log(x) @ p["w"]
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  xs = [rng.uniform(0.5, 2.0, size=(n, 3)).astype(np.float32) for n in (3, 5)]
  ys = [rng.integers(0, 4, n) for n in (3, 5)]
  data = fs.from_clients(xs, ys, num_classes=4)
  kw = dict(clients_per_round=2, batch_size=2, epochs=1)
  got, _ = jax.jit(fedavg(apply, client_optimizer=optax.sgd(0.1), **kw).round)(
      fedavg(apply, client_optimizer=optax.sgd(0.1), **kw).init(params, jax.random.key(0)), data)
  ref = fs.ReferenceFedAvg(apply, client_optimizer=optax.sgd(0.1), **kw)
  want, _ = ref.round(ref.init(params, jax.random.key(0)), data)
  assert max_relative_error(got.params, want.params) < 1e-5
  mime = fs.mimelite(apply, client_learning_rate=0.1, momentum=0.5, **kw)
  state, _ = jax.jit(mime.round)(mime.init(params, jax.random.key(0)), data)
  assert all(np.isfinite(np.asarray(leaf)).all()
             for leaf in jax.tree_util.tree_leaves((state.params, state.algorithm_state)))
  metrics = fs.make_evaluator(apply, client_test=data)(got.params)
  assert np.isfinite(metrics["client_test_loss"])


def test_a_client_with_no_examples_adds_no_nan_full_batch_gradient():
  """A client with no examples has only padding rows: on a model not finite there, its
  masked full-batch gradient was 0 x NaN, and its weight of 0 kept the NaN in MimeLite's
  momentum. Now the momentum is that of the other two clients alone; q-FFL reports no
  loss at the server for it (NaN, as its train loss)."""
  apply = lambda p, x: jnp.log(x) @ p["w"]
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  sizes = (3, 0, 5)
  xs = [rng.uniform(0.5, 2.0, size=(n, 3)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 4, n) for n in sizes]
  data = fs.from_clients(xs, ys, num_classes=4, allow_empty=True)
  kw = dict(clients_per_round=3, batch_size=2, epochs=1)
  mime = fs.mimelite(apply, client_learning_rate=0.1, momentum=0.5, **kw)
  state, _ = jax.jit(mime.round)(mime.init(params, jax.random.key(0)), data)

  def client_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  grads = [jax.grad(client_loss)(params, xs[i], ys[i]) for i in (0, 2)]
  want = jax.tree_util.tree_map(lambda a, b: 0.5 * (3 * a + 5 * b) / 8, *grads)
  assert max_relative_error(state.algorithm_state, want) < 1e-5
  qffl = fs.qffl(apply, client_learning_rate=0.1, q=1.0, **kw)
  state, metrics = jax.jit(qffl.round)(qffl.init(params, jax.random.key(0)), data)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(state.params))
  at_server = np.asarray(metrics["client_loss_at_server"])
  assert np.isnan(at_server[1]) and np.isfinite(at_server[[0, 2]]).all()


def test_epoch_order_is_a_permutation_then_padding():
  order = np.asarray(local.epoch_order(jax.random.key(0), 7, 12))
  assert sorted(order[:7]) == list(range(7))
  assert list(order[7:]) == list(range(7, 12))
  # Same key, shorter padding: the real examples come in the same order.
  np.testing.assert_array_equal(order[:7], np.asarray(local.epoch_order(jax.random.key(0), 7, 7)))


def _linear_regression():
  """y ~ w * x with a scalar w and squared loss, for hand-computed goldens."""
  apply = lambda params, x: params["w"] * x[:, 0]
  loss = lambda params, x, y: 0.5 * (apply(params, x) - y) ** 2
  return apply, loss, {"w": jnp.zeros(())}


@pytest.mark.parametrize("weighting,expected", [("examples", 0.35), ("uniform", 0.30)])
def test_example_weighting_golden(weighting, expected):
  # Client A: one example (x=1, y=2); client B: three (x=1, y=4). One full-batch SGD step
  # with lr 0.1 from w=0 gives deltas 0.2 and 0.4; examples-weighted mean
  # (1*0.2 + 3*0.4)/4 = 0.35, uniform mean 0.30; server SGD lr 1 applies it.
  apply, loss, params = _linear_regression()
  train = fs.from_clients([np.ones((1, 1)), np.ones((3, 1))],
                          [np.array([2]), np.array([4, 4, 4])])
  algorithm = fedavg(apply, loss=loss, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=8, steps=1, weighting=weighting)
  state, metrics = jax.jit(algorithm.round)(algorithm.init(params, jax.random.key(0)), train)
  assert float(state.params["w"]) == pytest.approx(expected, rel=1e-6)
  # Training loss: 0.5*(0-2)^2 = 2 for A's one example, 0.5*16 = 8 for B's three: 26/4.
  assert float(metrics["train_loss"]) == pytest.approx(6.5, rel=1e-6)
  assert int(metrics["num_examples"]) == 4


def test_last_partial_batch_is_a_mean_over_its_real_examples():
  # One client, 3 examples, batch 2, one epoch: steps on 2 examples then on 1.
  apply, loss, params = _linear_regression()
  x, y = np.ones((3, 1)), np.array([1, 1, 1])
  update = local.make_local_update(loss, optax.sgd(0.5), batch_size=2, epochs=1)
  result = update(params, jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.int32(3),
                  jax.random.key(0))
  # w: 0 -> 0 + 0.5*1 = 0.5 -> 0.5 + 0.5*(1-0.5) = 0.75, whatever the order.
  assert float(result.delta["w"]) == pytest.approx(0.75)
  assert float(result.num_trained) == 3


def test_same_seed_same_result_different_seed_differs(ragged, small_mlp):
  _, _, train = ragged
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=3,
                     batch_size=4, epochs=1)
  finals = []
  for seed in (0, 0, 1):
    state, _ = fs.run(algorithm, algorithm.init(small_mlp.params, jax.random.key(seed)), train,
                      rounds=2, rounds_per_chunk=2, progress=False)
    finals.append(jax.tree_util.tree_leaves(state.params))
  for a, b in zip(finals[0], finals[1]):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(finals[0], finals[2]))


def test_one_trace_per_shape_across_rounds_chunks_and_runs(ragged, small_mlp, count_compiles):
  _, _, train = ragged
  traces = []

  def counting_loss(params, x, y):
    traces.append(1)  # runs only while tracing
    return fs.cross_entropy(small_mlp.apply)(params, x, y)

  algorithm = fedavg(small_mlp.apply, loss=counting_loss, client_optimizer=optax.sgd(0.1),
                     clients_per_round=3, batch_size=4, steps=2)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  state, _ = fs.run(algorithm, state, train, rounds=6, rounds_per_chunk=2, progress=False)
  after_first_run, compiles = len(traces), count_compiles()
  assert after_first_run > 0
  state, _ = fs.run(algorithm, state, train, rounds=4, rounds_per_chunk=2, progress=False)
  assert len(traces) == after_first_run  # 5 chunks over two runs, one trace
  assert count_compiles() == compiles   # and no compilation at all in the second run
  assert int(state.round) == 10


def test_clients_are_sampled_without_replacement():
  ids = np.asarray(jax.jit(fs.sample_clients, static_argnums=(1, 2))(jax.random.key(0), 50, 50))
  assert sorted(ids) == list(range(50))


def test_mean_aggregator_equals_the_fused_mean_path(ragged, small_mlp):
  _, _, train = ragged
  kwargs = dict(client_optimizer=optax.sgd(0.1), clients_per_round=4, batch_size=4, epochs=1)
  fused = fedavg(small_mlp.apply, **kwargs)
  stacked = fedavg(small_mlp.apply, aggregator=fs.aggregators.mean(), client_chunk_size=2, **kwargs)
  state = fused.init(small_mlp.params, jax.random.key(0))
  a, ma = jax.jit(fused.round)(state, train)
  b, mb = jax.jit(stacked.round)(stacked.init(small_mlp.params, jax.random.key(0)), train)
  assert max_relative_error(a.params, b.params) < 1e-6
  assert float(ma["train_loss"]) == pytest.approx(float(mb["train_loss"]), rel=1e-6)


def test_regularizer_and_step_budget_reach_local_training():
  # Loss 0.5 (w - 3)^2 (x = 1, y = 3); proximal term 99/2 (w - 0)^2. With lr 1/(1 + 99) one
  # SGD step lands on the regularized minimizer 3/100 and stays there; without it, five
  # steps of lr 0.01 give 3 (1 - 0.99^5).
  apply, loss, params = _linear_regression()
  x, y = jnp.ones((4, 1)), jnp.array([3, 3, 3, 3])
  prox = lambda p, anchor: 0.5 * 99.0 * (p["w"] - anchor["w"]) ** 2
  free = local.make_local_update(loss, optax.sgd(0.01), batch_size=2, steps=5)
  held = local.make_local_update(loss, optax.sgd(0.01), batch_size=2, steps=5, regularizer=prox)
  a = free(params, x, y, jnp.int32(4), jax.random.key(0), params)
  b = held(params, x, y, jnp.int32(4), jax.random.key(0), {"w": jnp.array(0.0)})
  assert float(a.delta["w"]) == pytest.approx(3 * (1 - 0.99**5), rel=1e-5)
  assert float(b.delta["w"]) == pytest.approx(0.03, rel=1e-5)
  # A straggler's step budget: 2 of the 5 steps, masked like padding afterwards.
  c = free(params, x, y, jnp.int32(4), jax.random.key(0), None, jnp.int32(2))
  assert int(c.num_steps) == 2 and float(c.num_trained) == 4
  assert float(c.delta["w"]) == pytest.approx(3 * (1 - 0.99**2), rel=1e-5)
  assert int(a.num_steps) == 5


@pytest.mark.parametrize("schedule", [dict(epochs=2), dict(steps=4)])
def test_a_client_without_examples_takes_no_step(schedule):
  # In steps= mode it took `steps` steps on zero gradients, which weight decay (or
  # momentum, or a regularizer) turns into an update from no data.
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  update = jax.jit(local.make_local_update(
      lambda p, x, y: (x @ p["w"] - y) ** 2, optax.adamw(0.1, weight_decay=0.5),
      batch_size=2, **schedule))
  result = update(params, jnp.ones((4, 3)), jnp.zeros(4), jnp.int32(0), jax.random.key(0))
  np.testing.assert_array_equal(result.delta["w"], np.zeros(3))
  assert int(result.num_steps) == 0 and float(result.num_trained) == 0.0


def test_the_mean_of_clients_without_examples_is_a_zero_update():
  # Every weight 0 (all sampled clients empty): the fused mean gives 0; the mean
  # aggregator divided by 0 and reported a NaN update norm.
  mean = fs.aggregators.mean()
  delta, _, _ = mean.aggregate(None, {"w": jnp.ones((3, 2))}, jnp.zeros(3), jnp.arange(3), None)
  np.testing.assert_array_equal(delta["w"], np.zeros(2))
  delta, _, _ = mean.aggregate(None, {"w": jnp.arange(6.0).reshape(3, 2)},
                               jnp.array([0.0, 1.0, 3.0]), jnp.arange(3), None)
  np.testing.assert_allclose(delta["w"], [(2 + 12) / 4, (3 + 15) / 4])
