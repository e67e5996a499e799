"""The unpadded local step (every client has the same count, a multiple of the batch) and
`steps=` mode's epoch orders computed once: the same results as the general path and
the loop reference on the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import data as data_lib
from fedjax_sim import local
from fedjax_sim.algorithms import fedavg
from fedjax_sim.reference import LoopTrainer
from conftest import max_relative_error, tiny_mlp

BATCH = 4


def client(n, pad, seed=0):
  rng = np.random.default_rng(seed)
  x = np.zeros((pad, 5), np.float32)
  x[:n] = rng.normal(size=(n, 5))
  y = np.zeros(pad, np.int32)
  y[:n] = rng.integers(0, 3, n)
  return x, y


def assert_same(a, b, tol=1e-6):
  assert max_relative_error(a.delta, b.delta) < tol
  assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=tol)
  assert float(a.num_trained) == float(b.num_trained)
  assert int(a.num_steps) == int(b.num_steps)


# 12 examples, batch 4: 3 steps an epoch. steps=3 is exactly one epoch, 4 one epoch + 1.
SCHEDULES = [{"epochs": 1}, {"epochs": 2}, {"steps": 1}, {"steps": 3}, {"steps": 4},
             {"steps": 8}]


@pytest.fixture(params=["orders_up_front", "orders_in_the_loop"])
def order_slots(request, monkeypatch):
  """Both ways of computing epoch orders: all before the steps, or in the loop (the
  bounded-memory way, taken when they would not fit `_ORDER_SLOTS`)."""
  if request.param == "orders_in_the_loop":
    monkeypatch.setattr(local, "_ORDER_SLOTS", 0)
  return request.param


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, *s.items())))
@pytest.mark.parametrize("pad", [12, 16], ids=["unpadded", "padded_slots"])
def test_static_count_path_equals_general_path_and_the_loop(schedule, pad, order_slots):
  apply, params = tiny_mlp()
  loss = fs.cross_entropy(apply)
  update = local.make_local_update(loss, optax.sgd(0.3), batch_size=BATCH, **schedule)
  x, y = client(12, pad)
  key = jax.random.key(5)
  fast = jax.jit(lambda p, x, y, k: update(p, x, y, 12, k))(params, x, y, key)
  general = jax.jit(update)(params, x, y, jnp.int32(12), key)
  assert_same(fast, general)
  delta, loss_sum, count, steps = LoopTrainer(loss, optax.sgd(0.3), batch_size=BATCH,
                                              **schedule).train(params, x[:12], y[:12], key)
  assert max_relative_error(fast.delta, delta) < 1e-5
  assert float(fast.loss_sum) == pytest.approx(loss_sum, rel=1e-5)
  assert (float(fast.num_trained), int(fast.num_steps)) == (count, steps)
  assert max_relative_error(fast.delta, jax.tree_util.tree_map(jnp.zeros_like, params)) > 1e-3


def step_jaxprs(n, **schedule):
  """The jaxprs of local training with `n` as a static count and as a traced one."""
  apply, params = tiny_mlp()
  update = local.make_local_update(fs.cross_entropy(apply), optax.sgd(0.3), batch_size=BATCH,
                                   **schedule)
  x, y = client(n, 12)
  key = jax.random.key(0)
  static = str(jax.make_jaxpr(lambda p: update(p, x, y, n, key))(params))
  general = str(jax.make_jaxpr(lambda p, n: update(p, x, y, n, key))(params, jnp.int32(n)))
  return static, general


def test_static_count_step_has_no_masks():
  """The unpadded step is smaller: no mask, no count normalisation, no select."""
  fast, general = step_jaxprs(12, steps=6)
  assert fast.count("select_n") < general.count("select_n")
  assert len(fast.splitlines()) < len(general.splitlines())


def test_a_static_count_with_a_short_last_batch_keeps_the_general_step():
  """10 examples at batch 4: the short last batch stays a masked step of the general path
  (one step body). An unpadded step of its own static size was measured: no faster per
  round on the MLP (27.9 vs 27.7 ms) and 31 more kernels to compile (first round 4.0 ->
  4.2 s; benchmarks/results/local_step_session2_cpu.md), so it was not kept."""
  static, _ = step_jaxprs(10, epochs=2)
  assert "f32[2,5]" not in static and "while" in static


@pytest.mark.parametrize("n,schedule", [(12, {"steps": 3}), (10, {"steps": 3}),
                                        (10, {"steps": 4}), (10, {"steps": 6}),
                                        (13, {"epochs": 2}), (3, {"epochs": 2}),
                                        (3, {"steps": 3})],
                         ids=["divisible", "not_divisible_one_epoch", "not_divisible_plus_one",
                              "not_divisible_two_epochs", "not_divisible_epochs",
                              "fewer_than_a_batch_epochs", "fewer_than_a_batch_steps"])
def test_a_static_count_divisible_or_not_equals_general_and_loop(n, schedule, order_slots):
  apply, params = tiny_mlp()
  loss = fs.cross_entropy(apply)
  update = local.make_local_update(loss, optax.sgd(0.3), batch_size=BATCH, **schedule)
  x, y = client(n, 16, seed=n)
  key = jax.random.key(2)
  static = jax.jit(lambda p, x, y, k: update(p, x, y, n, k))(params, x, y, key)
  general = jax.jit(update)(params, x, y, jnp.int32(n), key)
  assert_same(static, general)
  delta, loss_sum, count, steps = LoopTrainer(loss, optax.sgd(0.3), batch_size=BATCH,
                                              **schedule).train(params, x[:n], y[:n], key)
  assert max_relative_error(static.delta, delta) < 1e-5
  assert (float(static.num_trained), int(static.num_steps)) == (count, steps)


@pytest.mark.parametrize("steps", [2, 3, 5, 9])
def test_steps_mode_ragged_clients_with_a_min_count_bound_equal_the_loop(steps, order_slots):
  """Ragged clients, vmapped, with `min_examples` bounding the epoch orders computed up
  front (sizes 8, 10, 13 at batch 4: 2-4 steps an epoch); each equals its loop run."""
  apply, params = tiny_mlp()
  loss = fs.cross_entropy(apply)
  update = local.make_local_update(loss, optax.sgd(0.3), batch_size=BATCH, steps=steps)
  sizes = (8, 10, 13)
  clients = [client(n, 13, seed=n) for n in sizes]
  xs = np.stack([c[0] for c in clients])
  ys = np.stack([c[1] for c in clients])
  keys = jax.random.split(jax.random.key(9), len(sizes))
  out = jax.jit(jax.vmap(lambda x, y, n, k: update(params, x, y, n, k, min_examples=8)))(
      xs, ys, jnp.asarray(sizes, jnp.int32), keys)
  trainer = LoopTrainer(loss, optax.sgd(0.3), batch_size=BATCH, steps=steps)
  for i, n in enumerate(sizes):
    delta, loss_sum, count, _ = trainer.train(params, xs[i, :n], ys[i, :n], keys[i])
    row = jax.tree_util.tree_map(lambda a: a[i], out.delta)
    assert max_relative_error(row, delta) < 1e-5
    assert float(out.loss_sum[i]) == pytest.approx(loss_sum, rel=1e-5)
    assert float(out.num_trained[i]) == count


def equal_clients(num=6, n=12, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for _ in range(num)]
  ys = [rng.integers(0, 3, n).astype(np.int32) for _ in range(num)]
  return xs, ys


@pytest.mark.parametrize("schedule", [{"epochs": 2}, {"steps": 4}], ids=["epochs", "steps"])
def test_engine_round_equal_clients_fast_equals_general_and_reference(schedule):
  apply, params = tiny_mlp()
  xs, ys = equal_clients()
  data = data_lib.from_clients(xs, ys, num_classes=3)
  assert data.count_range == (12, 12)
  kwargs = dict(client_optimizer=optax.sgd(0.2), clients_per_round=4, batch_size=BATCH,
                **schedule)
  algorithm = fedavg(apply, **kwargs)
  state = algorithm.init(params, jax.random.key(1))
  round_ = jax.jit(algorithm.round)
  fast, fast_metrics = round_(state, data)
  general, general_metrics = round_(state, data._replace(count_range=None))
  assert max_relative_error(fast.params, general.params) < 1e-6
  np.testing.assert_allclose(fast_metrics["client_train_loss"],
                             general_metrics["client_train_loss"], rtol=1e-6)
  reference = fs.ReferenceFedAvg(apply, **kwargs)
  ref_state, ref_metrics = reference.round(reference.init(params, jax.random.key(1)), data)
  assert max_relative_error(fast.params, ref_state.params) < 1e-5
  assert float(fast_metrics["train_loss"]) == pytest.approx(ref_metrics["train_loss"], rel=1e-5)
  # The round with the static count really compiled the unpadded step: not one keep or
  # discard select per parameter (4 of them) and per count.
  with_count = str(jax.make_jaxpr(algorithm.round)(state, data))
  without = str(jax.make_jaxpr(algorithm.round)(state, data._replace(count_range=None)))
  assert with_count.count("select_n") <= without.count("select_n") - 5


def test_from_clients_records_the_count_range_and_validate_checks_it():
  apply, params = tiny_mlp()
  xs, ys = equal_clients()
  ragged = data_lib.from_clients(xs[:2] + [xs[2][:7]], ys[:2] + [ys[2][:7]], num_classes=3)
  assert ragged.count_range == (7, 12) and ragged.equal_count is None
  data = data_lib.from_clients(xs, ys, num_classes=3)
  assert data.equal_count == 12
  # Static pytree data: not a leaf, kept by tree maps.
  assert len(jax.tree_util.tree_leaves(data)) == 3
  assert jax.tree_util.tree_map(lambda a: a, data).count_range == (12, 12)
  algorithm = fedavg(apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=BATCH, epochs=1)
  state = algorithm.init(params, jax.random.key(0))
  algorithm.validate(state, data)
  stale = data._replace(counts=data.counts.at[0].set(5))
  with pytest.raises(ValueError, match="count_range"):
    algorithm.validate(state, stale)
  algorithm.validate(state, stale._replace(count_range=None))


@pytest.mark.parametrize("counts", [(12,) * 6, (12, 7, 12, 9, 12, 5)], ids=["equal", "ragged"])
def test_local_training_gathers_batches_from_the_data_without_copying_clients_out(counts):
  """Clients train on `local.ClientRows` of the round's data: each step gathers its
  batch from `data.x`, and no `[clients_per_round, max_examples, ...]` copy of the sampled
  clients' data is made first. The results are those of training on the copy (a data
  transform, here the identity, hands local training the copied-out rows) to the bit."""
  apply, params = tiny_mlp()
  xs, ys = equal_clients()
  data = data_lib.from_clients([x[:n] for x, n in zip(xs, counts)],
                               [y[:n] for y, n in zip(ys, counts)], num_classes=3)
  kwargs = dict(client_optimizer=optax.sgd(0.2), clients_per_round=3, batch_size=BATCH,
                epochs=2)
  rows = fedavg(apply, **kwargs)
  copied = fedavg(apply, client_data_transform=lambda x, y, n, client_id, key: (x, y, n),
                  **kwargs)
  state = rows.init(params, jax.random.key(1))
  copy_shape = "f32[3,12,5]"  # the sampled clients' data copied out
  rows_round, copied_round = (jax.jit(a.round).lower(state, data).compile()
                              for a in (rows, copied))
  assert copy_shape not in rows_round.as_text()
  assert copy_shape in copied_round.as_text()
  out, metrics = rows_round(state, data)
  # Ragged clients take the general (masked) step on both sides: the same bits. (Equal
  # ones take the unpadded step here and the general one under a transform.)
  if len(set(counts)) > 1:
    expected, expected_metrics = copied_round(state, data)
    for a, b in zip(jax.tree_util.tree_leaves(out.params),
                    jax.tree_util.tree_leaves(expected.params)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(metrics["client_train_loss"],
                                  expected_metrics["client_train_loss"])
  reference = fs.ReferenceFedAvg(apply, **kwargs)
  ref_state, _ = reference.round(reference.init(params, jax.random.key(1)), data)
  assert max_relative_error(out.params, ref_state.params) < 1e-5
