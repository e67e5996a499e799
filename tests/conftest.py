"""Shared small fixtures: tiny shapes so that every compile is quick on a 2-core CPU."""

import functools
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's time is mostly XLA:CPU compiling small programs. Without backend
# optimization and fusion emitters they compile 2-3x faster (tests/test_algorithms.py:
# 108 s -> 48 s on a 2-core CPU); the tests check equalities and bounds, not speed.
# XLA aborts on a flag it does not know (jax 0.12's has no fusion-emitter flag), so a
# child process tries them first, all of them, then the first alone.
# FEDJAX_SIM_TEST_XLA_DEFAULTS=1 keeps XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _flags_work(flags: str) -> bool:
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}",
         "JAX_PLATFORMS": "cpu"}
  probe = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
  try:
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          timeout=120).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")  # as the user set them (None: unset)
FAST_COMPILE_ON = False
if (os.environ.get("FEDJAX_SIM_TEST_XLA_DEFAULTS") != "1"
    and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"):
  for flags in (" ".join(FAST_COMPILE), FAST_COMPILE[0]):
    if _flags_work(flags):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
      FAST_COMPILE_ON = True
      break


def under_xla_defaults(test):
  """For a test that programs of different shapes (chunk lengths) give the same bits:
  under FAST_COMPILE's two flags together (jaxlib 0.10) XLA:CPU summed a fused
  reduction (the weighted mean of client updates) in an order that depended on the
  program around it, which under XLA's own defaults, what users compile with, it does
  not. So in a process with those flags the test runs in a child pytest without them."""

  @functools.wraps(test)
  def wrapper(*args, **kwargs):
    if not FAST_COMPILE_ON:
      return test(*args, **kwargs)
    nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
    env = {**os.environ, "FEDJAX_SIM_TEST_XLA_DEFAULTS": "1"}
    env.pop("XLA_FLAGS", None)
    if USER_XLA_FLAGS is not None:
      env["XLA_FLAGS"] = USER_XLA_FLAGS
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            nodeid], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert child.returncode == 0, f"{nodeid} under XLA's defaults:\n{child.stdout[-6000:]}"

  return wrapper

# A shell's background job starts with SIGINT ignored, and fedjax_sim keeps an ignored
# signal ignored (so would the CLI processes the tests start): the suite tests Ctrl-C, so
# it takes Python's handler, as in a foreground process, whichever way it was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# The CLI's persistent compilation cache stays off in tests (cache hits would change the
# compilation counts tests assert); tests/test_checkpoint.py turns it on where it tests it.
os.environ.setdefault("FEDJAX_SIM_COMPILE_CACHE", "off")

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjax_sim import data as data_lib  # noqa: E402
from fedjax_sim import models  # noqa: E402


def ragged_clients(seed=0, sizes=(3, 17, 8, 30, 1, 12), num_features=5, num_classes=3):
  """Per-client (xs, ys) with ragged sizes, including a one-example client."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, num_features)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, num_classes, n).astype(np.int32) for n in sizes]
  return xs, ys


@pytest.fixture(scope="session")
def ragged():
  xs, ys = ragged_clients()
  return xs, ys, data_lib.from_clients(xs, ys, num_classes=3)


@pytest.fixture(scope="session")
def small_mlp():
  # A real nnx MLP with a small hidden layer: nonlinear, so ordering bugs show.
  return models.mlp(num_features=5, num_classes=3, seed=1)


def tiny_mlp():
  """5 -> 8 -> 3 with tanh: nonlinear, and cheap to compile; its last layer is (w2, b2)."""
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(5, 8)) * 0.5, jnp.float32), "b1": jnp.zeros(8),
            "w2": jnp.asarray(rng.normal(size=(8, 3)) * 0.5, jnp.float32), "b2": jnp.zeros(3)}
  return (lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]), params


def square_loss_fedavg(lr):
  """FedAvg on the loss w^2, one SGD step per round: w <- w (1 - 2 lr) (lr 10 diverges at
  round 3), on `one_example_data()`."""
  from fedjax_sim.algorithms import fedavg
  import optax
  return fedavg(lambda p, x: p["w"] * x[:, 0], loss=lambda p, x, y: p["w"] ** 2 + 0.0 * jnp.sum(x),
                client_optimizer=optax.sgd(lr), clients_per_round=1, batch_size=1, steps=1)


def one_example_data():
  """One client with one example, for `square_loss_fedavg`."""
  return data_lib.from_clients([np.ones((1, 1), np.float32)], [np.zeros(1, int)])


def max_relative_error(a, b):
  errs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12))
          for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(errs)


_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kw: _compiles.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)


@pytest.fixture
def count_compiles():
  """Returns a function giving the number of XLA compilations since the test began."""
  start = len(_compiles)
  return lambda: len(_compiles) - start
