"""The Flower ClientApp of the peer benchmark: local SGD in JAX + optax.

A module of its own (not inside run_flower.py) because Flower's Ray backend pickles the
ClientApp for every message: defined in an importable module it is pickled by
reference, so each Ray actor imports it once and its jitted steps compile once per
actor, as in Flower's own JAX example (a `task.py` next to the app).

The models are plain JAX functions over a list of numpy arrays (what Flower's
ArrayRecord carries), from jax_models.py: the 2NN MLP 784-200-200-10 and the FedAvg CNN
(5x5 conv 32 and 64 'SAME' with `lax.conv_general_dilated`, 2x2 max pool, 512 dense),
the same shapes as fedjax_sim's and FedJAX's. Local training: `epochs` passes over the client's examples
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
import jax_models


# ---------------------------------------------------------------- models (pure JAX)

# In jax_models.py, shared with the DrJAX worker; run_flower.py uses them from here.
init_params = jax_models.init_params
apply = jax_models.apply


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
