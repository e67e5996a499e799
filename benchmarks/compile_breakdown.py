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
  training, sampling, aggregation, the server update, metrics. A case with the suffix
  `_fewer_hashes` is the round with two hashes fewer (`fewer_hashes()`), a trial; one
  with `_no_keys` the round with no hash at all (`no_keys()`), a bound on what the keys
  cost. Each case also records the round's trace and lowering seconds.
- with `--phases`, the compile's phases from jax's profiler: XLA's HLO passes, its
  fusion emitters (one MLIR kernel per fusion) and LLVM's code generation, the last two
  on XLA's compile threads.

  python benchmarks/compile_breakdown.py [--repeats 3] [--cases mlp100 cnn100 scale1000]
      [--phases] [--no-synthetic]

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
FEWER_HASHES = "_fewer_hashes"  # a case name's suffix: the round with fewer_hashes()
NO_KEYS = "_no_keys"  # a case name's suffix: the round with no_keys()
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


def fewer_hashes() -> None:
  """Two threefry hashes fewer in the round (a trial; it changes every run's random
  stream): an example's sort key one uniform draw of the epoch's key at its index,
  instead of a draw from the key folded with its index, and the clients sampled by one
  draw of random bits and an argsort, instead of `jax.random.choice`'s key split and
  draw."""
  import jax
  import jax.numpy as jnp
  from fedjax_sim import local
  from fedjax_sim.algorithms import engine
  local._sort_keys = lambda key, size: jax.random.uniform(key, (size,))
  engine.sample_clients = lambda key, num_clients, k: jnp.argsort(
      jax.random.bits(key, (num_clients,)), stable=True)[:k]


def no_keys() -> None:
  """The round without a single threefry hash, a bound and not a simulator: every key is
  the state's key, the first clients train every round, and an example's sort key is a
  fixed function of its index. Called after the model's initialization, which keeps its
  own hashes."""
  import jax
  import jax.numpy as jnp
  from fedjax_sim import keys, local
  from fedjax_sim.algorithms import engine
  keys.round_keys = lambda key: (key, key, key)
  keys.client_key = lambda train_key, client_id: train_key
  engine.sample_clients = lambda key, num_clients, k: jnp.arange(k)
  local._sort_keys = lambda key, size: jnp.sin(jnp.arange(size) * 1.7)
  jax.random.fold_in = lambda key, data: key  # the epochs' keys in local training


def round_worker(case: str, phases: bool = False) -> dict:
  """The case's round compiled once: seconds, fusions by origin and loops; with `phases`,
  compiled under jax's profiler instead, and the compile's phases from its trace."""
  from fedjax_sim import runner
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  if case.endswith(FEWER_HASHES):
    fewer_hashes()
  algorithm, state, data = common.fedjax_sim_fedavg(
      *CASES[case.removesuffix(FEWER_HASHES).removesuffix(NO_KEYS)])
  if case.endswith(NO_KEYS):
    no_keys()
  start = time.perf_counter()
  traced = runner.make_chunk(algorithm, 1).trace(state, data)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  if phases:
    return {"case": case, **profiled_compile(lowered)}
  compiled = lowered.compile()
  seconds = time.perf_counter() - lowered_at
  text = compiled.as_text()
  counts = categorize(text)
  return {"case": case, "compile_s": seconds, "fusions": sum(counts.values()),
          "by_origin": counts, "loops": text.count(" while("),
          "trace_s": traced_at - start, "lower_s": lowered_at - traced_at}


# XLA:CPU's trace events of a compile (jaxlib 0.12; another jaxlib may name them otherwise).
PHASES = {"HLO passes": ("HLO passes through layout assignment",
                         "HLO passes after layout assignment"),
          "fusion emitters": ("FusionCompiler::Compile",),
          "LLVM code generation": ("TaskDispatcher::dispatch",)}


def profiled_compile(lowered) -> dict:
  """`lowered.compile()` under jax's profiler: its wall seconds, and per phase of
  `PHASES` the CPU seconds its events took (summed over threads), their count and the
  wall span from the first one's start to the last one's end (None where the trace has
  none)."""
  import gzip
  import tempfile
  import jax
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    start = time.perf_counter()
    lowered.compile()
    seconds = time.perf_counter() - start
    jax.profiler.stop_trace()
    trace_file = next(pathlib.Path(tmp).rglob("*.trace.json.gz"))
    events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]
  out = {"compile_s": seconds, "phases": {}}
  for phase, names in PHASES.items():
    mine = [e for e in events if any(e["name"].startswith(n) for n in names)]
    out["phases"][phase] = None if not mine else {
        "cpu_s": sum(e["dur"] for e in mine) / 1e6, "events": len(mine),
        "threads": len({e["tid"] for e in mine}),
        "span_s": (max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)) / 1e6}
  return out


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


def phase_rows(cases: list[str], profiled: list[dict]) -> list[dict]:
  """Per case, the medians over repetitions of the profiled compile and of each phase."""
  rows = []
  for case in cases:
    runs = [r for r in profiled if r["case"] == case]
    if not runs:
      continue
    row = {"case": case, "runs": len(runs),
           "compile_s": statistics.median(r["compile_s"] for r in runs)}
    for phase in PHASES:
      got = [r["phases"][phase] for r in runs if r["phases"][phase]]
      row[phase] = {k: statistics.median(g[k] for g in got) for k in got[0]} if got else None
    rows.append(row)
  return rows


def markdown(info: dict, dev: dict, per_fusion: float | None, synthetic: list, rows: list,
             phases: list) -> str:
  lines = [f"# Where a round's compile time goes ({info['device']})", "",
           f"{info['when']}, commit {info['commit']}, jax {dev['jax_version']}, python "
           f"{dev['python']}: `{info['command']}`. Each figure: the median over "
           f"{info['repeats']} fresh processes.", ""]
  if synthetic:
    lines += ["## Compile time per fusion (synthetic)", "",
              "| fusions | compile |", "| ---: | ---: |"]
    for k in SIZES:
      ms = statistics.median(r["compile_s"] for r in synthetic if r["k"] == k) * 1e3
      lines.append(f"| {k} | {ms:.0f} ms |")
    lines += ["", f"Slope: **{per_fusion * 1e3:.1f} ms per fusion** (these fusions are "
              "larger than most of a round's).", ""]
  lines += ["## The peer benchmark's rounds", "",
            "| case | trace | lowering | compile | single runs | fusions | per fusion | "
            "of them random keys | loops |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    keys = r["by_origin"]["random keys"]
    runs = ", ".join(f"{s:.2f}" for s in r["compile_s_runs"])
    timed = lambda k: f"{r[k]:.2f} s" if r.get(k) is not None else "-"
    lines.append(f"| {r['case']} | {timed('trace_s')} | {timed('lower_s')} | "
                 f"{r['compile_s']:.2f} s | {runs} | {r['fusions']} | "
                 f"{r['compile_s'] / r['fusions'] * 1e3:.1f} ms | {keys} "
                 f"({keys / r['fusions']:.0%}) | {r['loops']} |")
  lines += ["", "Per fusion: the compile time over the fusions. Random keys: fusions whose op "
            "names come from jax's threefry hash (key splits, `fold_in`, uniform draws, the "
            "sampling shuffle). Loops: while loops in the compiled round (each threefry "
            "hash is one on CPU; the local steps and, where clients train in chunks, the "
            "chunks are others). A case ending in `_fewer_hashes` is the round with two "
            "threefry hashes fewer (`fewer_hashes()`: one uniform draw of an epoch's key for "
            "the examples' sort keys, one draw of bits and an argsort for the sampling), a "
            "trial that changes the random stream; one ending in `_no_keys` the round "
            "without any hash (`no_keys()`: every key the state's, the first clients "
            "sampled, sort keys a fixed function of the index), a bound on what the keys "
            "cost. Trace, lowering: the round's, in seconds ('-': not recorded)."]
  if phases:
    lines += ["", "## The compile's phases (jax's profiler)", "",
              "| case | compile, profiled | " + " | ".join(
                  f"{p}: CPU, events, span" for p in PHASES) + " | runs |",
              "| --- | ---: | " + " | ".join("---:" for _ in PHASES) + " | ---: |"]
    for r in phases:
      cells = [("-" if r[p] is None else
                f"{r[p]['cpu_s']:.2f} s, {r[p]['events']:.0f}, {r[p]['span_s']:.2f} s")
               for p in PHASES]
      lines.append(f"| {r['case']} | {r['compile_s']:.2f} s | " + " | ".join(cells)
                   + f" | {r['runs']} |")
    lines += ["", "From the trace of one compile per repetition under `jax.profiler` "
              "(perfetto): per phase the CPU seconds of its events summed over XLA's "
              "threads, their number, and the wall seconds from the first one's start to the "
              "last one's end. HLO passes: the optimization passes before and after layout "
              "assignment (one thread). Fusion emitters: a fusion's MLIR kernel, one event "
              "a kernel. LLVM code generation: the tasks compiling kernels to machine code. "
              "'-': this jaxlib's trace has no such event."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cases", nargs="+", default=list(CASES),
                 choices=list(CASES) + [c + s for c in CASES for s in (FEWER_HASHES, NO_KEYS)])
  p.add_argument("--phases", action="store_true",
                 help="also compile each case under jax's profiler, once per repetition, "
                      "and report the compile's phases")
  p.add_argument("--no-synthetic", action="store_true",
                 help="skip the synthetic programs (no per-fusion slope)")
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    kind, arg = args.worker
    print(json.dumps(synthetic_worker(int(arg)) if kind == "synthetic"
                     else round_worker(arg, phases=kind == "phases")))
    return
  sys.path.insert(0, str(REPO / "benchmarks"))
  import machine
  synthetic, records, profiled = [], [], []
  for rep in range(args.repeats):
    if not args.no_synthetic:
      synthetic += run_worker("synthetic", str(rep))
    for case in (args.cases if rep % 2 == 0 else args.cases[::-1]):
      records.append(run_worker("round", case))
      print(json.dumps(records[-1]), flush=True)
      if args.phases:
        profiled.append(run_worker("phases", case))
        print(json.dumps(profiled[-1]), flush=True)
  per_fusion = slope([(r["fusions"], r["compile_s"]) for r in synthetic]) if synthetic else None
  rows = []
  for case in args.cases:
    runs = [r for r in records if r["case"] == case]
    rows.append({**runs[0], "compile_s": statistics.median(r["compile_s"] for r in runs),
                 "compile_s_runs": [r["compile_s"] for r in runs],
                 **{k: statistics.median(r[k] for r in runs) for k in ("trace_s", "lower_s")}})
  dev = machine.device_info()
  info = machine.results_info(dev, "compile_breakdown.py " + " ".join(argv or sys.argv[1:]),
                              repeats=args.repeats)
  machine.write_results(args.output, "compile_breakdown", info, dev,
                        [{"per_fusion_s": per_fusion, "synthetic": synthetic}] + rows,
                        records + profiled,
                        markdown(info, dev, per_fusion, synthetic, rows,
                                 phase_rows(args.cases, profiled)))


if __name__ == "__main__":
  main()
