"""Server warm start: centralized pretraining and params saved to / loaded from a file."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import warm_start


def _server_data(n=12, features=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)


def test_pretrain_full_batch_equals_gradient_descent_by_hand():
  model = fs.logistic_regression(4, 3)
  x, y = _server_data()
  trained, info = warm_start.pretrain(model.params, model.apply, x, y,
                                      optimizer=optax.sgd(0.5), batch_size=len(x), steps=3,
                                      key=jax.random.key(0))
  # Full-batch steps do not depend on the shuffle: three steps of plain gradient descent.
  def mean_loss(p):
    logits = model.apply(p, jnp.asarray(x))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  p = model.params
  first_loss = mean_loss(p)
  for _ in range(3):
    p = jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p, jax.grad(mean_loss)(p))
  for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert info["server_steps"] == 3
  assert info["server_train_loss"] < float(first_loss)  # mean over the three steps


def test_pretrain_epochs_counts_steps_and_checks_data():
  model = fs.logistic_regression(4, 3)
  x, y = _server_data(n=10)
  _, info = warm_start.pretrain(model.params, model.apply, x, y, optimizer=optax.sgd(0.1),
                                batch_size=4, epochs=2, key=jax.random.key(1))
  assert info["server_steps"] == 2 * 3
  with pytest.raises(ValueError, match="as many labels as examples"):
    warm_start.pretrain(model.params, model.apply, x, y[:5], optimizer=optax.sgd(0.1),
                        batch_size=4, epochs=1, key=jax.random.key(1))
  with pytest.raises(ValueError, match="exactly one of epochs= or steps="):
    warm_start.pretrain(model.params, model.apply, x, y, optimizer=optax.sgd(0.1),
                        batch_size=4, key=jax.random.key(1))


def test_save_load_round_trip_and_mismatch(tmp_path):
  model = fs.logistic_regression(4, 3, seed=1)
  path = tmp_path / "sub" / "warm.npz"
  warm_start.save_params(path, model.params)
  loaded = warm_start.load_params(path, fs.logistic_regression(4, 3, seed=2).params)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(model.params)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(model.params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="bias.* has shape \\(3,\\) float32, the model expects \\(5,\\)"):
    warm_start.load_params(path, fs.logistic_regression(4, 5).params)
  with pytest.raises(ValueError, match="does not hold this model's parameters"):
    warm_start.load_params(path, fs.mlp(4, 3).params)


@pytest.mark.parametrize("break_data,match", [
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, 3, y)), "3 outputs but the server data's "
                                                               "labels go up to 3"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, -1, y)), "labels must lie in \\[0, 3\\)"),
    (lambda x, y: (np.where(np.arange(len(x))[:, None] == 2, np.nan, x), y),
     "server data's features contain NaN \\(example 2"),
])
def test_pretrain_refuses_data_the_clients_would_not_pass(break_data, match):
  # A label of 3 for 3 outputs gave a NaN loss; -1 a loss summed over 11 examples and
  # divided by 12; a NaN feature NaN parameters.
  model = fs.logistic_regression(4, 3)
  x, y = break_data(*_server_data())
  with pytest.raises(ValueError, match=match):
    warm_start.pretrain(model.params, model.apply, x, y, optimizer=optax.sgd(0.1),
                        batch_size=4, epochs=1, key=jax.random.key(0))


def test_bfloat16_params_round_trip(tmp_path):
  # numpy stores bfloat16 as 2 raw bytes ('V2'); loading refused them as another dtype.
  model = fs.logistic_regression(4, 3, seed=1)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model.params)
  warm_start.save_params(tmp_path / "bf16.npz", params)
  loaded = warm_start.load_params(tmp_path / "bf16.npz", params)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  with pytest.raises(ValueError, match="bfloat16, the model expects \\(3,\\) float16"):
    warm_start.load_params(tmp_path / "bf16.npz", jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float16), params))


def test_numpy_params_keep_their_dtypes(tmp_path):
  # Checked equal, then narrowed by jnp.asarray without x64: float64 to float32, and the
  # int64 past int32's range wrapped.
  params = {"w": np.full(2, 1 / 3), "step": np.array([2**40 + 7])}
  path = str(tmp_path / "p.npz")
  warm_start.save_params(path, params)
  loaded = warm_start.load_params(path, params)
  assert loaded["w"].dtype == np.float64 and loaded["w"][0] == 1 / 3
  assert loaded["step"].dtype == np.int64 and int(loaded["step"][0]) == 2**40 + 7
