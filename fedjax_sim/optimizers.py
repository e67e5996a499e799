"""Client and server optimizers by name, with their hyperparameters checked.

Server optimizers act on the pseudo-gradient `-(mean client delta)`: SGD with
learning rate 1 is FedAvg (McMahan et al. 2017), SGD with momentum is FedAvgM
(Hsu et al. 2019), and FedAdagrad/FedAdam/FedYogi follow Algorithm 2 of Reddi et
al. 2021, "Adaptive Federated Optimization". Those three are written here rather
than taken from optax because the paper's rules differ from optax's adam/yogi/
adagrad: no bias correction, the adaptivity tau added outside the square root,
and every second-moment accumulator starting at tau^2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.checks import is_concrete

CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
# Each server optimizer's default learning rate. The adaptive ones follow the tuned values
# of Reddi et al. 2021 (Adaptive Federated Optimization, ICLR; tau = 1e-3): about 1e-2 for
# FedAdam and FedYogi and 1e-1 for FedAdagrad on most of their tasks; 1.0 (FedAvg's plain
# average) would make an adaptive server take steps of about 1 per coordinate.
SERVER_LR_DEFAULTS = {"fedavg": 1.0, "fedavgm": 1.0, "fedadagrad": 0.1, "fedadam": 0.01,
                      "fedyogi": 0.01}


def _check_positive(name: str, value: float) -> None:
  """A concrete value must be a positive number; a traced one (a hyperparameter read
  from `state.hp` inside the round, or swept) is checked where it was set."""
  if not is_concrete(value):
    return
  if isinstance(value, (jax.Array, np.generic)) and np.ndim(value) == 0:
    value = float(value)
  if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
    raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_decay(name: str, value: float) -> None:
  """A concrete momentum or moment decay must lie in [0, 1): at 1 or above (or NaN) the
  running averages never forget, or grow, and the model diverges; below 0 they oscillate.
  A traced one is checked where it was set."""
  if not is_concrete(value):
    return
  if isinstance(value, (jax.Array, np.generic)) and np.ndim(value) == 0:
    value = float(value)
  if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def client_optimizer(name: str = "sgd", learning_rate: float = 0.1,
                     momentum: float = 0.9) -> optax.GradientTransformation:
  """A client optimizer: 'sgd', 'momentum' (SGD with momentum) or 'adam'."""
  _check_positive("client learning rate", learning_rate)
  _check_decay("client_optimizer's momentum", momentum)
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown client optimizer {name!r}; choose from {CLIENT_OPTIMIZERS}")


class ReddiState(NamedTuple):
  m: optax.Params
  v: optax.Params


def scale_by_reddi(rule: str, b1: float = 0.9, b2: float = 0.99,
                   tau: float = 1e-3) -> optax.GradientTransformation:
  """Reddi et al. 2021, Alg. 2: m = b1 m + (1-b1) g; v by `rule`; u = m / (sqrt(v) + tau)."""
  if rule not in ("adagrad", "adam", "yogi"):
    raise ValueError(f"unknown adaptive rule {rule!r}")
  _check_decay("b1", b1)
  _check_decay("b2", b2)

  def init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return ReddiState(m=zeros, v=jax.tree_util.tree_map(lambda p: jnp.full_like(p, tau**2), params))

  def second_moment(v, g):
    g2 = g * g
    if rule == "adagrad":
      return v + g2
    if rule == "adam":
      return b2 * v + (1 - b2) * g2
    return v - (1 - b2) * g2 * jnp.sign(v - g2)

  def update(updates, state, params=None):
    del params
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
    v = jax.tree_util.tree_map(second_moment, state.v, updates)
    out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return out, ReddiState(m, v)

  return optax.GradientTransformation(init, update)


def server_optimizer(name: str = "fedavg", learning_rate: float | None = None, *,
                     momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99,
                     tau: float = 1e-3) -> optax.GradientTransformation:
  """A server optimizer by name: fedavg, fedavgm, fedadagrad, fedadam or fedyogi; the
  learning rate defaults to `SERVER_LR_DEFAULTS[name]`."""
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f"unknown server optimizer {name!r}; choose from {SERVER_OPTIMIZERS}")
  if learning_rate is None:
    learning_rate = SERVER_LR_DEFAULTS[name]
  _check_positive("server learning rate", learning_rate)
  # All of them, though each optimizer reads only some: a bad value is a mistake either way.
  for arg, value in (("momentum", momentum), ("b1", b1), ("b2", b2)):
    _check_decay(f"server_optimizer's {arg}", value)
  if name == "fedavg":
    return optax.sgd(learning_rate)
  if name == "fedavgm":
    return optax.sgd(learning_rate, momentum=momentum)
  if name in ("fedadagrad", "fedadam", "fedyogi"):
    _check_positive("tau", tau)
    return optax.chain(scale_by_reddi(name[3:], b1, b2, tau), optax.scale(-learning_rate))
  raise ValueError(f"unknown server optimizer {name!r}; choose from {SERVER_OPTIMIZERS}")
