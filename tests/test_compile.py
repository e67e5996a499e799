"""fedjax_sim.compile: which XLA options a round compiles with, and when a user's flag wins."""

import jax
import pytest

from fedjax_sim import compile as compile_lib

options = compile_lib.compiler_options.__wrapped__  # uncached: each test sets its own env
LEVEL = "xla_backend_optimization_level"


@pytest.fixture
def cpu(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the options are CPU-only")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  return monkeypatch


def test_cpu_rounds_compile_at_llvm_level_1_with_ynnpack_fusions_off(cpu):
  assert options() == {"xla_cpu_experimental_ynn_fusion_type": "", LEVEL: 1}


@pytest.mark.parametrize("flags", ["--xla_backend_optimization_level=0",
                                   "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=3"])
def test_an_optimization_level_in_xla_flags_wins(cpu, flags):
  cpu.setenv("XLA_FLAGS", flags)
  assert options() == {"xla_cpu_experimental_ynn_fusion_type": ""}


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
