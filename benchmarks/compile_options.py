"""One of fedjax_sim's XLA:CPU compiler options, with and without: compile time and speed.

`--option level`: `fedjax_sim.compile` compiles rounds on CPU at
`xla_backend_optimization_level` 1 instead of XLA's default (3; levels 1 and 2 gave the
same program here). `--option level0`: level 0 against fedjax_sim's 1 (what a shorter
compile costs the rounds). `--option region`: it turns on
`xla_cpu_copy_insertion_use_region_analysis` (off by default). `--option ynn`: on jaxlib
0.11 and later it gives convolutions to YNNPACK
(`xla_cpu_experimental_ynn_fusion_type`), measured against no YNNPACK fusions (what it
sets before 0.11). `--option dots`: every dot a YNNPACK fusion of its own
(`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`, on jaxlib 0.12 and later), against its other
YNNPACK fusions alone. `--option dense`: not a compiler option but the dense layers'
product: `models.linear_dot_general` (the input gradient as `(kernel @ g.T).T`, which
fedjax_sim's MLP and CNN use) against `lax.dot_general` as plain `nnx.Linear` layers
have it. `--option emitters`: XLA's MLIR fusion emitters (`xla_cpu_use_fusion_emitters`,
jaxlib 0.10) turned off, which fedjax_sim does not do (faster compiles, slower rounds).
Each is measured both ways, side by side, on the peer benchmark's cases
(benchmarks/peers: FedAvg, 10 clients a round, batch 20, the same synthetic MNIST-shaped
clients), every other option as fedjax_sim sets it: for each repetition a fresh worker
process lowers the one-round program once (for `dense` once each way), compiles it both
ways (the order alternates between repetitions) and records each compile's wall and CPU
seconds and the program's copies, then runs the two executables' rounds interleaved
(wall and CPU seconds per round) and the largest parameter difference after them. CPU
seconds count both cores' work, so they vary less on a shared machine than wall seconds.

  python benchmarks/compile_options.py [--option level|level0|region|ynn|dots|dense|emitters] [--repeats 3]

writes benchmarks/results/compile_options_<platform>.md and .json for `level`,
compile_options_<option>_<platform>.* for the others (or `--output PATH.json` and its .md).
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
sys.path.insert(0, str(REPO))
from fedjax_sim.compile import YNN_CONVOLUTIONS, YNN_DOTS, ynn_fusion_type  # noqa: E402

import jaxlib  # noqa: E402

# The YNNPACK fusions fedjax_sim sets on this jaxlib other than dots.
_NOT_DOTS = ",".join(f for f in ynn_fusion_type(jaxlib.__version__).split(",")
                     if f and f != YNN_DOTS)
# --option: (XLA option, the two ways, their labels, the results file's title). A way of
# None leaves the option out (XLA's default).
OPTIONS = {
    "level": ("xla_backend_optimization_level", (None, 1), ("default", "1"),
              "LLVM optimization level of the round on XLA:CPU: 1 (fedjax_sim) against "
              "XLA's default (3)"),
    "level0": ("xla_backend_optimization_level", (1, 0), ("1", "0"),
               "LLVM optimization level of the round on XLA:CPU: 0 against 1 (fedjax_sim)"),
    "region": ("xla_cpu_copy_insertion_use_region_analysis", (None, True), ("off", "on"),
               "Copy insertion with region analysis on XLA:CPU: on (fedjax_sim) against "
               "XLA's default (off)"),
    "ynn": ("xla_cpu_experimental_ynn_fusion_type",
            ("", YNN_CONVOLUTIONS), ("off", "convolutions"),
            "YNNPACK fusions on XLA:CPU: for convolutions (fedjax_sim on jaxlib 0.11 and "
            "later) against none (before)"),
    # The other YNNPACK fusions (convolutions from 0.11) with and without every dot as a
    # YNNPACK fusion of its own (no elementwise ops fused in; fedjax_sim from 0.12).
    "dots": ("xla_cpu_experimental_ynn_fusion_type",
             (_NOT_DOTS, ",".join(filter(None, (_NOT_DOTS, YNN_DOTS)))), ("off", "on"),
             "YNNPACK for each dot on XLA:CPU (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`, "
             "fedjax_sim on jaxlib 0.12 and later) on top of its other YNNPACK fusions, "
             "against without"),
    # Not an XLA option (None): the dense layers' dot_general as the model is built.
    "dense": (None, (False, True), ("plain", "linear_dot_general"),
              "Dense layers through models.linear_dot_general (fedjax_sim's MLP and CNN) "
              "against plain `nnx.Linear`"),
    "emitters": ("xla_cpu_use_fusion_emitters", (None, False), ("on", "off"),
                 "XLA:CPU's MLIR fusion emitters: off against XLA's default (on)"),
}
CASES = {  # name: (model, examples per client, clients, clients per round, rounds timed)
    "mlp100": ("mlp", 100, 100, 10, 20),
    "mlp600": ("mlp", 600, 100, 10, 12),
    "cnn100": ("cnn", 100, 100, 10, 6),
    "scale1000": ("mlp", 100, 1000, 100, 6),
}


def worker(case: str, option: str, order: list) -> dict:
  """One repetition of `case` in this process (see the module docstring)."""
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  import jax
  import numpy as np

  from fedjax_sim import compile as compile_lib
  from fedjax_sim import models, runner

  *task, rounds = CASES[case]
  name, values, labels, _ = OPTIONS[option]
  others = {k: v for k, v in compile_lib._CPU_OPTIONS.items() if k != name}
  way = dict(zip(labels, values))
  options = {label: {**others, **({} if name is None or way[label] is None
                                  else {name: way[label]})} for label in labels}
  # The jit's own options apply under those given to compile: lower without them.
  compile_lib.compiler_options = lambda: None

  def lower():
    algorithm, state, data = common.fedjax_sim_fedavg(*task)
    return runner.make_chunk(algorithm, 1).trace(state, data).lower(), state, data

  if option == "dense":  # the model built and lowered each way
    ours, lowered = models.linear_dot_general, {}
    for label in order:
      models.linear_dot_general = ours if way[label] else jax.lax.dot_general
      jax.clear_caches()  # traces are cached: lower afresh
      lowered[label], state, data = lower()
  else:
    program, state, data = lower()
    lowered = dict.fromkeys(order, program)
  compiled, compile_s, copies = {}, {}, {}
  for label in order:
    wall, cpu = time.perf_counter(), time.process_time()
    compiled[label] = lowered[label].compile(compiler_options=options[label])
    compile_s[label] = (time.perf_counter() - wall, time.process_time() - cpu)
    copies[label] = compiled[label].as_text().count(" copy(")
  states = {label: jax.tree_util.tree_map(lambda a: a.copy(), state) for label in order}
  times = {label: [] for label in order}
  for r in range(rounds + 1):  # round 0 warms up
    for label in (order if r % 2 == 0 else order[::-1]):
      wall, cpu = time.perf_counter(), time.process_time()
      states[label], _ = compiled[label](states[label], data)
      jax.block_until_ready(states[label])
      if r:
        times[label].append((time.perf_counter() - wall, time.process_time() - cpu))
  leaves = [jax.tree_util.tree_leaves(states[label].params) for label in labels]
  max_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(*leaves))
  return {"case": case, "option": option, "order": order, "max_param_diff": max_diff,
          "variants": {label: {
              "compile_wall_s": compile_s[label][0], "compile_cpu_s": compile_s[label][1],
              "copies": copies[label],
              "round_wall_s": statistics.median(t[0] for t in times[label]),
              "round_cpu_s": statistics.median(t[1] for t in times[label])}
              for label in order}}


def run_worker(case: str, option: str, order: list) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, __file__, "--worker", case, option,
                         json.dumps(order)],
                        env=env, capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{case}: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(records: list[dict], option: str) -> list[dict]:
  old, new = OPTIONS[option][2]
  rows = []
  for case in CASES:
    runs = [r for r in records if r["case"] == case]
    if not runs:
      continue
    med = lambda label, key: statistics.median(r["variants"][label][key] for r in runs)
    ratio = lambda key: statistics.median(
        r["variants"][new][key] / r["variants"][old][key] for r in runs)
    rows.append({"case": case, "runs": len(runs),
                 **{f"{key}_{label}": med(label, key) for label in (old, new)
                    for key in ("compile_wall_s", "compile_cpu_s", "copies", "round_wall_s",
                                "round_cpu_s")},
                 **{f"{key}_ratio": ratio(key) for key in
                    ("compile_wall_s", "compile_cpu_s", "round_wall_s", "round_cpu_s")},
                 "max_param_diff": max(r["max_param_diff"] for r in runs)})
  return rows


def markdown(rows: list[dict], info: dict, option: str) -> str:
  ms = lambda s: f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
  name, _, (old, new), title = OPTIONS[option]
  what = ("at both levels" if option.startswith("level") else f"with `{name}` off and on" if name
          else f"with the model built and lowered each way ({old}, {new})")
  lines = [
      f"# {title}", "",
      f"Device: {info['device']}. jax {info['jax']}, {info['when']}, commit {info['commit']}: "
      f"`{info['command']}`.", "",
      "Each case: the one-round FedAvg program of benchmarks/peers (10 clients a round, "
      "batch 20; scale1000: 100 of 1,000 clients) "
      + ("lowered once per fresh process and " if name else "") +
      f"compiled {what} (order alternating between repetitions), every other option as "
      "fedjax_sim sets it, then both executables' rounds interleaved. Figures: medians "
      f"over repetitions; {new} / {old} is the median of the per-repetition ratios (below "
      f"1: {new} is faster). CPU seconds count both cores and vary less than wall seconds "
      "on a shared machine. Copies: `copy` instructions in the compiled program. Max "
      "parameter difference: between the two executables' parameters after the timed "
      "rounds (same clients, same keys); 0 means the same bits, and where the two round "
      "differently in the last bits, once a ReLU or an argmax flips on one example "
      "training carries the difference on.", "",
      f"| case | compile, {old} | compile, {new} | compile CPU, {old} -> {new} | compile "
      f"CPU {new} / {old} | copies, {old} -> {new} | round, {old} | round, {new} | round "
      f"CPU {new} / {old} | round wall {new} / {old} | max parameter difference | runs |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['case']} | {ms(r[f'compile_wall_s_{old}'])} | {ms(r[f'compile_wall_s_{new}'])}"
        f" | {r[f'compile_cpu_s_{old}']:.2f} -> {r[f'compile_cpu_s_{new}']:.2f} s"
        f" | {r['compile_cpu_s_ratio']:.2f} | {r[f'copies_{old}']:.0f} -> "
        f"{r[f'copies_{new}']:.0f} | {ms(r[f'round_wall_s_{old}'])}"
        f" | {ms(r[f'round_wall_s_{new}'])} | {r['round_cpu_s_ratio']:.2f}"
        f" | {r['round_wall_s_ratio']:.2f} | {r['max_param_diff']:.1e} | {r['runs']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--option", choices=list(OPTIONS), default="level")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker[0], args.worker[1], json.loads(args.worker[2]))))
    return
  sys.path.insert(0, str(REPO / "benchmarks"))
  import jax

  import machine
  labels = list(OPTIONS[args.option][2])
  records = []
  for rep in range(args.repeats):
    for case in args.cases:
      order = labels if rep % 2 == 0 else labels[::-1]
      records.append(run_worker(case, args.option, order))
      print(json.dumps(records[-1]), flush=True)
  dev = machine.device_info()
  info = machine.results_info(dev, "compile_options.py " + " ".join(argv or sys.argv[1:]),
                              jax=jax.__version__)
  rows = summarize(records, args.option)
  stem = "compile_options" + ("" if args.option == "level" else f"_{args.option}")
  machine.write_results(args.output, stem, info, dev, rows, records,
                        markdown(rows, info, args.option))

if __name__ == "__main__":
  main()
