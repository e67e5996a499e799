"""How exactly the server's weighted mean is computed on this device, against float64.

`tree.weighted_sum` (every mean of client updates) multiplies and sums: float32
arithmetic on any device, where a default-precision float32 dot rounds its inputs to
TensorFloat-32 on recent NVIDIA GPUs (bfloat16 on TPUs). This measures, on random client
updates of a few sizes, the relative error ||out - ref|| / ||ref|| against a float64
numpy reference of:
- `tree.weighted_sum` (what fedjax_sim aggregates with),
- a dot at `Precision.HIGHEST` (what it did before),
- a dot at default precision (what a plain `w @ updates` does),
and the median time of each (block_until_ready). On a CPU all three are float32
arithmetic; on a GPU the default-precision dot shows TF32's error (~1e-4).

  python benchmarks/aggregation_precision.py --output benchmarks/results/aggregation_precision_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import tree

VARIANTS = {
    "weighted_sum (multiply, sum)": tree.weighted_sum,
    "dot, HIGHEST precision": lambda w, d: jnp.tensordot(
        w, d, axes=1, precision=jax.lax.Precision.HIGHEST),
    "dot, default precision": lambda w, d: jnp.tensordot(w, d, axes=1),
}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", nargs="+", default=["10x199210", "100x199210", "100x1663370"],
                 help="clients x parameters")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--output", default=None)
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  rows = []
  for size in args.sizes:
    clients, params = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(clients * 7 + params)
    updates = rng.standard_normal((clients, params)).astype(np.float32)
    weights = rng.uniform(1, 600, clients).astype(np.float32)
    weights /= weights.sum()
    ref = weights.astype(np.float64) @ updates.astype(np.float64)
    d, w = jnp.asarray(updates), jnp.asarray(weights)
    for name, fn in VARIANTS.items():
      f = jax.jit(fn)
      out = np.asarray(f(w, d), np.float64)
      err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        f(w, d).block_until_ready()
        times.append(time.perf_counter() - t)
      rows.append({"clients": clients, "params": params, "variant": name,
                   "rel_error_vs_float64": err, "median_s": statistics.median(times)})
      print(f"{size:>12} {name:<28} rel err {err:.2e}  {statistics.median(times) * 1e3:.3f} ms",
            flush=True)
  result = {"device": f"{dev.platform}: {dev.device_kind}", "jax": jax.__version__,
            "rows": rows}
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
