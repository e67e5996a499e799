"""XLA:CPU's LLVM optimization level for fedjax_sim's round: compile time against speed.

`fedjax_sim.compile` compiles rounds on CPU at `xla_backend_optimization_level` 1
instead of XLA's default (3; levels 1 and 2 gave the same program here). This measures both, side by side, on the peer benchmark's
cases (benchmarks/peers: FedAvg, 10 clients a round, batch 20, the same synthetic
MNIST-shaped clients): for each repetition a fresh worker process lowers the one-round
program once, compiles it at both levels (the order alternates between repetitions) and
records each compile's wall and CPU seconds, then runs the two executables' rounds
interleaved (wall and CPU seconds per round) and the largest parameter difference after
them. CPU seconds count both cores' work, so they vary less on a shared machine than
wall seconds.

  python benchmarks/compile_options.py [--repeats 3]

writes benchmarks/results/compile_options_<platform>.md and .json (or `--output
PATH.json` and its .md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
LEVELS = ("default", 1)  # "default": the option left out
CASES = {  # name: (model, examples per client, clients, clients per round, rounds timed)
    "mlp100": ("mlp", 100, 100, 10, 20),
    "mlp600": ("mlp", 600, 100, 10, 12),
    "cnn100": ("cnn", 100, 100, 10, 6),
    "scale1000": ("mlp", 100, 1000, 100, 6),
}


def worker(case: str, order: list) -> dict:
  """One repetition of `case` in this process (see the module docstring)."""
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  import jax
  import numpy as np
  import optax

  import fedjax_sim as fs
  from fedjax_sim import compile as compile_lib
  from fedjax_sim import runner

  kind, examples, clients, per_round, rounds = CASES[case]
  xs, ys = zip(*(common.client_data(0, i, examples) for i in range(clients)))
  data = fs.from_clients(list(xs), list(ys), num_classes=common.NUM_CLASSES)
  model = fs.mlp(seed=0) if kind == "mlp" else fs.cnn(seed=0)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                        server_optimizer=optax.sgd(1.0), clients_per_round=per_round,
                        batch_size=20, epochs=1)
  state = algorithm.init(model.params, jax.random.key(0))
  # The jit's own options apply under those given to compile: lower without them.
  compile_lib.compiler_options = lambda: None
  lowered = runner.make_chunk(algorithm, 1).trace(state, data).lower()
  others = {k: v for k, v in compile_lib._CPU_OPTIONS.items()
            if k != "xla_backend_optimization_level"}
  compiled, compile_s = {}, {}
  for level in order:
    wall, cpu = time.perf_counter(), time.process_time()
    level_option = {} if level == "default" else {"xla_backend_optimization_level": level}
    compiled[level] = lowered.compile(compiler_options={**others, **level_option})
    compile_s[level] = (time.perf_counter() - wall, time.process_time() - cpu)
  states = {level: jax.tree_util.tree_map(lambda a: a.copy(), state) for level in order}
  times = {level: [] for level in order}
  for r in range(rounds + 1):  # round 0 warms up
    for level in (order if r % 2 == 0 else order[::-1]):
      wall, cpu = time.perf_counter(), time.process_time()
      states[level], _ = compiled[level](states[level], data)
      jax.block_until_ready(states[level])
      if r:
        times[level].append((time.perf_counter() - wall, time.process_time() - cpu))
  leaves = [jax.tree_util.tree_leaves(states[level].params) for level in LEVELS]
  max_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(*leaves))
  return {"case": case, "order": order, "max_param_diff": max_diff,
          "levels": {str(level): {
              "compile_wall_s": compile_s[level][0], "compile_cpu_s": compile_s[level][1],
              "round_wall_s": statistics.median(t[0] for t in times[level]),
              "round_cpu_s": statistics.median(t[1] for t in times[level])}
              for level in order}}


def run_worker(case: str, order: list) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, __file__, "--worker", case, json.dumps(order)],
                        env=env, capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{case}: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(records: list[dict]) -> list[dict]:
  rows = []
  for case in CASES:
    runs = [r for r in records if r["case"] == case]
    if not runs:
      continue
    med = lambda level, key: statistics.median(r["levels"][str(level)][key] for r in runs)
    ratio = lambda key: statistics.median(
        r["levels"]["1"][key] / r["levels"]["default"][key] for r in runs)
    rows.append({"case": case, "runs": len(runs),
                 **{f"{key}_{level}": med(level, key) for level in LEVELS
                    for key in ("compile_wall_s", "compile_cpu_s", "round_wall_s",
                                "round_cpu_s")},
                 **{f"{key}_ratio": ratio(key) for key in
                    ("compile_wall_s", "compile_cpu_s", "round_wall_s", "round_cpu_s")},
                 "max_param_diff": max(r["max_param_diff"] for r in runs)})
  return rows


def markdown(rows: list[dict], info: dict) -> str:
  ms = lambda s: f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
  lines = [
      "# LLVM optimization level of the round on XLA:CPU: 1 (fedjax_sim) against XLA's "
      "default (3)", "",
      f"Device: {info['device']}. jax {info['jax']}, {info['when']}, commit {info['commit']}: "
      f"`{info['command']}`.", "",
      "Each case: the one-round FedAvg program of benchmarks/peers (10 clients a round, "
      "batch 20; scale1000: 100 of 1,000 clients) lowered once per fresh process and "
      "compiled at both levels (order alternating between repetitions), then both "
      "executables' rounds interleaved. Figures: medians over repetitions; level 1 / "
      "default is the median of the per-repetition ratios (below 1: level 1 is "
      "faster). CPU seconds count both cores and vary less than wall seconds on a shared "
      "machine. Max parameter difference: between the two executables' parameters after "
      "the timed rounds (same clients, same keys); the levels round differently in the "
      "last bits, and once a ReLU or an argmax flips on one example training carries the "
      "difference on.", "",
      "| case | compile, default | compile, level 1 | compile CPU, default -> 1 | compile "
      "CPU 1 / default | round, default | round, level 1 | round CPU 1 / default | round "
      "wall 1 / default "
      "| max parameter difference | runs |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['case']} | {ms(r['compile_wall_s_default'])} | {ms(r['compile_wall_s_1'])}"
        f" | {r['compile_cpu_s_default']:.2f} -> {r['compile_cpu_s_1']:.2f} s"
        f" | {r['compile_cpu_s_ratio']:.2f} | {ms(r['round_wall_s_default'])}"
        f" | {ms(r['round_wall_s_1'])} | {r['round_cpu_s_ratio']:.2f}"
        f" | {r['round_wall_s_ratio']:.2f} | {r['max_param_diff']:.1e} | {r['runs']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
    return
  sys.path.insert(0, str(REPO / "benchmarks"))
  import jax

  import machine
  records = []
  for rep in range(args.repeats):
    for case in args.cases:
      order = list(LEVELS) if rep % 2 == 0 else list(LEVELS[::-1])
      records.append(run_worker(case, order))
      print(json.dumps(records[-1]), flush=True)
  dev = machine.device_info()
  info = machine.results_info(dev, "compile_options.py " + " ".join(argv or sys.argv[1:]),
                              jax=jax.__version__)
  rows = summarize(records)
  machine.write_results(args.output, "compile_options", info, dev, rows, records,
                        markdown(rows, info))

if __name__ == "__main__":
  main()
