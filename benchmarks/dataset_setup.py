"""Setting up a large federated dataset: `fs.from_clients` and the finite-feature check.

Each repetition runs a fresh worker process per way, the order rotating so that each
way runs as often first, second and last (a process's first touches of memory depend
on what the one before it freed). The ways: "fedjax_sim" as the package does it;
"numpy pages", the same with the padded arrays' memory from `np.zeros` (which asks for
transparent huge pages) instead of an `mmap` of small pages; "one thread", that with the
clients copied into the padded arrays on one thread instead of a thread per core; and
"before", the
same code with the three earlier choices put back: one thread, padded arrays from
`np.zeros` (16-byte aligned, so on CPU `jax.device_put` copies the whole dataset instead
of keeping the array) and `checks.check_finite_features` over all the features at once
(one temporary a quarter of the data's size). Each worker makes the peers' MNIST-shaped
clients (benchmarks/peers/common.py, 100 examples each), then times `fs.from_clients` and
`check_finite_features`, and reads its peak memory. Fresh memory is what the ways
spend their time on, so only fresh processes measure it.

  python benchmarks/dataset_setup.py [--clients 1000] [--repeats 6]

writes benchmarks/results/dataset_setup_<platform>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
WAYS = ("before", "one thread", "numpy pages", "fedjax_sim")


def worker(way: str, clients: int) -> dict:
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  import jax
  import numpy as np

  import fedjax_sim as fs
  from fedjax_sim import checks
  from fedjax_sim import data as data_lib
  if way in ("before", "one thread"):
    data_lib._PARALLEL_FILL_BYTES = 2**62
  if way in ("before", "one thread", "numpy pages"):
    data_lib._SMALL_PAGES_BYTES = 2**62
  if way == "before":
    data_lib._aligned_zeros = lambda shape, dtype: np.zeros(shape, dtype)
    checks._FINITE_BLOCK = 2**62
  xs, ys = zip(*(common.client_data(0, i, 100) for i in range(clients)))
  start = time.perf_counter()
  data = jax.block_until_ready(fs.from_clients(list(xs), list(ys), num_classes=10))
  build = time.perf_counter() - start
  start = time.perf_counter()
  checks.check_finite_features(data)
  check = time.perf_counter() - start
  return {"way": way, "from_clients_s": build, "check_finite_s": check,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--clients", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=6)
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
    return
  sys.path.insert(0, str(REPO / "benchmarks"))
  import jax

  import machine
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  records = []
  for rep in range(args.repeats):
    for way in WAYS[rep % len(WAYS):] + WAYS[:rep % len(WAYS)]:  # each way in each place
      out = subprocess.run([sys.executable, __file__, "--worker", way, str(args.clients)],
                           env=env, capture_output=True, text=True, check=True, cwd=REPO)
      records.append({"repeat": rep, **json.loads(out.stdout.strip().splitlines()[-1])})
      print(json.dumps(records[-1]), flush=True)
  keys = ("from_clients_s", "check_finite_s", "peak_rss_mb")
  rows = [{"way": way, **{k: statistics.median(r[k] for r in records if r["way"] == way)
                          for k in keys},
           **{f"{k}_all": [round(r[k], 3) for r in records if r["way"] == way] for k in keys}}
          for way in WAYS]
  dev = machine.device_info()
  info = machine.results_info(dev, "dataset_setup.py " + " ".join(argv or sys.argv[1:]),
                              jax=jax.__version__, clients=args.clients)
  lines = [f"# Setting up {args.clients:,} MNIST-shaped clients of 100 examples "
           f"({info['device']})", "",
           f"{info['when']}, commit {info['commit']}, jax {info['jax']}: `{info['command']}`. "
           "Fresh worker processes, the order rotating (benchmarks/dataset_setup.py says what "
           "\"before\" and \"one thread\" put back); medians, then every run.", "",
           "| way | from_clients | check_finite_features | peak memory | every run (from_clients, "
           "check) |", "| --- | ---: | ---: | ---: | --- |"]
  lines += [f"| {r['way']} | {r['from_clients_s']:.2f} s | {r['check_finite_s']:.3f} s | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB | "
            + ", ".join(f"{a:.2f}/{b:.3f}" for a, b in zip(r["from_clients_s_all"],
                                                          r["check_finite_s_all"])) + " |"
            for r in rows]
  machine.write_results(args.output, "dataset_setup", info, dev, rows, records,
                        "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
