"""Server warm start: the global model before round 1, pretrained or loaded.

`pretrain` trains the initial model centrally on a small server-side dataset. It is
one client's local update (the same batching, shuffling and optimizer code the
clients run), applied to the server's examples, so it costs one compiled program.
`save_params` / `load_params` keep a model in an `.npz` file keyed by pytree path,
so a warm start can come from an earlier run; loading checks every path, shape and
dtype against the model it is loaded into. (An npz of named arrays rather than a
checkpoint library: flax's msgpack serialization does not take nnx.State, and the
file stays readable by numpy alone; a bfloat16 leaf is stored as its bits, with the
dtype's name beside it.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import checks, local
from fedjax_sim.compile import jit
from fedjax_sim.losses import cross_entropy

Params = Any


def pretrain(params: Params, apply: Callable[[Params, jax.Array], jax.Array], x: Any, y: Any,
             *, optimizer: optax.GradientTransformation, batch_size: int,
             epochs: int | None = None, steps: int | None = None, key: jax.Array,
             loss: local.PerExampleLoss | None = None) -> tuple[Params, dict]:
  """Trains `params` on the server's examples `(x, y)` before federated training.

  Args:
    params: the initial model.
    apply: the model's pure `apply(params, x) -> logits`.
    x, y: the server's examples and labels (leading axis: examples).
    optimizer: an optax optimizer.
    batch_size: minibatch size.
    epochs / steps: passes over the server data, or a number of steps (exactly one).
    key: shuffling key.
    loss: per-example loss; default softmax cross-entropy on integer labels.

  Returns:
    (trained params, {"server_train_loss": mean training loss, "server_steps": steps}).
  """
  local.check_schedule(batch_size, epochs, steps)
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim == 0 or y.ndim == 0 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
    raise ValueError(f"the server data needs at least one example and as many labels as "
                     f"examples, got x {x.shape} and y {y.shape}")
  # As the clients' data and the test sets are checked: a NaN feature or a label the
  # model has no output for gave a NaN loss, or (label -1) a loss over fewer examples.
  checks.check_finite_array(x, "the server data")
  checks.check_token_ids(apply, x, np.ones(len(x), bool), "the server data", client_axis=False)
  if loss is None:  # the default loss reads labels as class indices
    logits = checks.model_output(apply, params, x.shape[1:], x.dtype, "the server data")
    checks.check_label_values(logits, y, np.ones(len(y), bool), "the server data",
                              client_axis=False)
  x, y = jax.device_put(x), jax.device_put(y)
  update = local.make_local_update(loss or cross_entropy(apply), optimizer,
                                   batch_size=batch_size, epochs=epochs, steps=steps)

  def train(params, x, y, key):
    result = update(params, x, y, jnp.int32(x.shape[0]), key)
    trained = jax.tree_util.tree_map(jnp.add, params, result.delta)
    return trained, result.loss_sum / jnp.maximum(result.num_trained, 1.0), result.num_steps

  trained, train_loss, num_steps = jit(train)(params, x, y, key)
  return trained, {"server_train_loss": float(train_loss), "server_steps": int(num_steps)}


def _named_leaves(tree: Params) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


_DTYPE = "dtype of "  # the key recording a leaf's dtype that numpy has no name for


def save_params(path: str | os.PathLike, params: Params) -> None:
  """Writes `params` to an `.npz` file, one array per pytree path (atomically: a
  failed write leaves any earlier file intact)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {name: np.asarray(leaf) for name, leaf in _named_leaves(params).items()}
  for name, a in list(arrays.items()):
    if a.dtype.kind == "V":  # ml_dtypes' (bfloat16), which numpy would store as raw bytes
      arrays[name] = a.view(f"u{a.dtype.itemsize}")
      arrays[_DTYPE + name] = np.array(a.dtype.name)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_params(path: str | os.PathLike, like: Params) -> Params:
  """Reads params saved by `save_params` into the structure of `like` (a model's
  params); raises ValueError naming the first path, shape or dtype that differs."""
  with np.load(os.fspath(path)) as f:
    stored = {name: f[name] for name in f.files}
  for key in [k for k in stored if k.startswith(_DTYPE)]:
    name, dtype = key[len(_DTYPE):], jnp.dtype(str(stored.pop(key)))
    stored[name] = stored[name].view(dtype)
  expected = _named_leaves(like)
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing or extra:
    raise ValueError(f"{os.fspath(path)} does not hold this model's parameters: "
                     f"missing {missing[:3]}, unexpected {extra[:3]}")
  for name, leaf in expected.items():
    if stored[name].shape != np.shape(leaf) or stored[name].dtype != np.dtype(leaf.dtype):
      raise ValueError(f"{os.fspath(path)}: {name} has shape {stored[name].shape} "
                       f"{stored[name].dtype}, the model expects {np.shape(leaf)} "
                       f"{np.dtype(leaf.dtype)}")
  treedef = jax.tree_util.tree_structure(like)
  # A numpy leaf stays numpy: jnp.asarray narrowed float64 to float32 (int64 wrapped to
  # int32) after the dtypes had been checked equal, where jax runs without x64.
  return jax.tree_util.tree_unflatten(treedef, [
      stored[n] if isinstance(leaf, np.ndarray) else jnp.asarray(stored[n])
      for n, leaf in expected.items()])
