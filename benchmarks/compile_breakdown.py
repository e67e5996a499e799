"""Where a round's compile time goes: XLA:CPU fusions, counted by what they compute.

XLA:CPU compiles every fusion of a program as a kernel of its own (MLIR, then LLVM), so
its compile time grows with the number of fusions more than with their size. Two parts:

- per fusion: synthetic programs of K independent small elementwise fusions (`sin(a) * 2
  + 1` or `exp(a) - a`, each on an array of its own shape), K = 8 ... 128, compiled with
  fedjax_sim's CPU options; the least-squares slope of compile seconds against the
  fusions. (Not sums: on jaxlib 0.11+ the YNNPACK option that `compile.py` sets keeps
  a sum's multiply out of its reduction's fusion, which doubles a sum's fusions.)
- the peer benchmark's rounds (benchmarks/peers: FedAvg, 1 local epoch of batch 20 on
  100 examples per client; the MLP or the CNN, 10 of 100 clients a round; the MLP, 100
  of 1,000 clients): each repetition compiles each case in a fresh process, times
  `lowered.compile()`, and counts the compiled round's fusions whose op names (kept in
  XLA's metadata) come from the random keys: jax's threefry hash, in key splits,
  `fold_in`, uniform draws and the client-sampling shuffle, which jax lowers on CPU as a
  loop of five iterations, three fusions each, plus fusions around it. The rest: local
  training, sampling, aggregation, the server update, metrics.

  python benchmarks/compile_breakdown.py [--repeats 3] [--cases mlp100 cnn100 scale1000]

writes benchmarks/results/compile_breakdown_<platform>.md and .json (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = {  # name: (model, examples per client, clients, clients per round)
    "mlp100": ("mlp", 100, 100, 10),
    "cnn100": ("cnn", 100, 100, 10),
    "scale1000": ("mlp", 100, 1000, 100),
}
SIZES = (8, 32, 64, 128)
RANDOM = re.compile(r"threefry|fold_in|_uniform|RngStream|_shuffle|random_bits|_split")
FUSION = re.compile(r"^\s*(?:ROOT )?%\S+ = .* fusion\(.*")


def categorize(hlo_text: str) -> dict[str, int]:
  """Fusions of a compiled program's text, by what their op names say they compute."""
  counts = {"random keys": 0, "rest": 0}
  for line in hlo_text.splitlines():
    if FUSION.match(line):
      op = re.search(r'op_name="([^"]*)"', line)
      counts["random keys" if op and RANDOM.search(op.group(1)) else "rest"] += 1
  return counts


def round_worker(case: str) -> dict:
  from fedjax_sim import runner
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  algorithm, state, data = common.fedjax_sim_fedavg(*CASES[case])
  lowered = runner.make_chunk(algorithm, 1).trace(state, data).lower()
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  counts = categorize(text)
  return {"case": case, "compile_s": seconds, "fusions": sum(counts.values()),
          "by_origin": counts, "loops": text.count(" while(")}


def synthetic_worker(rep: int) -> list[dict]:
  """Compile seconds of programs of K independent fusions (shapes shifted by `rep`, so no
  compilation is reused)."""
  import jax
  import jax.numpy as jnp
  from fedjax_sim import compile as compile_lib

  def program(arrays):
    return [jnp.sin(a) * 2.0 + 1.0 if i % 2 else jnp.exp(a) - a for i, a in enumerate(arrays)]

  jax.block_until_ready(compile_lib.jit(lambda x: x + 1)(1.0))  # the backend's start-up
  rows = []
  for k in SIZES:
    arrays = [jax.ShapeDtypeStruct((100 + 131 * rep + i, 37), jnp.float32) for i in range(k)]
    lowered = compile_lib.jit(program).lower(arrays)
    start = time.perf_counter()
    compiled = lowered.compile()
    rows.append({"k": k, "compile_s": time.perf_counter() - start,
                 "fusions": compiled.as_text().count(" fusion(")})
  return rows


def run_worker(*args: str):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=env,
                        capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{args}: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[float, float]]) -> float:
  """Least-squares slope of y against x."""
  mx = statistics.fmean(x for x, _ in points)
  my = statistics.fmean(y for _, y in points)
  return (sum((x - mx) * (y - my) for x, y in points)
          / sum((x - mx) ** 2 for x, _ in points))


def markdown(info: dict, dev: dict, per_fusion: float, synthetic: list, rows: list) -> str:
  lines = [f"# Where a round's compile time goes ({info['device']})", "",
           f"{info['when']}, commit {info['commit']}, jax {dev['jax_version']}, python "
           f"{dev['python']}: `{info['command']}`. Each figure: the median over "
           f"{info['repeats']} fresh processes.", "",
           "## Compile time per fusion (synthetic)", "",
           "| fusions | compile |", "| ---: | ---: |"]
  for k in SIZES:
    lines.append(f"| {k} | {statistics.median(r['compile_s'] for r in synthetic if r['k'] == k) * 1e3:.0f}"
                 " ms |")
  lines += ["", f"Slope: **{per_fusion * 1e3:.1f} ms per fusion** (these fusions are "
            "larger than most of a round's).", "",
            "## The peer benchmark's rounds", "",
            "| case | compile | fusions | per fusion | of them random keys | loops |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    keys = r["by_origin"]["random keys"]
    lines.append(f"| {r['case']} | {r['compile_s']:.2f} s | {r['fusions']} | "
                 f"{r['compile_s'] / r['fusions'] * 1e3:.1f} ms | {keys} "
                 f"({keys / r['fusions']:.0%}) | {r['loops']} |")
  lines += ["", "Per fusion: the compile time over the fusions. Random keys: fusions whose op "
            "names come from jax's threefry hash (key splits, `fold_in`, uniform draws, the "
            "sampling shuffle). Loops: while loops in the compiled round (each threefry "
            "hash is one on CPU; the local steps and, where clients train in chunks, the "
            "chunks are others)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    kind, arg = args.worker
    print(json.dumps(round_worker(arg) if kind == "round" else synthetic_worker(int(arg))))
    return
  sys.path.insert(0, str(REPO / "benchmarks"))
  import machine
  synthetic, records = [], []
  for rep in range(args.repeats):
    synthetic += run_worker("synthetic", str(rep))
    for case in (args.cases if rep % 2 == 0 else args.cases[::-1]):
      records.append(run_worker("round", case))
      print(json.dumps(records[-1]), flush=True)
  per_fusion = slope([(r["fusions"], r["compile_s"]) for r in synthetic])
  rows = []
  for case in args.cases:
    runs = [r for r in records if r["case"] == case]
    rows.append({**runs[0], "compile_s": statistics.median(r["compile_s"] for r in runs)})
  dev = machine.device_info()
  info = machine.results_info(dev, "compile_breakdown.py " + " ".join(argv or sys.argv[1:]),
                              repeats=args.repeats)
  machine.write_results(args.output, "compile_breakdown", info, dev,
                        [{"per_fusion_s": per_fusion, "synthetic": synthetic}] + rows, records,
                        markdown(info, dev, per_fusion, synthetic, rows))


if __name__ == "__main__":
  main()
