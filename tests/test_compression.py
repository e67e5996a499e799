"""Compression: quantization is unbiased and on its grid, the rotation is an orthogonal
Hadamard transform, top-k keeps exactly k entries and error feedback loses nothing;
each agrees with its loop reference; wire bytes are reported."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_sim import aggregators, compression
import aggregation_reference as ref
from test_privacy import stacked, unstack


def test_hadamard_is_the_orthonormal_walsh_hadamard_matrix():
  x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  h = scipy.linalg.hadamard(16) / 4.0
  y = np.asarray(compression.hadamard(jnp.asarray(x)))
  np.testing.assert_allclose(y, x @ h.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(compression.hadamard(jnp.asarray(y))), x, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    compression.hadamard(jnp.zeros(12))


@pytest.mark.parametrize("bits", [1, 3])
def test_stochastic_quantization_is_unbiased_and_on_its_grid(bits):
  v = jnp.asarray(np.random.default_rng(1).normal(size=64), jnp.float32)
  draws = 4000
  q = np.asarray(jax.jit(jax.vmap(lambda k: compression.stochastic_quantize(v, bits, k)))(
      jax.random.split(jax.random.key(2), draws)), np.float64)
  lo, hi = float(v.min()), float(v.max())
  step = (hi - lo) / (2 ** bits - 1)
  # Every value is one of the 2^bits levels, and the neighbours of the input.
  levels = (q - lo) / step
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  assert np.all(np.abs(q - np.asarray(v)) <= step * (1 + 1e-5))
  # Unbiased: each coordinate's variance is at most step^2 / 4, so the mean of the draws
  # is within 5 standard errors of the input.
  bound = 5 * (step / 2) / np.sqrt(draws)
  assert np.max(np.abs(q.mean(axis=0) - np.asarray(v))) < bound


def test_rotated_quantization_is_unbiased():
  deltas = {"v": jnp.asarray(np.random.default_rng(3).normal(size=(1, 20)), jnp.float32)}
  stage = compression.quantize(2, rotation=True)
  decode = jax.jit(jax.vmap(lambda k: stage.apply(None, deltas, jnp.ones(1), jnp.arange(1), k)[0]))
  q = np.asarray(decode(jax.random.split(jax.random.key(4), 4000))["v"][:, 0], np.float64)
  spread = np.abs(q - np.asarray(deltas["v"][0])).max()
  assert spread > 0.1  # it is really quantized...
  assert np.max(np.abs(q.mean(axis=0) - np.asarray(deltas["v"][0]))) < 5 * spread / np.sqrt(4000)


@pytest.mark.parametrize("rotation", [False, True], ids=["plain", "rotated"])
def test_quantize_matches_loop_reference_and_reports_bytes(rotation):
  deltas = stacked(5, scales=np.ones(7))
  ids, key = jnp.array([4, 0, 9, 2, 7, 1, 3]), jax.random.key(6)
  out, _, _, metrics = jax.jit(compression.quantize(4, rotation=rotation).apply)(
      None, deltas, jnp.ones(7), ids, key)
  expected, _ = ref.Quantize(4, rotation)(unstack(deltas, 7), np.ones(7), np.asarray(ids), key)
  for i, e in enumerate(expected):
    for leaf in ("b", "w"):
      np.testing.assert_allclose(np.asarray(out[leaf][i]), e[leaf], rtol=1e-4, atol=1e-5)
  errors = [np.sum((ref.flat(e) - ref.flat(jax.tree_util.tree_map(lambda a: a[i], deltas))) ** 2)
            / np.sum(ref.flat(jax.tree_util.tree_map(lambda a: a[i], deltas)) ** 2)
            for i, e in enumerate(expected)]
  assert float(metrics["compression_error"]) == pytest.approx(np.mean(errors), rel=1e-3)
  # Over the clients whose update counts: a client with weight 0 (dropped under systems=)
  # sends a zero update, whose error of 0 diluted the mean.
  counts = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  _, _, _, metrics_counted = jax.jit(compression.quantize(4, rotation=rotation).apply)(
      None, deltas, jnp.asarray(counts, jnp.float32), ids, key)
  assert float(metrics_counted["compression_error"]) == pytest.approx(
      np.mean(np.asarray(errors)[counts]), rel=1e-3)
  d = 16  # 12 + 4 coordinates, a power of two already
  assert float(metrics["uplink_bytes"]) == 7 * (4 * d + 64) / 8
  assert float(metrics["bits_per_parameter"]) == pytest.approx((4 * d + 64) / d)


def test_top_k_keeps_exactly_k_and_error_feedback_loses_nothing():
  # Three rounds over overlapping subsets of 5 clients; each client's sent updates plus
  # its final residual add up to everything it was asked to send.
  k, num_clients = 3, 5
  stage = compression.top_k(k)
  loop = ref.TopK(k)
  apply = jax.jit(stage.apply)
  state = stage.init({"b": jnp.zeros(4), "w": jnp.zeros((3, 4))}, num_clients)
  owed = np.zeros((num_clients, 16))
  sent_total = np.zeros((num_clients, 16))
  for r, ids in enumerate([[0, 1, 2], [2, 3, 4], [4, 0, 2]]):
    deltas = stacked(10 + r, num_clients=3, scales=np.ones(3))
    out, _, state, metrics = apply(state, deltas, jnp.ones(3), jnp.array(ids), jax.random.key(r))
    expected, _ = loop(unstack(deltas, 3), np.ones(3), np.array(ids), None)
    for c, i in enumerate(ids):
      sent = ref.flat(jax.tree_util.tree_map(lambda a: a[c], out))
      assert np.count_nonzero(sent) == k
      np.testing.assert_allclose(sent, ref.flat(expected[c]), rtol=1e-6)
      owed[i] += ref.flat(jax.tree_util.tree_map(lambda a: a[c], deltas))
      sent_total[i] += sent
    assert float(metrics["uplink_bytes"]) == 3 * k * 8
  residual = np.asarray(state.residual)
  np.testing.assert_allclose(sent_total + residual, owed, rtol=1e-5, atol=1e-6)
  for i, row in loop.residual.items():
    np.testing.assert_allclose(residual[i], row, rtol=1e-5, atol=1e-6)


def test_a_client_of_weight_zero_keeps_what_it_could_not_send():
  # Its upload counts for nothing in the mean (no examples this round), so its residual
  # must keep it all: it forgot what the mean discarded.
  stage = compression.top_k(1)
  state = stage.init({"w": jnp.zeros(3)}, 2)
  first = {"w": jnp.asarray([[1.0, 0.4, 0.3], [1.0, 0.4, 0.3]])}
  _, _, state, _ = stage.apply(state, first, jnp.ones(2), jnp.arange(2), None)
  np.testing.assert_allclose(np.asarray(state.residual), [[0.0, 0.4, 0.3]] * 2, rtol=1e-6)
  zero = {"w": jnp.zeros((2, 3))}
  _, _, state, _ = stage.apply(state, zero, jnp.asarray([1.0, 0.0]), jnp.arange(2), None)
  np.testing.assert_allclose(np.asarray(state.residual), [[0.0, 0.0, 0.3], [0.0, 0.4, 0.3]],
                             rtol=1e-6)


def test_top_k_without_error_feedback_keeps_the_largest():
  deltas = {"v": jnp.array([[0.1, -5.0, 2.0, 0.3, -0.2]])}
  out, _, state, _ = compression.top_k(fraction=0.4, error_feedback=False).apply(
      None, deltas, jnp.ones(1), jnp.arange(1), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out["v"]), [[0.0, -5.0, 2.0, 0.0, 0.0]])
  assert state is None


@pytest.mark.parametrize("make,match", [
    (lambda: compression.quantize(0), "bits must be an integer in"),
    (lambda: compression.quantize(17), "bits must be an integer in"),
    (lambda: compression.top_k(), "exactly one of k= or fraction="),
    (lambda: compression.top_k(0), "k must be a positive integer"),
    (lambda: compression.top_k(fraction=1.5), "fraction must lie in"),
    (lambda: compression.top_k(20).init({"v": jnp.zeros(5)}, 3), "only 5 coordinates"),
    (lambda: compression.top_k(2).init({"v": jnp.zeros(5)}, None), "pass num_clients"),
])
def test_bad_compression_configurations(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("make", [lambda: compression.quantize(4),
                                  lambda: compression.top_k(3, error_feedback=False)])
def test_scalars_beside_the_update_go_exact_and_are_counted_as_float32(make):
  # FedNova's gradient weight (about the number of local steps) beside its update: coded
  # with it, it set the quantizer's range (nearly every coordinate rounded to 0 or to a
  # step of 0.67 at 4 bits) and dominated the error metric.
  stage = make()
  update = stacked(5)
  deltas = {"normalized_delta": update, "gradient_weight": jnp.arange(7.0) + 10.0}
  one = jax.tree_util.tree_map(lambda a: a[0], deltas)
  out, _, _, metrics = stage.apply(stage.init(one, 7), deltas, jnp.ones(7), jnp.arange(7),
                                   jax.random.key(0))
  np.testing.assert_array_equal(out["gradient_weight"], deltas["gradient_weight"])
  alone, _, _, alone_metrics = stage.apply(stage.init(one["normalized_delta"], 7), update,
                                           jnp.ones(7),
                                           jnp.arange(7), jax.random.key(0))
  for a, b in zip(jax.tree_util.tree_leaves(out["normalized_delta"]),
                  jax.tree_util.tree_leaves(alone)):
    np.testing.assert_array_equal(a, b)  # the update coded exactly as without the scalar
  assert metrics["compression_error"] == alone_metrics["compression_error"]
  assert metrics["uplink_bytes"] == alone_metrics["uplink_bytes"] + 7 * 4
  d = 3 * 4 + 4
  chain = aggregators.chain(stage, aggregators.mean())
  assert compression.uplink_bytes_per_client(chain, d, 1) == (
      compression.uplink_bytes_per_client(chain, d) + 4)


def test_a_client_twice_in_one_call_gets_other_draws():
  """FedBuff's buffer may hold two updates of one fast client: the repeat gets its own
  key (its repeat count folded in), the first keeps fold_in(key, id) as every synchronous
  round's clients do."""
  key = jax.random.key(5)
  keys = aggregators.client_keys(key, jnp.array([3, 5, 3, 3, 7, 5, 0]))
  data = jax.random.key_data
  for i, cid in ((0, 3), (1, 5), (4, 7), (6, 0)):
    np.testing.assert_array_equal(data(keys[i]), data(jax.random.fold_in(key, cid)))
  assert len({tuple(np.asarray(data(k)).tolist()) for k in keys}) == 7
  x = jnp.linspace(-1.0, 1.0, 32)
  decoded, *_ = compression.quantize(1).apply(None, {"w": jnp.stack([x, x])}, jnp.ones(2),
                                              jnp.array([0, 0]), key)
  assert not np.array_equal(decoded["w"][0], decoded["w"][1])

