"""`jit` with the compiler options that make federated rounds fast on CPU.

On XLA:CPU three options apply:

- YNNPACK fusions off, but on jaxlib 0.11 and later for convolutions and on 0.12 and
  later for every dot on its own: on jaxlib 0.10 the YNNPACK fusions chosen by default
  for batched matmuls made a vmapped round 2x slower than a per-client loop on a 2-core
  CPU, where plain XLA dot emission matches it (benchmarks/round_throughput.py), and its
  convolutions made the CNN's round 1.30x slower than Eigen's. From jaxlib 0.11 its
  convolutions are the faster (the CNN's round 0.85x on 0.11, 0.91x on 0.12;
  benchmarks/compile_options.py --option ynn); programs without a convolution compile
  as with the fusions off, to the bit. On jaxlib 0.12 each dot alone in a YNNPACK fusion
  (no elementwise ops fused in) took the MLP rounds 0.90-0.92x the time and the CNN's
  1.01x (--option dots); on 0.11 0.91-0.95x the wall time but 1.04-1.08x the CPU time,
  and on 0.10 1.13-1.21x, so dots stay with XLA there.
- LLVM optimization level 1 instead of XLA's default (3): the peer benchmark's rounds
  compile with 14-22% less CPU time (jax 0.10; 13-30% on jax 0.12) and run as
  fast (benchmarks/compile_options.py). Float results differ from level 3's in the
  last bits, and training can amplify that as any change of float order does. An
  `xla_backend_optimization_level` in XLA_FLAGS is left to win.
- Copy insertion with region analysis (off by default in XLA): without it a
  loop that reads a carried buffer and then updates it in place gets a copy of it every
  iteration, e.g. of the CNN's 3136x512 dense kernel in every local step (the step reads
  it twice, then SGD writes it). With it the peer benchmark's rounds have a third fewer
  copies and take 0.92-0.98x the time, the same parameters to the bit, compiled in the
  same time (benchmarks/compile_options.py --option region).

An option exists only for the CPU backend and not in every jaxlib. The jaxlibs this
project is tested on (0.10 to 0.12) accept them all; on any other each is applied only
where a probe compile accepts it: one probe of them all, and one per option only if that
fails (each probe is a compile: 26-30 ms of every process's start-up on jax 0.12,
28-40 ms on 0.10).
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jaxlib

YNN_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
YNN_DOTS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def major_minor(version: str = jaxlib.__version__) -> tuple[int, ...]:
  """(major, minor) of a version string, by default this process's jaxlib's."""
  return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def ynn_fusion_type(jaxlib_version: str) -> str:
  """The YNNPACK fusions to turn on (comma-separated): convolutions from jaxlib 0.11,
  dots too from 0.12, none before 0.11."""
  return ",".join(fusions for fusions, since in ((YNN_CONVOLUTIONS, (0, 11)),
                                                  (YNN_DOTS, (0, 12)))
                  if major_minor(jaxlib_version) >= since)


_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ynn_fusion_type(jaxlib.__version__),
                "xla_backend_optimization_level": 1,
                "xla_cpu_copy_insertion_use_region_analysis": True}


# jaxlibs (major, minor) that accept every option of _CPU_OPTIONS without a probe.
_TESTED_JAXLIBS = ((0, 10), (0, 11), (0, 12))


def _accepted(option: dict) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=option)(1.0)
  except Exception:  # an older or newer jaxlib without the option
    return False
  return True


@functools.cache
def compiler_options() -> dict[str, str | int] | None:
  """Options for `jax.jit(..., compiler_options=...)` on this process's backend: those
  of `_CPU_OPTIONS` that this jaxlib accepts and XLA_FLAGS does not set."""
  if jax.default_backend() != "cpu":
    return None
  user_flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in _CPU_OPTIONS.items() if k not in user_flags}
  if options and major_minor() not in _TESTED_JAXLIBS and not _accepted(options):
    options = {k: v for k, v in options.items() if _accepted({k: v})}
  return options or None


def jit(fun=None, **kwargs):
  """`jax.jit` plus `compiler_options()`; usable as a decorator."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
