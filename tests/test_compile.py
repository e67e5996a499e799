"""fedjax_sim.compile: which XLA options a round compiles with, and when a user's flag wins."""

import jax
import jaxlib
import pytest

from fedjax_sim import compile as compile_lib

options = compile_lib.compiler_options.__wrapped__  # uncached: each test sets its own env
LEVEL = "xla_backend_optimization_level"
YNN = {"xla_cpu_experimental_ynn_fusion_type": compile_lib.ynn_fusion_type(jaxlib.__version__)}
REGION = {"xla_cpu_copy_insertion_use_region_analysis": True}


@pytest.fixture
def cpu(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the options are CPU-only")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  return monkeypatch


def test_cpu_rounds_compile_at_llvm_level_1_with_region_analysis(cpu):
  assert options() == {**YNN, LEVEL: 1, **REGION}


CONV, BOTH = (compile_lib.YNN_CONVOLUTIONS,
              f"{compile_lib.YNN_CONVOLUTIONS},{compile_lib.YNN_DOTS}")


@pytest.mark.parametrize("version, fusions", [
    ("0.10.2", ""), ("0.10.99", ""), ("0.11.0", CONV), ("0.11.2", CONV), ("0.11.99", CONV),
    ("0.12.0", BOTH), ("0.12.0.1", BOTH), ("0.12.0.dev20261101", BOTH), ("0.13.1", BOTH),
    ("1.0.0", BOTH)])
def test_ynnpack_takes_convolutions_from_jaxlib_0_11_and_dots_from_0_12(version, fusions):
  """Before 0.11 YNNPACK's convolutions were the slower, so no YNNPACK fusion at all; its
  dots, each alone, were slower for the MLP rounds before 0.12 (1.13-1.21x on 0.10, more
  CPU time on 0.11) and faster from 0.12 (benchmarks/compile_options.py --option dots)."""
  assert compile_lib.ynn_fusion_type(version) == fusions


@pytest.mark.parametrize("flags", ["--xla_backend_optimization_level=0",
                                   "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=3"])
def test_an_optimization_level_in_xla_flags_wins(cpu, flags):
  cpu.setenv("XLA_FLAGS", flags)
  assert options() == {**YNN, **REGION}


def test_an_option_this_jaxlib_rejects_is_left_out(cpu):
  cpu.setattr(compile_lib, "_TESTED_JAXLIBS", ())  # a jaxlib that gets the probe
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


def test_the_drjax_peer_compiles_with_the_same_options(cpu):
  """benchmarks/peers/run_drjax.py runs without fedjax_sim; for its 'fedjax_sim's
  compiler options' row it loads fedjax_sim/compile.py by itself."""
  import pathlib
  cpu.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks" / "peers"))
  import common
  alone = common.fedjax_sim_compile()
  assert pathlib.Path(alone.__file__).samefile(compile_lib.__file__)
  assert alone.compiler_options() == options()


def test_a_tested_jaxlib_takes_every_option_without_a_probe_compile(cpu):
  """A probe is a compile (26-40 ms of start-up); the jaxlibs the project is tested on
  skip it, and this one, if it is among them, must accept every option."""
  probed = []
  real = compile_lib._accepted
  cpu.setattr(compile_lib, "_accepted", lambda option: probed.append(option) or real(option))
  assert options() == compile_lib._CPU_OPTIONS
  tested = compile_lib.major_minor() in compile_lib._TESTED_JAXLIBS
  assert probed == ([] if tested else [compile_lib._CPU_OPTIONS])
  assert real(compile_lib._CPU_OPTIONS)


def test_an_untested_jaxlib_gets_one_probe_compile_when_it_accepts_every_option(cpu):
  cpu.setattr(compile_lib, "_TESTED_JAXLIBS", ())
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
