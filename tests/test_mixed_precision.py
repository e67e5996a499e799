"""bfloat16 compute with float32 master weights (models.mixed_precision)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.models import mixed_precision
from conftest import ragged_clients, tiny_mlp


def test_mixed_precision_computes_in_bf16_and_keeps_float32_state(ragged, small_mlp):
  data = ragged[2]
  model = small_mlp
  half = mixed_precision(model)
  x = jnp.asarray(data.x[3])
  jaxpr = str(jax.make_jaxpr(half.apply)(model.params, x))
  assert "bf16[" in jaxpr and "dot_general" in jaxpr
  logits = half.apply(model.params, x)
  assert logits.dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: close to, not equal to, the float32 logits
  full = model.apply(model.params, x)
  err = float(jnp.max(jnp.abs(logits - full)))
  assert 0 < err < 0.05 * float(jnp.max(jnp.abs(full))) + 1e-2

  def run(m):
    algorithm = fs.fedavg(m.apply, client_optimizer=optax.sgd(0.1), clients_per_round=3,
                          batch_size=4, steps=3)
    state = algorithm.init(m.params, jax.random.key(0))
    return fs.run(algorithm, state, data, rounds=2, progress=False)

  (s32, h32), (s16, h16) = run(model), run(half)
  for a, b in zip(jax.tree_util.tree_leaves(s16.params), jax.tree_util.tree_leaves(s32.params)):
    assert a.dtype == jnp.float32  # master weights and the aggregated model stay float32
    np.testing.assert_allclose(a, b, atol=2e-2)
  assert abs(h16[-1]["train_loss"] - h32[-1]["train_loss"]) < 0.05


@pytest.mark.parametrize("name", ["scaffold", "feddyn", "mimelite", "fednova"])
def test_bfloat16_parameters_keep_every_state_dtype(name):
  # The fused mean of bfloat16 uploads is float32: SCAFFOLD's c, FedDyn's h and model,
  # MimeLite's momentum and model became float32 after a round, and fs.run's scan over
  # rounds refused the changed carry; FedDyn's float32 rows went into bfloat16 ones.
  xs, ys = ragged_clients(sizes=(5, 8, 3, 6))
  data = fs.from_clients(xs, ys, num_classes=3)
  apply, params = tiny_mlp()
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  common = dict(clients_per_round=2, batch_size=4, steps=2)
  algorithm = {
      "scaffold": lambda: fs.scaffold(apply, client_learning_rate=0.3, **common),
      "feddyn": lambda: fs.feddyn(apply, alpha=0.2, client_optimizer=optax.sgd(0.3), **common),
      "mimelite": lambda: fs.mimelite(apply, client_learning_rate=0.3, momentum=0.6, **common),
      # Its momentum, a float32 hyperparameter, turned the bfloat16 trace float32 (the
      # scan over local steps refused the carry).
      "fednova": lambda: fs.fednova(apply, client_learning_rate=0.3, momentum=0.5, **common),
  }[name]()
  state = algorithm.init(params, jax.random.key(0), data.num_clients)
  dtypes = lambda s: [a.dtype for a in jax.tree_util.tree_leaves(
      (s.params, s.algorithm_state, s.client_states))]
  with warnings.catch_warnings():
    warnings.simplefilter("error", FutureWarning)
    after, _ = fs.run(algorithm, state, data, rounds=2, rounds_per_chunk=2, progress=False)
  assert dtypes(after) == dtypes(state)
  assert all(np.isfinite(np.asarray(a, np.float32)).all()
             for a in jax.tree_util.tree_leaves(after.params))
