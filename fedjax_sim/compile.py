"""`jit` with the compiler options that make batched per-client math fast on CPU.

On XLA:CPU (jaxlib 0.10) the YNNPACK fusions chosen by default for batched matmuls
made a vmapped round 2x slower than a per-client loop on a 2-core CPU, where plain
XLA dot emission matches it (benchmarks/round_throughput.py measures both). The
option exists only for the CPU backend and not in every jaxlib, so it is applied
only where a probe compile accepts it.
"""

from __future__ import annotations

import functools

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)` on this process's backend."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS)(1.0)
  except Exception:  # an older or newer jaxlib without the option
    return None
  return dict(_CPU_OPTIONS)


def jit(fun=None, **kwargs):
  """`jax.jit` plus `compiler_options()`; usable as a decorator."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
