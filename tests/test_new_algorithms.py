"""FedExP and FedRep, composed from engine parts: each against its loop reference on the
same keys (plain, and through an aggregator), against its defining behaviour, and under
`systems=` (dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import privacy, robust, systems
from fedjax_sim import reference_algorithms as ref
from fedjax_sim.algorithms.base import model_bytes
from fedjax_sim.algorithms.fedexp import fedexp as make_fedexp
from fedjax_sim.algorithms.fedrep import fedrep as make_fedrep
from fedjax_sim.algorithms.fedrep import merge, personalized_evaluator, split
import aggregation_reference as agg_ref
from conftest import max_relative_error, ragged_clients, tiny_mlp


def run_rounds(algorithm, state, data, rounds):
  """`rounds` jitted rounds; returns (state, per-round metrics)."""
  algorithm.validate(state, data)
  step, history = jax.jit(algorithm.round), []
  for _ in range(rounds):
    state, metrics = step(state, data)
    history.append(jax.device_get(metrics))
  return state, history


HEAD = ("w2", "b2")


@pytest.fixture(scope="module")
def uneven():
  """Ragged clients (one with a single example) whose batches of 4 come in two shapes."""
  xs, ys = ragged_clients(sizes=(8, 1, 8, 4, 12, 4))
  return fs.from_clients(xs, ys, num_classes=3)


def compare_with_reference(algorithm, reference, data, params, rounds=3, stateful=False):
  key = jax.random.key(3)
  state = algorithm.init(params, key, data.num_clients if stateful else None)
  state, history = run_rounds(algorithm, state, data, rounds)
  ref_state = (reference.init(params, key, data.num_clients) if stateful
               else reference.init(params, key))
  ref_state, ref_history = reference.run(ref_state, data, rounds)
  assert max_relative_error(state.params, ref_state.params) < 1e-5
  if stateful:
    assert max_relative_error(state.client_states, ref.stacked(ref_state)) < 1e-5
  for row, ref_row in zip(history, ref_history):
    np.testing.assert_array_equal(row["client_ids"], ref_row["client_ids"])
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-5)
  assert float(optax.tree.norm(optax.tree.sub(state.params, params))) > 0.1  # it moved
  return state, history, ref_history


# --- FedExP --------------------------------------------------------------------------------


def test_fedexp_equals_loop_reference(uneven):
  apply, params = tiny_mlp()
  kwargs = dict(client_optimizer=optax.sgd(0.3), eps=1e-3, clients_per_round=4, batch_size=4,
                epochs=1)
  _, history, ref_history = compare_with_reference(
      make_fedexp(apply, **kwargs, client_chunk_size=2), ref.ReferenceFedExP(apply, **kwargs),
      uneven, params)
  etas = [float(row["eta_g"]) for row in history]
  assert etas == pytest.approx([row["eta_g"] for row in ref_history], rel=1e-5)
  assert min(etas) >= 1.0 and max(etas) > 1.05  # it extrapolated


def test_fedexp_through_dp_mean_equals_loop_reference(uneven):
  # The DP mean clips and noises {'delta', 'sq_norm'} as one vector; its reducer ignores
  # the weights, so FedExP's ratio of means needs weighting='uniform'.
  apply, params = tiny_mlp()
  kwargs = dict(client_optimizer=optax.sgd(0.3), clients_per_round=4, batch_size=4, steps=3,
                weighting="uniform")
  compare_with_reference(
      make_fedexp(apply, **kwargs, aggregator=privacy.dp_mean(0.5, 0.3)),
      ref.ReferenceFedExP(apply, **kwargs, aggregator=agg_ref.DPMean(0.5, 0.3)), uneven, params)
  with pytest.raises(ValueError, match="divides example-weighted means"):
    make_fedexp(apply, **{**kwargs, "weighting": "examples"}, aggregator=privacy.dp_mean(0.5, 0.3))


# Quadratic clients: client i's examples are all b_i, f_i(w) = 1/2 ||w - b_i||^2, so one
# full-batch SGD step of learning rate lr from w sends Delta_i = lr (b_i - w) exactly.


def quadratic_loss(params, x, y):
  del y
  return 0.5 * jnp.sum((params["w"] - x) ** 2, axis=1)


def quadratic_apply(params, x):
  del params
  return jnp.zeros((x.shape[0], 1))


def point_clients(targets, sizes):
  xs = [np.tile(np.asarray(b, np.float32), (n, 1)) for b, n in zip(targets, sizes)]
  return fs.from_clients(xs, [np.zeros(n, np.int32) for n in sizes])


def quadratic_fedexp(lr, **kwargs):
  return make_fedexp(quadratic_apply, client_optimizer=optax.sgd(lr), loss=quadratic_loss,
                     batch_size=8, steps=1, **kwargs)


@pytest.mark.parametrize("weighting, eta, w", [
    # Delta_i = 0.5 e_i. Uniform: mean ||Delta_i||^2 = 0.25, mean Delta = 0.125 (1,1,1,1) with
    # ||.||^2 = 0.0625, eta_g = 0.25 / (2 (0.0625 + 0.001)) = 1.968504, w = 0.125 eta_g.
    ("uniform", 1.968504, [0.246063] * 4),
    # Sizes 1, 1, 2, 4: p = (1, 1, 2, 4) / 8, mean ||Delta_i||^2 = 0.25, mean Delta = 0.5 p
    # with ||.||^2 = 0.25 * 22/64 = 0.0859375, eta_g = 0.25 / (2 (0.0859375 + 0.001))
    # = 1.437815, w = 0.5 p eta_g.
    ("examples", 1.437815, [0.089863, 0.089863, 0.179727, 0.359454]),
])
def test_fedexp_extrapolates_orthogonal_updates_to_the_golden_step(weighting, eta, w):
  data = point_clients(np.eye(4), [1, 1, 2, 4])
  algorithm = quadratic_fedexp(0.5, eps=1e-3, clients_per_round=4, weighting=weighting)
  state, (metrics,) = run_rounds(algorithm, algorithm.init({"w": jnp.zeros(4)},
                                                           jax.random.key(0)), data, 1)
  assert float(metrics["eta_g"]) == pytest.approx(eta, rel=1e-5)
  np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5)


def test_fedexp_is_fedavg_when_all_clients_send_the_same_update():
  # Six copies of one client's data and full-batch steps: every client sends the same
  # update (to float rounding), so mean ||Delta_i||^2 / ||mean Delta||^2 = 1, the
  # extrapolation 1/2 and eta_g = 1 exactly: the rounds are FedAvg's (to float32
  # rounding: the two are different XLA programs).
  apply, params = tiny_mlp()
  xs, ys = ragged_clients(sizes=(6,))
  data = fs.from_clients(xs * 6, ys * 6, num_classes=3)
  kwargs = dict(client_optimizer=optax.sgd(0.5), clients_per_round=4, batch_size=8, steps=2)
  key = jax.random.key(1)
  algorithm = make_fedexp(apply, **kwargs)
  state, history = run_rounds(algorithm, algorithm.init(params, key), data, 3)
  fedavg = fs.fedavg(apply, **kwargs)
  fedavg_state, _ = run_rounds(fedavg, fedavg.init(params, key), data, 3)
  assert [float(m["eta_g"]) for m in history] == [1.0, 1.0, 1.0]
  assert max_relative_error(state.params, fedavg_state.params) < 1e-6
  assert float(optax.tree.norm(optax.tree.sub(state.params, params))) > 0.1


def test_fedexp_under_dropout_uses_the_aggregated_clients_only():
  # Six orthogonal clients, 4 sampled a round, each dropping with probability 0.5: the
  # step follows the rule over the clients kept, computed here on the host round by round.
  sizes, lr, eps = np.array([1, 2, 3, 1, 2, 3]), 0.5, 1e-3
  data = point_clients(np.eye(6), sizes)
  profiles = systems.make_profiles(6, examples_per_s=1e3, downlink_bytes_per_s=1e9,
                                   uplink_bytes_per_s=1e9)
  algorithm = quadratic_fedexp(lr, eps=eps, clients_per_round=4,
                               systems=systems.SystemsConfig(profiles, dropout=0.5))
  state = algorithm.init({"w": jnp.zeros(6)}, jax.random.key(2))
  step, w, dropped, kept = jax.jit(algorithm.round), np.zeros(6), 0, 0
  for _ in range(5):
    state, m = step(state, data)
    ids, aggregated = np.asarray(m["client_ids"]), np.asarray(m["client_aggregated"])
    dropped, kept = dropped + (~aggregated).sum(), kept + aggregated.sum()
    eta = 1.0
    if aggregated.any():
      p = np.where(aggregated, sizes[ids], 0) / np.where(aggregated, sizes[ids], 0).sum()
      deltas = lr * (np.eye(6)[ids] - w)
      mean = p @ deltas
      eta = max(1.0, (p * (deltas**2).sum(1)).sum() / (2 * (mean @ mean + eps)))
      w = w + eta * mean
    assert float(m["eta_g"]) == pytest.approx(eta, rel=1e-5)
    np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-7)
  assert dropped > 0 and kept > 0


def test_fedexp_rejects_a_nonpositive_eps():
  apply, _ = tiny_mlp()
  with pytest.raises(ValueError, match="eps must be positive"):
    make_fedexp(apply, client_optimizer=optax.sgd(0.1), eps=0.0, clients_per_round=2,
                batch_size=4, steps=1)


# --- FedRep --------------------------------------------------------------------------------


def test_fedrep_equals_loop_reference(uneven):
  apply, params = tiny_mlp()
  kwargs = dict(head=HEAD, client_optimizer=optax.sgd(0.3), head_optimizer=optax.sgd(0.5),
                head_steps=3, clients_per_round=4, batch_size=4, epochs=1)
  _, history, ref_history = compare_with_reference(
      make_fedrep(apply, **kwargs, client_chunk_size=2), ref.ReferenceFedRep(apply, **kwargs),
      uneven, params, stateful=True)
  for row, ref_row in zip(history, ref_history):
    assert row["head_train_loss"] == pytest.approx(ref_row["head_train_loss"], rel=1e-5)


def test_fedrep_through_coordinate_median_equals_loop_reference(uneven):
  apply, params = tiny_mlp()
  kwargs = dict(head=HEAD, client_optimizer=optax.sgd(0.3), head_epochs=1,
                clients_per_round=4, batch_size=4, steps=3)
  compare_with_reference(
      make_fedrep(apply, **kwargs, aggregator=robust.coordinate_median()),
      ref.ReferenceFedRep(apply, **kwargs, aggregator=agg_ref.Median()), uneven, params,
      stateful=True)


def head_rows(state):
  return {k: np.asarray(v) for k, v in state.client_states.items() if v is not None}


def test_fedrep_heads_change_only_when_their_client_is_sampled_and_aggregated(uneven):
  # Round by round: the sampled clients' heads move, every other head stays bit for bit;
  # under dropout, a sampled client that is dropped keeps its head too.
  apply, params = tiny_mlp()
  profiles = systems.make_profiles(6, examples_per_s=1e3, downlink_bytes_per_s=1e9,
                                   uplink_bytes_per_s=1e9)
  for config in (None, systems.SystemsConfig(profiles, dropout=0.5)):
    algorithm = make_fedrep(apply, head=HEAD, client_optimizer=optax.sgd(0.3), head_steps=2,
                            clients_per_round=2, batch_size=4, steps=2,
                            **({} if config is None else {"systems": config}))
    state = algorithm.init(params, jax.random.key(5), uneven.num_clients)
    initial = head_rows(state)
    np.testing.assert_array_equal(initial["w2"], np.broadcast_to(params["w2"], (6, 8, 3)))
    step, ever, dropped = jax.jit(algorithm.round), np.zeros(6, bool), 0
    for _ in range(3):
      before = head_rows(state)
      state, m = step(state, uneven)
      after = head_rows(state)
      trained = np.zeros(6, bool)
      trained[m["client_ids"]] = (True if config is None else np.asarray(m["client_aggregated"]))
      dropped += len(m["client_ids"]) - trained.sum()
      ever |= trained
      moved = np.abs(after["w2"] - before["w2"]).reshape(6, -1).max(1) > 0
      np.testing.assert_array_equal(moved, trained)
      for k in after:
        np.testing.assert_array_equal(after[k][~trained], before[k][~trained])
    assert not ever.all()  # some clients never trained: they hold the initial head
    for k in initial:
      np.testing.assert_array_equal(head_rows(state)[k][~ever], initial[k][~ever])
    # The server's copy of the head never moves; its body does.
    np.testing.assert_array_equal(np.asarray(state.params["w2"]), np.asarray(params["w2"]))
    assert float(jnp.abs(state.params["w1"] - params["w1"]).max()) > 0
    if config is not None:
      assert dropped > 0


def test_fedrep_body_is_fedavg_over_bodies(uneven):
  # With a head that does not train (head learning rate 0), a FedRep round is FedAvg whose
  # clients freeze the head: the server averages the body deltas and nothing else.
  apply, params = tiny_mlp()
  common = dict(clients_per_round=4, batch_size=4, epochs=1)
  fedrep_alg = make_fedrep(apply, head=HEAD, client_optimizer=optax.sgd(0.3),
                           head_optimizer=optax.sgd(0.0), **common)
  labels = {"w1": "body", "b1": "body", "w2": "head", "b2": "head"}
  frozen_head = optax.multi_transform({"body": optax.sgd(0.3), "head": optax.set_to_zero()},
                                      labels)
  fedavg = fs.fedavg(apply, client_optimizer=frozen_head, **common)
  key = jax.random.key(7)
  state, _ = run_rounds(fedrep_alg, fedrep_alg.init(params, key, uneven.num_clients), uneven, 2)
  fedavg_state, _ = run_rounds(fedavg, fedavg.init(params, key), uneven, 2)
  assert max_relative_error(state.params, fedavg_state.params) < 1e-6
  np.testing.assert_array_equal(np.asarray(state.client_states["w2"]),
                                np.broadcast_to(params["w2"], (6, 8, 3)))


def label_map_clients(seed=0, n=60):
  """Six clients that share features (three Gaussian clusters in R^5) but each name the
  clusters with its own permutation of the labels: one body fits all, no head does."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(3, 5)) * 2.0
  perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
  xs, ys = [], []
  for perm in perms:
    cluster = rng.integers(0, 3, n)
    xs.append((centers[cluster] + 0.3 * rng.normal(size=(n, 5))).astype(np.float32))
    ys.append(np.asarray(perm, np.int32)[cluster])
  return xs, ys


def test_fedrep_personal_heads_beat_the_global_model_on_different_label_maps():
  apply, params = tiny_mlp()
  xs, ys = label_map_clients()
  train_x, train_y, test_x, test_y = fs.split_clients(xs, ys, 0.4, seed=0)
  train = fs.from_clients(train_x, train_y, num_classes=3)
  test = fs.from_clients(test_x, test_y, num_classes=3)
  common = dict(client_optimizer=optax.sgd(0.3), clients_per_round=6, batch_size=10, epochs=1)
  algorithm = make_fedrep(apply, head=HEAD, head_epochs=2, **common)
  state, history = run_rounds(algorithm, algorithm.init(params, jax.random.key(0), 6), train, 30)
  personal = personalized_evaluator(apply, test)(state)
  fedavg = fs.fedavg(apply, **common)
  fedavg_state, _ = run_rounds(fedavg, fedavg.init(params, jax.random.key(0)), train, 30)
  shared = fs.make_evaluator(apply, client_test=test)(fedavg_state.params)
  assert shared["client_test_accuracy"] < 0.6
  assert personal["personal_client_test_accuracy"] > 0.9
  assert personal["personal_client_test_accuracy"] > shared["client_test_accuracy"] + 0.3
  assert history[-1]["head_train_loss"] < 0.5
  # The evaluator is client i's merged model on client i's split.
  heads = head_rows(state)
  merged = {"w1": state.params["w1"], "b1": state.params["b1"], "w2": heads["w2"][2],
            "b2": heads["b2"][2]}
  hits = np.argmax(np.asarray(apply(merged, jnp.asarray(test_x[2]))), -1) == test_y[2]
  one = personalized_evaluator(apply, fs.from_clients(test_x[2:3], test_y[2:3],
                                                             num_classes=3))
  row = jax.tree_util.tree_map(lambda a: a[2:3], state.client_states)
  assert one(state._replace(client_states=row))["personal_client_test_accuracy"] == (
      pytest.approx(hits.mean()))
  with pytest.raises(ValueError, match="rows for \\[5\\] clients"):
    personalized_evaluator(apply, test)(
        state._replace(client_states=jax.tree_util.tree_map(lambda a: a[:5], state.client_states)))


def test_fedrep_head_by_name_on_an_nnx_model_and_bad_heads(small_mlp):
  body, head = split("out", small_mlp.params)
  names = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                        jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert names(head) == {"['out']['bias'].value", "['out']['kernel'].value"}
  assert names(body) | names(head) == names(small_mlp.params) and not names(body) & names(head)
  restored = merge(body, head)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(small_mlp.params)):
    assert a is b
  for bad in ("nothing", ("fc1", "fc2", "out")):
    algorithm = make_fedrep(small_mlp.apply, head=bad, client_optimizer=optax.sgd(0.1),
                            clients_per_round=2, batch_size=4, steps=1)
    with pytest.raises(ValueError, match="needs a head and a body"):
      algorithm.init(small_mlp.params, jax.random.key(0), 6)


def test_fedrep_clients_not_aggregated_train_no_head_and_the_server_head_stays(uneven):
  # Clients 1, 3, 5 never respond: they trained their head anyway (discarded) and its
  # loss entered head_train_loss. Weight decay in the server's optimizer moved the
  # server's head, which "never moves".
  apply, params = tiny_mlp()
  profiles = systems.make_profiles(6, examples_per_s=1e3, downlink_bytes_per_s=1e9,
                                   uplink_bytes_per_s=1e9,
                                   availability=np.array([1.0, 0.0] * 3))
  algorithm = make_fedrep(apply, head=HEAD, client_optimizer=optax.sgd(0.3), head_steps=2,
                          clients_per_round=6, batch_size=4, steps=2,
                          server_optimizer=optax.adamw(0.1, weight_decay=0.5),
                          systems=systems.SystemsConfig(profiles))
  state = algorithm.init(params, jax.random.key(5), uneven.num_clients)
  state, m = jax.jit(algorithm.round)(state, uneven)
  aggregated, ids = np.asarray(m["client_aggregated"]), np.asarray(m["client_ids"])
  np.testing.assert_array_equal(aggregated, ids % 2 == 0)
  trained = np.asarray(m["client_head_num_trained"])
  assert np.all(trained[~aggregated] == 0) and np.all(trained[aggregated] > 0)
  loss_sum = np.asarray(m["client_head_loss_sum"])
  assert float(m["head_train_loss"]) == pytest.approx(
      loss_sum[aggregated].sum() / trained[aggregated].sum(), rel=1e-6)
  for k in HEAD:
    np.testing.assert_array_equal(np.asarray(state.params[k]), np.asarray(params[k]))
  assert float(jnp.abs(state.params["w1"] - params["w1"]).max()) > 0
  # Clients receive the body alone (their heads are their own): the downlink counted
  # the whole model.
  body = {k: v for k, v in params.items() if k not in HEAD}
  assert float(m["downlink_bytes"]) == 6 * model_bytes(body) == float(m["uplink_bytes"]) * 2


@pytest.mark.parametrize("schedule,match", [
    (dict(head_epochs=0), "head_epochs / head_steps: epochs must be a positive integer"),
    (dict(head_epochs=2, head_steps=3), "head_epochs / head_steps: give exactly one"),
])
def test_fedrep_bad_head_schedules_name_the_head_arguments(schedule, match):
  apply, _ = tiny_mlp()
  with pytest.raises(ValueError, match=match):
    make_fedrep(apply, head=HEAD, client_optimizer=optax.sgd(0.3), clients_per_round=2,
                batch_size=4, epochs=1, **schedule)


@pytest.mark.parametrize("schedule", [dict(epochs=1), dict(steps=2)])
def test_feddyn_with_a_client_without_examples_stays_finite(schedule):
  # Its weight over the mean is 0, and alpha / 0 * 0 made its g_k NaN (epochs=) and, with
  # steps= (steps on the regularizer alone), the model. Its loss is 0: from the server's
  # model with g_k = 0 it does not move, and g_k stays 0.
  apply, params = tiny_mlp()
  xs, ys = ragged_clients(sizes=(3, 0, 2, 4))
  data = fs.from_clients(xs, ys, num_classes=3, allow_empty=True)
  algorithm = fs.algorithms.feddyn(apply, alpha=0.3, client_optimizer=optax.sgd(0.1),
                                   clients_per_round=4, batch_size=2, **schedule)
  state = algorithm.init(params, jax.random.key(0), 4)
  for _ in range(2):
    state, _ = jax.jit(algorithm.round)(state, data)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state.params))
  for leaf in jax.tree_util.tree_leaves(state.client_states):
    np.testing.assert_array_equal(leaf[1], np.zeros_like(leaf[1]))
