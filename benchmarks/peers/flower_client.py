"""The Flower ClientApp of the peer benchmark: local SGD in JAX + optax.

A module of its own (not inside run_flower.py) because Flower's Ray backend pickles the
ClientApp for every message: defined in an importable module it is pickled by
reference, so each Ray actor imports it once and its jitted steps compile once per
actor, as in Flower's own JAX example (a `task.py` next to the app).

The models are plain JAX functions over a list of numpy arrays (what Flower's
ArrayRecord carries): the 2NN MLP 784-200-200-10 and the FedAvg CNN (5x5 conv 32 and
64 'SAME' with `lax.conv_general_dilated`, 2x2 max pool, 512 dense), the same shapes as
fedjax_sim's and FedJAX's. Local training: `epochs` passes over the client's examples
in a fresh random order, minibatches of `batch-size`, optax SGD; `client-loop = step`
jits one minibatch step and loops in Python (Flower's JAX example, FedJAX and
fedjax_sim's loop reference do the same); `epoch` jits a whole epoch as one `lax.scan`
(the fastest a Flower client can train; the examples must fill whole batches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import common


# ---------------------------------------------------------------- models (pure JAX)

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


def _loss(model, params, x, y):
  logits = apply(model, params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---------------------------------------------------------------- local training

@functools.lru_cache(maxsize=None)
def _trainers(model: str, lr: float):
  """Jitted (one minibatch step, one whole epoch) for this model and learning rate."""
  opt = optax.sgd(lr)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(functools.partial(_loss, model))(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def epoch(params, opt_state, xb, yb):  # xb [steps, batch, ...]
    def body(carry, xy):
      p, s, loss = step(*carry, *xy)
      return (p, s), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xb, yb))
    return params, opt_state, losses.sum()

  return opt, jax.jit(step), jax.jit(epoch)


@functools.lru_cache(maxsize=None)
def _client_data(seed: int, client_id: int, n: int):
  """The client's partition, made once per actor (as a cached data set would be)."""
  return common.client_data(seed, client_id, n)


def local_train(params: list[np.ndarray], client_id: int, cfg) -> tuple[list, int, float]:
  """Trains from `params` on the client's data; returns (new params, examples, mean loss)."""
  model, lr, b = str(cfg["model"]), float(cfg["client-lr"]), int(cfg["batch-size"])
  x, y = _client_data(int(cfg["seed"]), client_id, int(cfg["examples-per-client"]))
  opt, step, epoch = _trainers(model, lr)
  params = [jnp.asarray(p) for p in params]
  opt_state = opt.init(params)
  rng = np.random.default_rng([int(cfg["seed"]), client_id, int(cfg["server-round"])])
  n, losses, steps = len(x), [], 0
  for _ in range(int(cfg["epochs"])):
    order = rng.permutation(n)
    if cfg["client-loop"] == "epoch":
      if n % b:
        raise ValueError("client-loop=epoch needs examples per client divisible by batch size")
      idx = order.reshape(n // b, b)
      params, opt_state, loss = epoch(params, opt_state, x[idx], y[idx])
      losses.append(loss)
      steps += n // b
    else:
      for i in range(0, n, b):
        idx = order[i:i + b]
        params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
        losses.append(loss)  # fetched once at the end: no host sync per step
        steps += 1
  loss_sum = float(np.sum(jax.device_get(losses)))
  return [np.asarray(p) for p in params], n, loss_sum / steps


# ---------------------------------------------------------------- the ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
  cfg = msg.content["config"]
  params = msg.content["arrays"].to_numpy_ndarrays()
  new, n, loss = local_train(params, int(context.node_config["partition-id"]), cfg)
  content = RecordDict({"arrays": ArrayRecord(new),
                        "metrics": MetricRecord({"num-examples": n, "train_loss": loss})})
  return Message(content=content, reply_to=msg)
