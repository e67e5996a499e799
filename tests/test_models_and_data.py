"""Models (parameter counts, conv formulations), data building, Synthetic(alpha, beta)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_sim as fs
from fedjax_sim import models


def test_paper_parameter_counts():
  count = lambda make: fs.num_params(nnx.state(nnx.eval_shape(make), nnx.Param))  # no init compute
  assert count(lambda: models.MLP(rngs=nnx.Rngs(0))) == 199_210
  assert count(lambda: models.CNN(rngs=nnx.Rngs(0))) == 1_663_370
  assert count(lambda: models.LogisticRegression(60, 10, rngs=nnx.Rngs(0))) == 610


def test_patches_conv_equals_lax_conv():
  conv = models.Conv(3, 8, 5, impl="patches", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  got = conv(x)
  want = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["patches", "sequential"])
def test_cnn_impls_agree_under_vmap_over_client_weights(impl):
  a, b = models.cnn(conv_impl=impl, seed=0), models.cnn(conv_impl="lax", seed=0)
  stacked = jax.tree_util.tree_map(lambda p: jnp.stack([p, 2 * p]), a.params)
  x = jax.random.normal(jax.random.key(0), (2, 3, 28, 28, 1))
  got = jax.vmap(a.apply)(stacked, x)
  want = jax.vmap(b.apply)(stacked, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["lax", "patches", "sequential"])
def test_cnn_takes_uint8_images_with_every_impl(impl):
  # lax.conv refused uint8 beside a float32 kernel ("lax", "sequential": CPU's default),
  # while "patches" (GPU's) took them: one model, one device fails.
  model = models.cnn(conv_impl=impl, seed=0)
  x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
  np.testing.assert_allclose(model.apply(model.params, jnp.asarray(x)),
                             model.apply(model.params, jnp.asarray(x, jnp.float32)), rtol=1e-6)


class _Filled(nnx.Module):
  def __init__(self, value, *, rngs):
    del rngs
    self.w = nnx.Param(jnp.full((2,), value))

  def __call__(self, x):
    return x * self.w[...]


def test_init_programs_are_kept_by_argument_types_too():
  # 1 == 1.0 == True as keys: the architecture built with 1.0 reused 1's program and
  # came back int32.
  assert jax.tree_util.tree_leaves(models.build(_Filled, 1, seed=0).params)[0].dtype == jnp.int32
  assert jax.tree_util.tree_leaves(models.build(_Filled, 1.0, seed=0).params)[0].dtype == jnp.float32
  # and as keyword arguments (a key of its own: built with 1 first, then 1.0)
  assert jax.tree_util.tree_leaves(models.build(_Filled, value=1, seed=0).params)[0].dtype \
      == jnp.int32
  assert jax.tree_util.tree_leaves(models.build(_Filled, value=1.0, seed=0).params)[0].dtype \
      == jnp.float32


def test_mixed_precision_refuses_a_compute_dtype_that_is_not_floating():
  # int8 or bool made every gradient 0: training that never moved.
  for dtype in (jnp.int8, jnp.int32, bool):
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
      models.mixed_precision(models.mlp(4, 3), dtype)


def test_a_users_own_pure_apply_function_works():
  # Not nnx at all: a dict of arrays and a function.
  apply = lambda p, x: x @ p["w"] + p["b"]
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  xs = [np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)] * 2
  train = fs.from_clients(xs, [np.arange(6) % 3] * 2, num_classes=3)
  algorithm = fs.fedavg(apply, client_optimizer=optax.sgd(0.5), clients_per_round=2, batch_size=3,
                        steps=1)
  state, metrics = jax.jit(algorithm.round)(algorithm.init(params, jax.random.key(0)), train)
  assert float(jnp.abs(state.params["w"]).sum()) > 0
  assert float(metrics["train_loss"]) == pytest.approx(np.log(3), rel=1e-3)  # first step at zero


def test_from_clients_pads_and_counts():
  data = fs.from_clients([np.ones((2, 3)), np.ones((5, 3))], [np.zeros(2, int), np.ones(5, int)])
  assert data.x.shape == (2, 5, 3) and data.y.shape == (2, 5)
  np.testing.assert_array_equal(data.counts, [2, 5])
  assert float(jnp.abs(data.x[0, 2:]).sum()) == 0.0
  assert data.padding_efficiency == pytest.approx(7 / 10)
  x, y = data.client(0)
  assert x.shape == (2, 3) and y.shape == (2,)
  assert fs.from_clients([np.ones((2, 3))], [np.zeros(2, int)], pad_to=4).max_examples == 4
  with pytest.raises(ValueError, match="pad_to=1 is smaller than the largest client"):
    fs.from_clients([np.ones((2, 3))], [np.zeros(2, int)], pad_to=1)


@pytest.mark.parametrize("small_pages", [False, True])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_from_clients_hands_the_device_aligned_arrays_it_can_keep(monkeypatch, x_dtype,
                                                                 small_pages):
  """The padded arrays start on a 64-byte boundary, so on CPU `jax.device_put` keeps
  them as the device buffers instead of copying the whole dataset; large ones (here
  every one) are zeroed `mmap`s of small pages, the same arrays."""
  import mmap

  from fedjax_sim import data as data_lib
  if small_pages:
    if not hasattr(mmap, "MADV_NOHUGEPAGE"):
      pytest.skip("no madvise(MADV_NOHUGEPAGE) on this platform")
    monkeypatch.setattr(data_lib, "_SMALL_PAGES_BYTES", 1)
  put = []
  real = data_lib.jax.device_put
  monkeypatch.setattr(data_lib.jax, "device_put", lambda tree: put.append(tree) or real(tree))
  xs = [np.full((n, 3, 2), n, np.float32) for n in (3, 1, 4)]
  data = fs.from_clients(xs, [np.arange(n) % 2 for n in (3, 1, 4)], x_dtype=x_dtype)
  host_x, host_y, _ = put[0]
  assert host_x.ctypes.data % 64 == 0 and host_y.ctypes.data % 64 == 0
  assert host_x.dtype == x_dtype and host_x.shape == (3, 4, 3, 2)
  base = host_x
  while isinstance(base, np.ndarray):
    base = base.base
  assert isinstance(getattr(base, "obj", base), mmap.mmap) == small_pages
  np.testing.assert_array_equal(np.asarray(data.x)[1], [np.full((3, 2), 1)] + [np.zeros((3, 2))] * 3)
  np.testing.assert_array_equal(np.asarray(data.y)[0], [0, 1, 0, 0])
  if jax.default_backend() == "cpu":
    assert data.x.unsafe_buffer_pointer() == host_x.ctypes.data  # no copy made


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_from_clients_fills_blocks_of_clients_on_threads_as_one_thread_does(monkeypatch, threads):
  """Large datasets are copied a block of clients per thread: the same arrays, ragged
  clients, casts and all, whether the clients split evenly over the threads or not."""
  from fedjax_sim import data as data_lib
  rng = np.random.default_rng(0)
  sizes = [3, 1, 4, 1, 5, 9, 2]
  xs = [rng.normal(size=(n, 2, 3)) for n in sizes]  # float64, cast to float32
  ys = [rng.integers(0, 5, n) for n in sizes]
  one = fs.from_clients(xs, ys)
  monkeypatch.setattr(data_lib, "_PARALLEL_FILL_BYTES", 0)
  monkeypatch.setattr(data_lib.os, "sched_getaffinity", lambda pid: set(range(threads)),
                      raising=False)
  blocks = []
  real = data_lib.ThreadPoolExecutor.map
  monkeypatch.setattr(data_lib.ThreadPoolExecutor, "map",
                      lambda self, f, parts: blocks.append(list(parts)) or real(self, f, blocks[-1]))
  many = fs.from_clients(xs, ys)
  assert [len(b) for b in blocks[0]] == [len(b) for b in np.array_split(range(7), min(threads, 7))]
  np.testing.assert_array_equal(np.asarray(many.x), np.asarray(one.x))
  np.testing.assert_array_equal(np.asarray(many.y), np.asarray(one.y))
  for i, (x, y) in enumerate(zip(xs, ys)):
    np.testing.assert_array_equal(np.asarray(many.x[i, :len(x)]), x.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(many.y[i, :len(y)]), y)


def test_split_clients_keeps_every_example_once():
  xs = [np.arange(n)[:, None].astype(np.float32) for n in (1, 5, 10)]
  ys = [np.zeros(n, int) for n in (1, 5, 10)]
  tr_x, _, te_x, _ = fs.split_clients(xs, ys, 0.2, seed=0)
  for x, a, b in zip(xs, tr_x, te_x):
    assert len(a) >= 1
    assert sorted(np.concatenate([a, b])[:, 0]) == sorted(x[:, 0])
  assert [len(b) for b in te_x] == [0, 1, 2]


def test_synthetic_is_deterministic_and_shaped_like_the_paper():
  xs, ys = fs.synthetic(1.0, 1.0, seed=0)
  xs2, ys2 = fs.synthetic(1.0, 1.0, seed=0)
  assert len(xs) == 30 and xs[0].shape[1] == 60
  assert all(len(x) >= 50 for x in xs)
  assert all(y.min() >= 0 and y.max() < 10 for y in ys)
  for a, b in zip(xs, xs2):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(fs.synthetic(1.0, 1.0, seed=1)[0][0][:5], xs[0][:5])


def test_synthetic_beta_controls_heterogeneity_and_alpha_no_label():
  # beta is the std of the clients' input means: larger beta, more spread client means.
  spread = lambda beta: np.std([x.mean() for x in fs.synthetic(0.0, beta, seed=3)[0]])
  assert spread(5.0) > 3 * spread(0.0)
  # The IID variant shares one labelling model: label histograms are alike across clients.
  _, ys = fs.synthetic(iid=True, seed=0)
  hist = np.array([np.bincount(y, minlength=10) / len(y) for y in ys])
  _, ys11 = fs.synthetic(1.0, 1.0, seed=0)
  hist11 = np.array([np.bincount(y, minlength=10) / len(y) for y in ys11])
  assert hist.std(axis=0).mean() < hist11.std(axis=0).mean()
  # alpha, as in the paper's generator, shifts every class's logit alike: no label moves
  # (the module docstring says so; this holds it to it).
  labels = lambda alpha: fs.synthetic(alpha, 1.0, seed=3)[1]
  assert all(np.array_equal(a, b) for a, b in zip(labels(0.0), labels(5.0)))
  with pytest.raises(ValueError, match="alpha and beta must be finite and >= 0"):
    fs.synthetic(-1.0, 1.0)
  # NaN passed `alpha < 0` and gave every example label 0; inf likewise.
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match="alpha and beta must be finite and >= 0"):
      fs.synthetic(bad, 1.0)
    with pytest.raises(ValueError, match="alpha and beta must be finite and >= 0"):
      fs.synthetic(1.0, bad)
  assert len(fs.synthetic(0.0, 0.0, num_clients=2)[0]) == 2  # 0 is allowed
  with pytest.raises(ValueError, match="max_size must be a positive integer"):
    fs.synthetic(1.0, 1.0, max_size=0)
  # Sizes are checked before numpy sees them ("negative dimensions are not allowed").
  for bad in ({"num_clients": -1}, {"min_size": -5}, {"min_size": 2.5}, {"num_classes": 0}):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer >="):
      fs.synthetic(1.0, 1.0, **bad)
  assert len(fs.synthetic(1.0, 1.0, num_clients=1, min_size=0)[0]) == 1  # the edges
  # Finite but past float64's range: the draws overflow and argmax of NaN logits was 0.
  for alpha, beta in ((1e308, 1.0), (1.0, 1e308)):
    with pytest.raises(ValueError, match="too large: the data overflow"):
      fs.synthetic(alpha, beta, seed=0)


def test_reddi_fedadam_one_step_golden():
  # Reddi et al. 2021, Alg. 2 with b1=0.9, b2=0.99, tau=1e-3 and one pseudo-gradient g = -delta.
  opt = fs.server_optimizer("fedadam", 0.1)
  params = {"w": jnp.array([1.0, -2.0])}
  delta = np.array([0.5, -0.01])
  updates, _ = opt.update({"w": jnp.asarray(-delta)}, opt.init(params), params)
  m = 0.1 * delta
  v = 0.99 * 1e-6 + 0.01 * delta**2
  np.testing.assert_allclose(updates["w"], 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_reddi_fedyogi_and_fedadagrad_second_moments():
  g = np.array([0.3, -2.0])
  for name, v1 in [("fedyogi", 1e-6 - 0.01 * g**2 * np.sign(1e-6 - g**2)),
                   ("fedadagrad", 1e-6 + g**2)]:
    opt = fs.server_optimizer(name, 1.0)
    params = {"w": jnp.zeros(2)}
    updates, _ = opt.update({"w": jnp.asarray(g)}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -(0.1 * g) / (np.sqrt(v1) + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("make,match", [
    (lambda: fs.client_optimizer("momentum", 0.1, momentum=-0.5), "client_optimizer's momentum"),
    (lambda: fs.client_optimizer("momentum", 0.1, momentum=1.0), "client_optimizer's momentum"),
    (lambda: fs.client_optimizer("momentum", 0.1, momentum=float("nan")), "momentum"),
    (lambda: fs.client_optimizer("momentum", 0.1, momentum=True), "momentum"),
    (lambda: fs.server_optimizer("fedavgm", 1.0, momentum=float("nan")),
     "server_optimizer's momentum"),
    (lambda: fs.server_optimizer("fedadam", 0.01, b2=1.5), r"server_optimizer's b2 must be a "
                                                          r"number in \[0, 1\), got 1.5"),
    (lambda: fs.server_optimizer("fedyogi", 0.01, b1=1.0), "server_optimizer's b1"),
    (lambda: fs.optimizers.scale_by_reddi("adam", b1=-0.1), "b1 must be a number in"),
])
def test_optimizers_refuse_decays_outside_0_1(make, match):
  # At 1 or above the averages never forget, or grow; NaN is a NaN model.
  with pytest.raises(ValueError, match=match):
    make()
  fs.client_optimizer("momentum", 0.1, momentum=jnp.float32(0.5))  # a concrete array is fine


@pytest.mark.parametrize("make,match", [
    (lambda: models.cnn(2, image_size=3), "cnn: image_size must be an integer >= 4, got 3"),
    (lambda: models.cnn(2, image_size=True), "cnn: image_size must be an integer >= 4, got True"),
    (lambda: models.cnn(2, in_channels=0), "cnn: in_channels must be an integer >= 1"),
    (lambda: models.logistic_regression(0, 3), "num_features must be an integer >= 1, got 0"),
    (lambda: models.logistic_regression(-4, 3), "num_features must be an integer >= 1, got -4"),
    (lambda: models.logistic_regression(4, 0), "num_classes must be an integer >= 1, got 0"),
    (lambda: models.build(models.MLP, 4, 3, hidden=0), "mlp: hidden must be an integer >= 1"),
    (lambda: models.char_rnn(5, num_layers=0), "char_rnn: num_layers must be an integer >= 1"),
    (lambda: models.char_rnn(True), "char_rnn: vocab_size must be an integer >= 1, got True"),
])
def test_model_constructors_refuse_sizes_they_cannot_take(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_the_smallest_cnn_image_size_runs():
  # Two 2x2 poolings take 4x4 down to 1x1; 3x3 to nothing.
  model = models.cnn(2, image_size=models.CNN.MIN_IMAGE_SIZE, conv_impl="lax")
  out = jax.eval_shape(model.apply, model.params, jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))
  assert out.shape == (1, 2)
