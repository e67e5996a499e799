"""Attacks inside the vectorized round, and whole rounds with attacks, privacy,
compression and secure aggregation against the loop reference on the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators, attacks, compression, privacy, robust
from fedjax_sim import secure_aggregation as sa
import aggregation_reference as ref
from conftest import max_relative_error
from test_privacy import stacked, unstack

MALICIOUS = np.array([False, True, False, True, False, False])  # clients 1 and 3 of 6
BACKDOOR = attacks.Backdoor(features=(0, 2), value=3.0, target=0, poison_fraction=0.5)


def test_choose_malicious_and_its_errors():
  mask = attacks.choose_malicious(30, 0.2, seed=1)
  assert mask.sum() == 6 and mask.dtype == bool
  np.testing.assert_array_equal(mask, attacks.choose_malicious(30, 0.2, seed=1))
  assert attacks.choose_malicious(5, count=0).sum() == 0
  with pytest.raises(ValueError, match=r"more malicious clients \(12\) than clients \(10\)"):
    attacks.choose_malicious(10, count=12)
  with pytest.raises(ValueError, match="fraction must lie in"):
    attacks.choose_malicious(10, 1.5)


def test_label_flip_and_backdoor_poison_only_malicious_clients():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(40, 5)), jnp.float32)
  y = jnp.arange(40) % 3
  flip = attacks.label_flip(MALICIOUS, 3)
  np.testing.assert_array_equal(flip(x, y, 40, 1, None)[1], 2 - y)
  np.testing.assert_array_equal(flip(x, y, 40, 0, None)[1], y)
  poison = jax.jit(attacks.backdoor_data(MALICIOUS, BACKDOOR))
  key = jax.random.key(0)
  px, py, n = poison(x, y, 40, 3, key)
  hit = np.asarray(py != y) | np.asarray(jnp.any(px != x, axis=1))
  assert 8 < hit.sum() < 32  # about half of the examples
  np.testing.assert_array_equal(np.asarray(px)[hit][:, [0, 2]], 3.0)
  np.testing.assert_array_equal(np.asarray(py)[hit], 0)
  np.testing.assert_array_equal(np.asarray(px)[~hit], np.asarray(x)[~hit])
  hx, hy, _ = poison(x, y, 40, 2, key)  # an honest client is untouched
  np.testing.assert_array_equal(hx, x)
  np.testing.assert_array_equal(hy, y)
  # Padding cannot change which real examples are poisoned.
  qx, qy, _ = poison(jnp.pad(x[:30], ((0, 20), (0, 0))), jnp.pad(y[:30], (0, 20)), 30, 3, key)
  np.testing.assert_array_equal(qx[:30], px[:30])
  np.testing.assert_array_equal(qy[:30], py[:30])


def test_malicious_per_round_are_the_first_k_sampled(small_mlp, count_compiles):
  stage = attacks.scaling(2, 10.0)
  deltas, ids = stacked(2, num_clients=4), jnp.array([5, 0, 3, 1])
  out, _, _, metrics = stage.apply(stage.init(None, None), deltas, jnp.ones(4), ids, None)
  expected, _ = ref.Scale(2, 10.0)(unstack(deltas, 4), np.ones(4), np.asarray(ids), None)
  for i in range(4):
    np.testing.assert_allclose(ref.flat(jax.tree_util.tree_map(lambda a: a[i], out)),
                               ref.flat(expected[i]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["w"][:2]), 10 * np.asarray(deltas["w"][:2]))
  np.testing.assert_array_equal(np.asarray(out["w"][2:]), np.asarray(deltas["w"][2:]))
  assert int(metrics["malicious_sampled"]) == 2
  before = count_compiles()
  with pytest.raises(ValueError, match=r"more malicious clients per round \(12\) than clients "
                                       r"sampled per round \(10\)"):
    fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=10,
              batch_size=4, epochs=1,
              aggregator=aggregators.chain(attacks.sign_flip(12), aggregators.mean()))
  assert count_compiles() == before


@pytest.mark.parametrize("name", ["sign_flip", "scaling", "model_replacement"])
def test_model_poisoning_matches_loop_reference(name):
  stage, loop = {
      "sign_flip": (attacks.sign_flip(MALICIOUS, 2.0), ref.Scale(MALICIOUS, -2.0)),
      "scaling": (attacks.scaling(MALICIOUS, 10.0), ref.Scale(MALICIOUS, 10.0)),
      "model_replacement": (attacks.model_replacement(MALICIOUS, 0.5),
                            ref.Scale(MALICIOUS, None, 0.5)),
  }[name]
  deltas, ids = stacked(1, num_clients=4), jnp.array([0, 3, 5, 2])
  weights = jnp.array([3.0, 1.0, 2.0, 4.0])
  out, _, _, metrics = stage.apply(stage.init(None, None), deltas, weights, ids,
                                  jax.random.key(0))
  expected, _ = loop(unstack(deltas, 4), np.asarray(weights), np.asarray(ids), None)
  for i in range(4):
    np.testing.assert_allclose(ref.flat(jax.tree_util.tree_map(lambda a: a[i], out)),
                               ref.flat(expected[i]), rtol=1e-6)
  assert int(metrics["malicious_sampled"]) == 1
  if name == "model_replacement":
    # With server lr 0.5 the new model is G + 0.5 * mean: the attacker's own update lands
    # whole, plus the honest clients' weighted share.
    mean, _, _ = aggregators.mean().aggregate(None, out, weights, ids, None)
    honest = sum(float(w) * ref.flat(jax.tree_util.tree_map(lambda a: a[i], deltas))
                 for i, w in enumerate(weights) if i != 1) / float(weights.sum())
    attacker = ref.flat(jax.tree_util.tree_map(lambda a: a[1], deltas))
    np.testing.assert_allclose(0.5 * ref.flat(mean), attacker + 0.5 * honest, rtol=1e-5)


@pytest.mark.parametrize("stage,loop", [
    (attacks.sign_flip(MALICIOUS, 2.0), ref.Scale(MALICIOUS, -2.0)),
    (attacks.scaling(MALICIOUS, 10.0), ref.Scale(MALICIOUS, 10.0)),
    (attacks.model_replacement(MALICIOUS, 0.5), ref.Scale(MALICIOUS, None, 0.5)),
], ids=["sign_flip", "scaling", "model_replacement"])
def test_model_poisoning_leaves_the_scalars_beside_the_update(stage, loop):
  # FedNova's upload: a flipped gradient weight would flip tau_eff with the update, a
  # boosted one boost the model twice. The loop reference scales the update alone too.
  deltas = {"normalized_delta": stacked(1, num_clients=4),
            "gradient_weight": jnp.array([5.0, 3.0, 5.0, 2.0])}
  ids, weights = jnp.array([0, 3, 5, 2]), jnp.array([3.0, 1.0, 2.0, 4.0])
  out, _, _, metrics = stage.apply(stage.init(None, None), deltas, weights, ids,
                                  jax.random.key(0))
  assert int(metrics["malicious_sampled"]) == 1  # client 3, second in the round
  np.testing.assert_array_equal(np.asarray(out["gradient_weight"]), [5.0, 3.0, 5.0, 2.0])
  factor = (np.asarray(out["normalized_delta"]["w"][1]) / np.asarray(
      deltas["normalized_delta"]["w"][1])).ravel()
  assert np.ptp(factor) < 1e-5 and abs(factor[0] - 1.0) > 0.5
  expected, _ = loop(unstack(deltas, 4), np.asarray(weights), np.asarray(ids), None)
  for i in range(4):
    np.testing.assert_allclose(ref.flat(jax.tree_util.tree_map(lambda a: a[i], out)),
                               ref.flat(expected[i]), rtol=1e-6)


def test_backdoor_accuracy_is_the_triggered_target_rate():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, 50)
  apply = lambda p, x: x @ p
  evaluate = attacks.backdoor_evaluator(apply, x, y, attacks.Backdoor((1,), 10.0, target=2))
  backdoored = np.zeros((4, 3), np.float32)
  backdoored[1, 2] = 5.0  # feature 1 votes for class 2
  assert evaluate(jnp.asarray(backdoored)) == {"backdoor_accuracy": 1.0}
  clean = np.zeros((4, 3), np.float32)
  clean[:, 0] = 1.0  # always class 0
  assert evaluate(jnp.asarray(clean))["backdoor_accuracy"] == 0.0


def test_malicious_mask_must_cover_the_data(ragged, small_mlp, count_compiles):
  _, _, train = ragged
  algorithm = fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                        batch_size=4, steps=1, aggregator=aggregators.chain(
                            attacks.sign_flip(np.zeros(9, bool)), aggregators.mean()))
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  before = count_compiles()
  with pytest.raises(ValueError, match="mask covers 9 clients but the data has 6"):
    fs.run(algorithm, state, train, rounds=1, progress=False)
  assert count_compiles() == before


@pytest.fixture(scope="module")
def logreg():
  return fs.models.logistic_regression(num_features=5, num_classes=3, seed=2)


@pytest.mark.parametrize("num_classes", [0, 1, -5, True, 2.0])
def test_label_flip_refuses_a_num_classes_that_is_no_class_count(num_classes):
  with pytest.raises(ValueError, match=r"label_flip: num_classes must be an integer >= 2, got"):
    attacks.label_flip(MALICIOUS, num_classes)


def test_data_attacks_validate_against_the_data_and_the_model(ragged, logreg):
  # The engine's `validate` would call these; here they are called as it would.
  _, _, train = ragged  # 6 clients, 5 features, labels 0..2
  attacks.label_flip(MALICIOUS, 3).validate(logreg.apply, logreg.params, train)
  attacks.backdoor_data(MALICIOUS, BACKDOOR).validate(logreg.apply, logreg.params, train)
  for bad, match in [
      (attacks.label_flip(np.array([False, True]), 3),
       "the malicious-client mask covers 2 clients but the data has 6"),
      (attacks.label_flip(MALICIOUS, 10), "num_classes=10 but the model has 3 outputs"),
      (attacks.label_flip(MALICIOUS, 2), "num_classes=2 but the data's labels go up to 2"),
      (attacks.backdoor_data(MALICIOUS, BACKDOOR._replace(target=7)),
       "the backdoor's target is 7 but the model has 3 outputs"),
      (attacks.backdoor_data(MALICIOUS, BACKDOOR._replace(features=(4, 5))),
       r"features index the flattened example, of 5 values \(shape \(5,\)\), but go up to 5"),
      (attacks.compose_data(attacks.label_flip(MALICIOUS, 3),
                            attacks.backdoor_data(np.ones(7, bool), BACKDOOR)),
       "mask covers 7 clients but the data has 6")]:
    with pytest.raises(ValueError, match=match):
      bad.validate(logreg.apply, logreg.params, train)


def test_an_algorithm_validates_its_data_attack_before_compiling(ragged, logreg):
  _, _, train = ragged
  algorithm = fs.fedavg(logreg.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                        batch_size=4, epochs=1,
                        client_data_transform=attacks.label_flip(MALICIOUS, 10))
  state = algorithm.init(logreg.params, jax.random.key(0))
  with pytest.raises(ValueError, match="num_classes=10 but the model has 3 outputs"):
    fs.run(algorithm, state, train, rounds=1, progress=False)


def test_a_client_past_a_short_mask_is_not_malicious():
  # Plain indexing clamps: client 4 read mask[1] and was poisoned.
  x, y = jnp.ones((6, 5)), jnp.arange(6) % 3
  short = np.array([False, True])
  flip = attacks.label_flip(short, 3)
  np.testing.assert_array_equal(flip(x, y, 6, 1, None)[1], 2 - y)
  np.testing.assert_array_equal(flip(x, y, 6, 4, None)[1], y)
  poison = attacks.backdoor_data(short, BACKDOOR._replace(poison_fraction=1.0))
  px, py, _ = poison(x, y, 6, 4, jax.random.key(0))
  np.testing.assert_array_equal(px, x)
  np.testing.assert_array_equal(py, y)


@pytest.mark.parametrize("backdoor,match", [
    (BACKDOOR._replace(target=-3), r"target must be a class index \(an integer >= 0\), got -3"),
    (BACKDOOR._replace(target=True), "target must be a class index"),
    (BACKDOOR._replace(features=()), "features must be a non-empty list of indices >= 0"),
    (BACKDOOR._replace(features=(0, -1)), "features must be a non-empty list of indices >= 0"),
    (BACKDOOR._replace(features=(0.5,)), "features must be a non-empty list of indices >= 0"),
    (BACKDOOR._replace(value=float("nan")), "value must be a finite number"),
])
def test_backdoor_fields_are_checked_up_front(backdoor, match):
  with pytest.raises(ValueError, match=match):
    attacks.backdoor_data(MALICIOUS, backdoor)
  with pytest.raises(ValueError, match=match):
    attacks.backdoor_evaluator(lambda p, x: x, np.zeros((4, 5)), np.ones(4, int), backdoor)


def test_a_trigger_past_the_example_is_refused_not_dropped():
  # The scatter dropped index 100: no trigger stamped, a backdoor accuracy of 0.
  far = BACKDOOR._replace(features=(0, 100))
  match = r"features index the flattened example, of 10 values \(shape \(2, 5\)\), but go up to 100"
  with pytest.raises(ValueError, match=match):
    jax.jit(attacks.backdoor_data(MALICIOUS, far))(  # while tracing: before compiling
        jnp.zeros((4, 2, 5)), jnp.zeros(4, int), 4, 1, jax.random.key(0))
  with pytest.raises(ValueError, match=match):
    attacks.backdoor_evaluator(lambda p, x: x, np.zeros((4, 2, 5)), np.ones(4, int), far)


@pytest.mark.parametrize("make", [
    lambda: attacks.sign_flip(True), lambda: attacks.scaling(True, 2.0),
    lambda: attacks.model_replacement(True), lambda: attacks.sign_flip(MALICIOUS, True),
    lambda: attacks.choose_malicious(True, count=1), lambda: attacks.choose_malicious(6, count=True),
    lambda: attacks.choose_malicious(6, count=1, seed=True)])
def test_bools_are_not_integers_or_factors(make):
  with pytest.raises(ValueError, match="must be an? (positive )?(integer|finite number)"):
    make()


SCENARIOS = {
    # data poisoning + model poisoning + compression with error feedback + DP
    "privacy_compression": (
        lambda: attacks.label_flip(MALICIOUS, 3),
        lambda: aggregators.chain(
            attacks.sign_flip(MALICIOUS), compression.top_k(fraction=0.5),
            compression.quantize(6, rotation=True),
            privacy.dp_mean(0.5, 0.2, adaptive=privacy.AdaptiveClipping(count_stddev=1.0))),
        lambda: ref.Chain(ref.Scale(MALICIOUS, -1.0), ref.TopK(fraction=0.5),
                          ref.Quantize(6, True), ref.DPMean(0.5, 0.2, 0.5, 0.2, 1.0))),
    # backdoor with model replacement against norm bounding, secure aggregation and noise
    "backdoor_secagg": (
        lambda: attacks.backdoor_data(MALICIOUS, BACKDOOR),
        lambda: aggregators.chain(
            attacks.model_replacement(MALICIOUS), robust.norm_bound(1.0),
            sa.secure_mean(bits=16, clip_range=1.0, dropout=0.3, threshold=2),
            privacy.gaussian_noise(0.01)),
        lambda: ref.Chain(ref.Scale(MALICIOUS), ref.Clip(1.0), ref.SecureMean(16, 1.0, 0.3, 2),
                          ref.GaussianNoise(0.01))),
}


KWARGS = dict(client_optimizer=optax.sgd(0.5), clients_per_round=4, batch_size=4, steps=3)


@pytest.fixture(scope="module")
def reference(logreg):
  """One loop reference for every scenario, so that its per-batch steps compile once;
  each scenario sets its own aggregator and data hook."""
  return fs.ReferenceFedAvg(logreg.apply, **KWARGS)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rounds_with_attacks_and_defences_equal_the_loop_reference(ragged, logreg, reference,
                                                                   scenario, count_compiles):
  _, _, train = ragged
  hook, make_agg, make_ref = SCENARIOS[scenario]
  algorithm = fs.fedavg(logreg.apply, aggregator=make_agg(), client_data_transform=hook(),
                        **KWARGS)
  reference.aggregator, reference.client_data_transform = make_ref(), jax.jit(hook())
  key = jax.random.key(11)
  dp = scenario == "privacy_compression"
  accountant = privacy.DPAccountant(0.2, 4, 6, 1e-3, orders=(2, 4, 8, 16)) if dp else None
  state, history = fs.run(algorithm, algorithm.init(logreg.params, key, num_clients=6), train,
                          rounds=3, rounds_per_chunk=3, progress=False, round_metrics=accountant)
  ref_state, ref_history = reference.run(reference.init(logreg.params, key), train, 3)
  if dp:  # the privacy spent so far is in every round's metrics (host side, dp-accounting)
    assert [r["epsilon"] for r in history] == [accountant.epsilon(r) for r in (1, 2, 3)]
  assert max_relative_error(state.params, ref_state.params) < 1e-4
  for row, ref_row in zip(history, ref_history):
    np.testing.assert_array_equal(row["client_ids"], ref_row["client_ids"])
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-4)
  assert max_relative_error(state.params, logreg.params) > 1e-2
  assert sum(r["malicious_sampled"] for r in history) > 0  # the attack took part
  d = 18  # 5 x 3 weights + 3 biases
  assert history[0]["downlink_bytes"] == 4 * d * 4
  if scenario == "privacy_compression":  # the last encoder is the 6-bit quantizer (d -> 32)
    assert history[0]["uplink_bytes"] == 4 * (6 * 32 + 64) / 8
  else:  # 32-bit ring elements from each survivor
    assert all(r["uplink_bytes"] == r["secagg_survivors"] * d * 4 for r in history)
  if dp:
    # A sweep swaps the malicious set and the noise multiplier in the state: the compiled
    # round is reused, and the attack and the noise really changed.
    first, *middle, last = state.aggregator_state
    swept = state._replace(aggregator_state=(
        jnp.zeros_like(first), *middle, last._replace(noise_multiplier=jnp.float32(0.0))))
    before = count_compiles()
    _, again = fs.run(algorithm, swept, train, rounds=3, rounds_per_chunk=3, progress=False)
    assert count_compiles() == before
    assert all(r["malicious_sampled"] == 0 and r["noise_stddev"] == 0 for r in again)
