"""The convolution formulations of fedjax_sim.conv agree with lax.conv, values and
gradients, unbatched and under every way vmap can batch them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import conv


def reference(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def loss(impl):
  # A nonlinear function of the output so that every gradient entry matters.
  return lambda x, k: jnp.sum(jnp.tanh(conv.conv2d_same(x, k, impl)) ** 2)


def ref_loss(x, k):
  return jnp.sum(jnp.tanh(reference(x, k)) ** 2)


def data(key, lead=(), channels=(3, 4)):
  kx, kk = jax.random.split(jax.random.key(key))
  cin, cout = channels
  return (jax.random.normal(kx, (*lead, 2, 6, 6, cin)),
          0.3 * jax.random.normal(kk, (*lead, 3, 3, cin, cout)))


# One input (or output) channel: the sequential forward (or input gradient) is a matmul
# of shifted copies.
CHANNELS = [(3, 4), (1, 4), (3, 1)]


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("impl", ["patches", "lax", "sequential", "auto"])
def test_values_and_gradients_match_lax(impl, channels):
  x, k = data(0, channels=channels)
  np.testing.assert_allclose(conv.conv2d_same(x, k, impl), reference(x, k), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(impl), argnums=(0, 1))(x, k)
  want = jax.grad(ref_loss, argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)])
def test_sequential_under_vmap_matches_lax(in_axes, channels):
  x, k = data(1, lead=(3,), channels=channels)
  x = x if in_axes[0] == 0 else x[0]
  k = k if in_axes[1] == 0 else k[0]
  for fn, ref in [(lambda a, b: conv.conv2d_same(a, b, "sequential"), reference),
                  (jax.grad(loss("sequential"), argnums=(0, 1)),
                   jax.grad(ref_loss, argnums=(0, 1)))]:
    got = jax.jit(jax.vmap(fn, in_axes=in_axes))(x, k)
    want = jax.vmap(ref, in_axes=in_axes)(x, k)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", CHANNELS + [(5, 7)])
def test_sequential_under_fedjax_sims_compiler_options_matches_plain_xla(channels):
  """Rounds compile with fedjax_sim.compile's options, which on jaxlib 0.11+ hand XLA:CPU's
  convolutions to YNNPACK: values and gradients, alone and over clients, still match
  lax.conv's compiled without them (x 7x7 with a 5x5 kernel: the kernel gradient is a
  convolution with a 7x7 window)."""
  from fedjax_sim import compile as compile_lib
  kx, kk = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (3, 2, 7, 7, channels[0]))
  k = 0.3 * jax.random.normal(kk, (3, 5, 5, *channels))
  both = lambda f: lambda a, b: (jax.vmap(f)(a, b), f(a[0], b[0]))
  got = compile_lib.jit(both(jax.value_and_grad(loss("sequential"), argnums=(0, 1))))(x, k)
  want = jax.jit(both(jax.value_and_grad(ref_loss, argnums=(0, 1))))(x, k)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", CHANNELS[:2])
def test_sequential_nested_vmap_and_scan(channels):
  x, k = data(2, lead=(2, 2), channels=channels)
  grad = jax.grad(loss("sequential"), argnums=1)

  def steps(x, k):  # a few SGD steps inside a scan, as local training runs them
    return jax.lax.scan(lambda k, _: (k - 0.1 * grad(x, k), None), k, None, length=3)[0]

  def ref_steps(x, k):
    for _ in range(3):
      k = k - 0.1 * jax.grad(ref_loss, argnums=1)(x, k)
    return k

  got = jax.jit(jax.vmap(jax.vmap(steps)))(x, k)
  want = jax.vmap(jax.vmap(ref_steps))(x, k)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sequential_runs_clients_one_by_one_not_as_a_grouped_conv():
  x, k = data(3, lead=(4,))
  jaxpr = str(jax.make_jaxpr(jax.vmap(jax.grad(loss("sequential"), argnums=1)))(x, k))
  assert "feature_group_count=1" in jaxpr and "feature_group_count=4" not in jaxpr
  assert "batch_group_count=4" not in jaxpr
  grouped = str(jax.make_jaxpr(jax.vmap(jax.grad(loss("lax"), argnums=1)))(x, k))
  assert "group_count=4" in grouped  # what XLA's own batching does instead


def test_bad_impl_and_kernel():
  x, k = data(0)
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    conv.conv2d_same(x, k, "fft")
  with pytest.raises(ValueError, match="square kernel of odd size"):
    conv.conv2d_same(x, jnp.zeros((2, 2, 3, 4)), "sequential")
  assert conv.resolve("auto") == ("sequential" if jax.default_backend() == "cpu" else "patches")


def test_add_bias_gradients_match_autodiff_also_under_vmap():
  """models.add_bias (its bias gradient a matrix-vector product of the materialized
  output gradient) against plain `y + b`, alone and vmapped over clients."""
  from fedjax_sim.models import add_bias
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32)
  loss = lambda add: lambda y, b: jnp.sum(jnp.tanh(add(y, b)) * w)
  want = jax.grad(loss(lambda y, b: y + b), argnums=(0, 1))(y, b)
  got = jax.grad(loss(add_bias), argnums=(0, 1))(y, b)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  ys, bs = jnp.stack([y, 2 * y]), jnp.stack([b, -b])
  batched = lambda add: jax.vmap(jax.grad(loss(add), argnums=(0, 1)))(ys, bs)
  for g, e in zip(batched(add_bias), batched(lambda y, b: y + b)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(4, 7), (2, 3, 7)])
def test_linear_dot_general_gradients_match_autodiff_also_under_vmap(x_shape):
  """models.linear_dot_general (the input gradient as (kernel @ g.T).T) against a plain
  dot, for a batch of rows and for rows with a time axis, alone and vmapped."""
  from fedjax_sim.models import linear_dot_general
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x_shape[:-1] + (5,)), jnp.float32)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  loss = lambda dot: lambda x, k: jnp.sum(jnp.tanh(dot(x, k, dims)) * w)
  np.testing.assert_allclose(linear_dot_general(x, k, dims), jax.lax.dot_general(x, k, dims),
                             rtol=1e-6)
  want = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, k)
  got = jax.grad(loss(linear_dot_general), argnums=(0, 1))(x, k)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  xs, ks = jnp.stack([x, 2 * x]), jnp.stack([k, -k])
  batched = lambda dot: jax.vmap(jax.grad(loss(dot), argnums=(0, 1)))(xs, ks)
  for g, e in zip(batched(linear_dot_general), batched(jax.lax.dot_general)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_linear_dot_general_computes_the_input_gradient_from_the_kernel_side(monkeypatch):
  """On CPU the compiled input gradient is kernel [7,5] @ g.T (the kernel contracted on
  its minor axis), not g @ kernel.T; elsewhere, and for other products, it is
  lax.dot_general itself."""
  from fedjax_sim import models
  x, k = jnp.ones((4, 7)), jnp.ones((7, 5))
  dims = (((1,), (0,)), ((), ()))
  input_grad = lambda: lambda x, k: jax.grad(  # a new function each time: no cached trace
      lambda x: jnp.sum(jnp.tanh(models.linear_dot_general(x, k, dims))))(x)
  if jax.default_backend() == "cpu":
    hlo = jax.jit(input_grad()).lower(x, k).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert any("f32[7,4]" in d and "lhs_contracting_dims={1}" in d for d in dots), dots
    assert not any("f32[4,7]" in d for d in dots), dots
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda x, k: models.linear_dot_general(x, k, (((0,), (0,)), ((), ()))))(x.T, k))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "custom_vjp" not in str(jax.make_jaxpr(input_grad())(x, k))


def test_mlp_layers_use_linear_dot_general_with_plain_layers_gradients(monkeypatch):
  """fs.mlp's three dense layers go through models.linear_dot_general on CPU (its rounds
  0.93-0.94x on jaxlib 0.12: benchmarks/results/compile_options_dense_cpu_jax012.md),
  and its gradients are those of the same MLP of plain `nnx.Linear` layers."""
  import optax

  import fedjax_sim as fs
  from fedjax_sim import models
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=6))
  loss_of = lambda model: lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, x), y).mean()
  ours = fs.mlp(seed=3)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss_of(ours)))(ours.params))
  assert jaxpr.count("custom_vjp_call") == (3 if jax.default_backend() == "cpu" else 0)
  monkeypatch.setattr(models, "linear_dot_general", jax.lax.dot_general)
  # A cache of initialization programs of its own: the MLP's was traced with the custom dot.
  monkeypatch.setattr(models, "_programs", functools.cache(models._programs.__wrapped__))
  plain = fs.mlp(seed=3)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(jax.grad(loss_of(plain)))(plain.params))
  got = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_of(ours)))(ours.params))
  want = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_of(plain)))(plain.params))
  assert len(got) == len(want) == 6
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_max_pool_gradient_goes_to_the_first_maximum():
  """Unique maxima: autodiff's gradient. Ties: all of it to the first maximum of the
  window, row by row (a hand-computed golden), where autodiff would split it."""
  from fedjax_sim.models import max_pool_2x2
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 2, 3, 3)), jnp.float32)
  plain = lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2,
                              x.shape[3]).max(axis=(2, 4))
  np.testing.assert_array_equal(max_pool_2x2(x), plain(x))
  got = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * w))(x)
  want = jax.grad(lambda x: jnp.sum(plain(x) * w))(x)
  np.testing.assert_array_equal(got, want)
  batched = jax.vmap(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * w[0])))(x[:, None])
  np.testing.assert_array_equal(batched[:, 0], jax.vmap(jax.grad(
      lambda x: jnp.sum(plain(x) * w[0])))(x[:, None])[:, 0])
  # Windows [[3, 3], [3, 1]], [[1, 3], [3, 3]], [[3, 1], [3, 3]], [[1, 1], [3, 3]]: the
  # gradient all to the first 3 of each.
  tie = jnp.asarray([[3.0, 3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0],
                     [3.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]).reshape(1, 2, 8, 1)
  grad = jax.grad(lambda x: jnp.sum(max_pool_2x2(x)) * 2.0)(tie)
  np.testing.assert_array_equal(grad.reshape(2, 8), [[2, 0, 0, 2, 2, 0, 0, 0],
                                                     [0, 0, 0, 0, 0, 0, 2, 0]])


def test_max_pool_drops_an_odd_last_row_and_column_as_valid_pooling_does():
  """Odd heights and widths: values of lax.reduce_window 'VALID', and its gradient, zero
  on the row and column no window covers."""
  from fedjax_sim.models import max_pool_2x2
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 7, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 3, 3)), jnp.float32)
  valid = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                          (1, 2, 2, 1), "VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), valid(x))
  got = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * w))(x)
  np.testing.assert_array_equal(got, jax.grad(lambda x: jnp.sum(valid(x) * w))(x))
  assert not np.any(got[:, 4]) and not np.any(got[:, :, 6])
  assert np.count_nonzero(got) == w.size  # one maximum per window
