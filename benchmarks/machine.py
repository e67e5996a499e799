"""What every benchmark records about the machine and the code it ran on."""

from __future__ import annotations

import os
import platform
import subprocess

import jax
import jaxlib

from fedjax_sim import compile as compile_lib


def cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def device_info() -> dict:
  """The first device, the host CPU, versions and the CPU compiler options in force."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "cpu_model": cpu_model(),
          "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__, "python": platform.python_version(),
          "compiler_options": compile_lib.compiler_options()}


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def git_commit() -> str | None:
  """`git describe --always --dirty` of the repository (None outside a checkout)."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
