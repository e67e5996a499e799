"""The peer benchmark's models in plain JAX, for the workers that bring no model library.

Used by Flower's ClientApp (flower_client.py) and the DrJAX worker (run_drjax.py); needs
only jax and numpy. Parameters are a list of numpy arrays (what Flower's ArrayRecord
carries): the 2NN MLP 784-200-200-10 and the FedAvg CNN (5x5 conv 32 and 64 'SAME' with
`lax.conv_general_dilated`, 2x2 max pool, 512 dense), the same shapes as fedjax_sim's,
FedJAX's and the PyTorch model of run_pfl.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import common


def _dense(key, n_in, n_out):
  w = jax.random.normal(key, (n_in, n_out), jnp.float32) * np.sqrt(1.0 / n_in)
  return [np.asarray(w), np.zeros((n_out,), np.float32)]


def _conv(key, k, c_in, c_out):
  w = jax.random.normal(key, (k, k, c_in, c_out), jnp.float32) * np.sqrt(1.0 / (k * k * c_in))
  return [np.asarray(w), np.zeros((c_out,), np.float32)]


def init_params(model: str, seed: int) -> list[np.ndarray]:
  """LeCun-normal weights, zero biases, as a list of numpy arrays."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  if model == "mlp":
    return _dense(keys[0], 784, 200) + _dense(keys[1], 200, 200) + _dense(keys[2], 200, 10)
  return (_conv(keys[0], 5, 1, 32) + _conv(keys[1], 5, 32, 64)
          + _dense(keys[2], 7 * 7 * 64, 512) + _dense(keys[3], 512, 10))


def _pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def apply(model: str, params, x):
  """Logits of `model` for inputs x [batch, 28, 28]."""
  if model == "mlp":
    w1, b1, w2, b2, w3, b3 = params
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1)
    h = jax.nn.relu(h @ w2 + b2)
    return h @ w3 + b3
  c1, cb1, c2, cb2, w1, b1, w2, b2 = params
  conv = lambda v, k: jax.lax.conv_general_dilated(
      v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = x.reshape(x.shape[0], *common.IMAGE, 1)
  h = _pool(jax.nn.relu(conv(h, c1) + cb1))
  h = _pool(jax.nn.relu(conv(h, c2) + cb2))
  h = jax.nn.relu(h.reshape(h.shape[0], -1) @ w1 + b1)
  return h @ w2 + b2
