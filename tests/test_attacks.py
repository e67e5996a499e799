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
