"""What a fresh process pays before its first round: imports and set-up compiles."""

import contextlib
import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import compile as compile_lib
from fedjax_sim import models
from fedjax_sim import tree as tree_lib
from fedjax_sim.models import nnx

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  seen = []

  def listener(name, secs, **kwargs):
    if name == BACKEND_COMPILE:
      seen.append(secs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def run_python(code: str) -> str:
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip()


needs_ipython = pytest.mark.skipif(importlib.util.find_spec("IPython") is None,
                                   reason="IPython is not installed")


@needs_ipython
def test_import_does_not_load_ipython_outside_a_shell():
  # flax.nnx would import it (~0.5 s) only to learn that no IPython shell is running.
  out = run_python("import sys, fedjax_sim; print('IPython' in sys.modules); "
                   "import IPython; print(IPython.get_ipython())")
  assert out.splitlines() == ["False", "None"]  # and IPython still imports afterwards


@needs_ipython
def test_import_after_ipython_leaves_it_loaded():
  out = run_python("import sys, IPython; before = sys.modules['IPython']; import fedjax_sim; "
                   "print(sys.modules['IPython'] is before)")
  assert out == "True"


def test_from_clients_compiles_nothing():
  xs = [np.ones((n, 3), np.float32) for n in (2, 4)]
  ys = [np.zeros(n, np.int32) for n in (2, 4)]
  with count_compiles() as compiles:
    data = fs.from_clients(xs, ys, num_classes=2)
  assert compiles == []
  np.testing.assert_array_equal(data.counts, [2, 4])
  np.testing.assert_array_equal(data.x[0, 2:], 0.0)  # padding


def test_tree_copy_compiles_nothing_and_makes_new_buffers():
  tree = {"a": jax.numpy.arange(3.0), "b": (jax.numpy.ones((2, 5)), jax.numpy.int32(7)),
          "key": jax.random.key(3)}
  jax.clear_caches()
  with count_compiles() as compiles:
    copied = tree_lib.copy(tree)
  assert compiles == []
  assert jax.random.key_data(copied["key"]).tolist() == jax.random.key_data(
      tree["key"]).tolist()
  jax.tree_util.tree_map(np.testing.assert_array_equal, copied["b"], tree["b"])
  np.testing.assert_array_equal(copied["a"], tree["a"])
  raw = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else a
  for a, b in zip(jax.tree_util.tree_leaves(copied), jax.tree_util.tree_leaves(tree)):
    assert raw(a).unsafe_buffer_pointer() != raw(b).unsafe_buffer_pointer()
  # Donating the copy leaves the original valid, which is what the runner copies for.
  jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t), donate_argnums=0)(
      {"a": copied["a"], "b": copied["b"]})
  np.testing.assert_array_equal(tree["a"], [0.0, 1.0, 2.0])



class CountedMLP(models.MLP):
  traces = 0

  def __init__(self, *args, **kwargs):
    CountedMLP.traces += 1
    super().__init__(*args, **kwargs)


def per_seed_program(seed, features=3):
  # A program compiled for this seed alone (a constant of it), as before they were kept.
  return models._Initializer(lambda _: models.MLP(features, 2, rngs=nnx.Rngs(seed)))(None)


def test_model_initialization_is_one_trace_compiled_at_level_0():
  # jaxlib 0.11 and later reject the emitters option, and only after the lowering: the
  # options are chosen by version, so initialization compiles once, with options this
  # jaxlib accepts, from one trace of the module.
  assert compile_lib._accepted(models._INIT_OPTIONS)
  assert models._INIT_OPTIONS["xla_backend_optimization_level"] == 0
  CountedMLP.traces = 0
  with count_compiles() as compiles:
    params = models.build(CountedMLP, 3, 2, seed=0).params
  assert CountedMLP.traces == 1 and len(compiles) == 1
  eager = nnx.split(models.MLP(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)[1]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         params, eager)


def test_a_model_built_again_reuses_its_initialization_program():
  # An architecture's first seed is a constant of its program (which XLA folds); the same
  # seed again and every seed after the second neither trace nor compile, and all give
  # the bits of a program compiled for that seed, at the int32 range's ends too. A seed
  # beyond them (jax.random.key keeps its low 32 bits) gets a program of its own, and a
  # numpy int (which nnx.Rngs rejects) is a seed like any other.
  arch = (CountedMLP, 5, 2)  # no other test builds it
  CountedMLP.traces = 0
  with count_compiles() as compiles:
    models.build(*arch, seed=7)
    models.build(*arch, seed=7)
    second = models.build(*arch, seed=1).params
  assert CountedMLP.traces == 2 and len(compiles) == 2  # seed 7's program, then any seed's
  jax.tree_util.tree_map(np.testing.assert_array_equal, second, per_seed_program(1, 5).params)
  for seed in (0, -1, 2**31 - 1, -2**31, np.int64(5), 7):
    with count_compiles() as compiles:
      params = models.build(*arch, seed=seed).params
    assert CountedMLP.traces == 2 and compiles == [], seed
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           per_seed_program(int(seed), 5).params)
  wide = models.build(*arch, seed=2**32 + 5).params
  assert CountedMLP.traces == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, wide, per_seed_program(5, 5).params)
  # The same as a numpy int (nnx.Rngs refused it on this path).
  wide = models.build(*arch, seed=np.uint64(2**32 + 5)).params
  jax.tree_util.tree_map(np.testing.assert_array_equal, wide, per_seed_program(5, 5).params)
  # Another architecture is another program.
  assert models.build(CountedMLP, 4, 2, seed=7).params["fc1"]["kernel"].shape == (4, 200)
  assert CountedMLP.traces == 5


class Layers(nnx.Module):
  def __init__(self, sizes, *, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])


def test_a_module_with_unhashable_arguments_builds_all_the_same():
  # A list of sizes cannot key the kept programs: this seed's own program, as before.
  params = models.build(Layers, [3, 4, 2], seed=1).params
  want = nnx.split(Layers([3, 4, 2], rngs=nnx.Rngs(1)), nnx.Param, ...)[1]
  assert params["layers"][1]["kernel"].shape == (4, 2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         params, want)


def test_the_training_loss_traces_no_accuracy():
  # XLA drops an unused argmax, but tracing and lowering it cost the first round time.
  from fedjax_sim import losses
  loss = losses.cross_entropy(lambda params, x: x @ params)
  args = (np.ones((3, 4), np.float32), np.ones((2, 3), np.float32), np.zeros(2, np.int32))
  assert "argmax" not in str(jax.make_jaxpr(loss)(*args))
  assert "argmax" in str(jax.make_jaxpr(lambda *a: losses.correct(a[1] @ a[0], a[2]))(*args))


def test_algorithm_init_compiles_nothing():
  """The state's scalars (round, hyperparameters, a systems clock) are placed from the
  host: `jnp.asarray` of a Python number compiles a conversion program in a fresh
  process (6-16 ms each)."""
  import optax
  apply = lambda params, x: x @ params["w"]
  params = {"w": jax.numpy.ones((3, 2))}
  systems = fs.systems.SystemsConfig(fs.systems.sample_profiles(4))
  algorithm = fs.fedprox(apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                         batch_size=2, epochs=1, mu=0.25, systems=systems)
  key = jax.random.key(0)
  jax.clear_caches()
  with count_compiles() as compiles:
    state = algorithm.init(params, key)
  assert compiles == []
  assert state.round.dtype == np.int32 and state.sim_time.dtype == np.float32
  assert state.hp["mu"] == np.float32(0.25) and not state.hp["mu"].weak_type
  assert int(state.round) == 0 and float(state.sim_time) == 0.0


def test_a_registry_algorithm_init_compiles_nothing():
  """The CLI's algorithms build their optimizers from state.hp; built at init from device
  scalars, optax's negated learning rate was an eager multiply, a compile (an optimizer
  with state, e.g. momentum, still compiles its zeros, as optax's init does)."""
  from fedjax_sim import algorithms
  apply = lambda params, x: x @ params["w"]
  params = {"w": jax.numpy.ones((3, 2))}
  algorithm = algorithms.build_algorithm("fedavg", apply, clients_per_round=2, batch_size=2,
                                         epochs=1, server_lr=0.5)  # SGD: no state to zero
  key = jax.random.key(0)
  jax.clear_caches()
  with count_compiles() as compiles:
    state = algorithm.init(params, key)
  assert compiles == []
  for leaf in jax.tree_util.tree_leaves(state):
    assert isinstance(leaf, jax.Array), type(leaf)  # no numpy left in the state
  assert state.hp["server_lr"] == np.float32(0.5)


def test_make_evaluator_compiles_nothing():
  """It places the padded test batches with device_put: jnp.asarray of a numpy array
  compiles a staging program per array (8-23 ms each)."""
  rng = np.random.default_rng(0)
  test = (rng.random((10, 3), np.float32), rng.integers(0, 2, 10))
  apply = lambda params, x: x @ params["w"]
  jax.clear_caches()
  with count_compiles() as compiles:
    evaluate = fs.make_evaluator(apply, test=test, batch_size=4)
  assert compiles == []
  metrics = evaluate({"w": jax.numpy.ones((3, 2))})
  assert metrics["test_accuracy"] == pytest.approx(np.mean(test[1] == 0))  # argmax of ties: 0
