"""fedjax_sim.compile: which XLA options a round compiles with, and when a user's flag wins."""

import jax
import pytest

from fedjax_sim import compile as compile_lib

options = compile_lib.compiler_options.__wrapped__  # uncached: each test sets its own env
LEVEL = "xla_backend_optimization_level"
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
REGION = {"xla_cpu_copy_insertion_use_region_analysis": True}


@pytest.fixture
def cpu(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the options are CPU-only")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  return monkeypatch


def test_cpu_rounds_compile_at_llvm_level_1_without_ynnpack_with_region_analysis(cpu):
  assert options() == {**NO_YNN, LEVEL: 1, **REGION}


@pytest.mark.parametrize("flags", ["--xla_backend_optimization_level=0",
                                   "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=3"])
def test_an_optimization_level_in_xla_flags_wins(cpu, flags):
  cpu.setenv("XLA_FLAGS", flags)
  assert options() == {**NO_YNN, **REGION}


def test_an_option_this_jaxlib_rejects_is_left_out(cpu):
  cpu.setattr(compile_lib, "_CPU_OPTIONS",
              {"xla_cpu_no_such_option_anywhere": True, LEVEL: 1})
  assert options() == {LEVEL: 1}
  cpu.setattr(compile_lib, "_CPU_OPTIONS", {"xla_cpu_no_such_option_anywhere": True})
  assert options() is None


def test_other_backends_get_no_options(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert options() is None


def test_the_jit_applies_them(cpu):
  cpu.setattr(compile_lib, "compiler_options", options)
  seen = {}
  real_jit = jax.jit

  def spy(fun, **kwargs):
    seen.update(kwargs)
    return real_jit(fun, **kwargs)

  cpu.setattr(jax, "jit", spy)
  assert compile_lib.jit(lambda x: x * 2)(3.0) == 6.0
  assert seen["compiler_options"][LEVEL] == 1


def test_the_drjax_peer_compiles_with_the_same_options():
  """benchmarks/peers/run_drjax.py runs without fedjax_sim and keeps a copy of the options
  for its 'fedjax_sim's compiler options' row."""
  import ast
  import pathlib
  source = (pathlib.Path(__file__).parents[1] / "benchmarks" / "peers" / "run_drjax.py")
  tree = ast.parse(source.read_text())
  copy = next(ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign)
              and getattr(node.targets[0], "id", None) == "FEDJAX_SIM_CPU_OPTIONS")
  assert copy == compile_lib._CPU_OPTIONS


def test_one_probe_compile_when_this_jaxlib_accepts_every_option(cpu):
  probed = []
  real = compile_lib._accepted
  cpu.setattr(compile_lib, "_accepted", lambda option: probed.append(option) or real(option))
  assert options() == compile_lib._CPU_OPTIONS
  assert probed == [compile_lib._CPU_OPTIONS]


def test_region_analysis_drops_the_per_step_copies_of_the_client_weights(cpu):
  """Without it, a local step that reads its layer weights (forward and backward) and
  then updates them in place copies them every step: here the three clients' 200x200
  hidden layer, f32[3,200,200]."""
  import re

  import numpy as np
  import optax

  import fedjax_sim as fs
  from fedjax_sim import runner

  rng = np.random.default_rng(0)
  data = fs.from_clients([rng.random((8, 5), np.float32) for _ in range(6)],
                         [rng.integers(0, 3, 8) for _ in range(6)], num_classes=3)
  model = fs.mlp(num_features=5, num_classes=3)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1), clients_per_round=3,
                        batch_size=4, epochs=1)
  state = algorithm.init(model.params, jax.random.key(0))
  lowered = jax.jit(runner.make_chunk.__wrapped__(algorithm, 1).__wrapped__).trace(
      state, data).lower()
  weight_copies = lambda options: len(re.findall(
      r"f32\[3,200,200\]\{[\d,]*\} copy\(", lowered.compile(compiler_options=options).as_text()))
  without = {k: v for k, v in options().items() if k not in REGION}
  assert weight_copies(without) >= 1
  assert weight_copies(options()) == 0
