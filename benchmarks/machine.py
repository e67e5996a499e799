"""What every benchmark records about the machine and the code it ran on."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
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


def device_name(dev: dict) -> str:
  """How a results file names the device of `device_info()`."""
  if dev["platform"] == "cpu":
    return f"{dev['cpu_count']} CPUs ({dev['cpu_model']})"
  return dev["device_kind"]


def results_info(dev: dict, command: str, **extra) -> dict:
  """What a results file says it ran on: device, commit, when, command, and `extra`."""
  return {"device": device_name(dev), **extra, "commit": git_commit(),
          "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": command}


def write_results(output: str | None, stem: str, info: dict, dev: dict, rows: list,
                  records: list, markdown: str) -> None:
  """`output` (or benchmarks/results/<stem>_<platform>.json) with info, machine, rows and
  every record, the markdown beside it as .md; prints the markdown."""
  out = (pathlib.Path(output).with_suffix("") if output else
         pathlib.Path(__file__).resolve().parent / "results" / f"{stem}_{dev['platform']}")
  out.with_suffix(".json").write_text(json.dumps(
      {"info": info, "machine": dev, "rows": rows, "records": records}, indent=1) + "\n")
  out.with_suffix(".md").write_text(markdown)
  print(markdown)


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


@contextlib.contextmanager
def git_worktree(rev: str):
  """A temporary git worktree of the repository at `rev` (its path), removed afterwards:
  fedjax_sim as of `rev`, to put first on a worker's path for a before/after run."""
  repo = os.path.dirname(os.path.abspath(__file__))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "baseline")
    subprocess.run(["git", "worktree", "add", "--detach", path, rev], cwd=repo, check=True,
                   capture_output=True)
    try:
      yield path
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", path], cwd=repo,
                     capture_output=True)


def short_rev(rev: str) -> str:
  """`rev`'s abbreviated commit hash."""
  return subprocess.run(["git", "rev-parse", "--short", rev], check=True, text=True,
                        capture_output=True,
                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()


def _median_seconds(fn, x, repeats: int) -> float:
  """Median seconds of `x = fn(x)` (chained, so a donating `fn` updates in place)."""
  x = jax.block_until_ready(fn(x))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_peaks(repeats: int = 10) -> dict:
  """The device's measured float32 matmul rate and memory bandwidth: a roofline's two roofs.

  Matmul: a square float32 product at JAX's default precision (what the models use; on
  NVIDIA GPUs that is TF32), 2 n^3 FLOPs. Bandwidth: `x + 1` in place (donated, so
  no fresh pages are touched) on an array far larger than any cache, which reads and
  writes it once (2 x its bytes). Both are what this device achieves through XLA, not
  its datasheet peaks.
  """
  accelerator = jax.devices()[0].platform != "cpu"
  n = 8192 if accelerator else 2048
  mib = 2048 if accelerator else 512
  a = jnp.ones((n, n), jnp.float32)
  b = jnp.full((n, n), 1.0 / n, jnp.float32)  # a @ b == a: the chained values stay finite
  matmul_s = _median_seconds(jax.jit(lambda a: a @ b), a, repeats=repeats)
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  copy_s = _median_seconds(jax.jit(lambda x: x + 1, donate_argnums=0), x, repeats=repeats)
  del a, b, x
  return {"matmul_flops_per_s": 2 * n**3 / matmul_s, "matmul_n": n,
          "memory_bytes_per_s": 2 * mib * 2**20 / copy_s, "bandwidth_array_mib": mib}
