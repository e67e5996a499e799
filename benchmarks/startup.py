"""Start-up: what a fresh process pays before its first round, phase by phase.

Each repetition launches one fresh worker process per variant (the order alternates
between repetitions). A worker runs a peer benchmark case (benchmarks/peers: FedAvg, 10
clients a round, batch 20, the same synthetic MNIST-shaped clients) up to the end of its
first round, and records when each phase ended, from the interpreter's start:
`import jax`, `import fedjax_sim`, the clients' data, `fs.from_clients`, the model,
the algorithm and its state, the runner's state copy, then the round's trace, lowering,
compilation and first execution; then, outside those, how long the same model takes built
again with the same seed, another and a third (a notebook's cell run again, a loop over
seeds). Variants:

- installed: this environment as it is.
- ipython: IPython imported inside the `import fedjax_sim` phase, as flax.nnx did before
  fedjax_sim kept it out where no IPython shell runs (fedjax_sim.models._import_nnx).
- ml_dtypes_0.7 (with `--ml-dtypes-0.7 DIR`): DIR, a folder holding ml_dtypes 0.7 (`pip
  install --no-deps --target DIR ml_dtypes==0.7.0`), first on the path: what `import
  jax` costs under numpy < 2.5 with the ml_dtypes that fedjax_sim's requirements keep
  out on Python < 3.12.
- baseline (with `--baseline REV`): fedjax_sim as of git revision REV (a temporary
  worktree first on the path), against `installed` alone: a change's before and after,
  interleaved in one run.

Each worker also counts the fusions in the compiled round: XLA:CPU compiles each one
separately, and they decide most of the compile time.

  python benchmarks/startup.py [--repeats 3] [--case mlp100] [--ml-dtypes-0.7 DIR]
                               [--baseline REV]

writes benchmarks/results/startup_<platform>.md and .json (or `--output PATH.json`).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = {  # name: (model, examples per client, clients, clients per round)
    "mlp100": ("mlp", 100, 100, 10),
    "cnn100": ("cnn", 100, 100, 10),
    "scale1000": ("mlp", 100, 1000, 100),
}
# The model built again after the first round: its name in the tables, and the seed.
REBUILDS = {"model, same seed": 0, "model, another seed": 1, "model, a third seed": 2}
PHASES = ("import jax", "import fedjax_sim", "client data", "from_clients", "model",
          "algorithm + state", "state copy", "trace", "lower", "compile", "first round")


def worker(case: str, variant: str) -> dict:
  """Phase end times of one fresh process (see the module docstring)."""
  ends = {}
  mark = lambda phase: ends.__setitem__(phase, time.perf_counter() - START)
  import jax
  mark("import jax")
  if variant == "ipython":
    import IPython  # noqa: F401
  import fedjax_sim as fs
  from fedjax_sim import runner, tree
  mark("import fedjax_sim")
  import optax
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  kind, examples, clients, per_round = CASES[case]
  xs, ys = zip(*(common.client_data(0, i, examples) for i in range(clients)))
  mark("client data")
  data = fs.from_clients(list(xs), list(ys), num_classes=common.NUM_CLASSES)
  mark("from_clients")
  model = fs.mlp(seed=0) if kind == "mlp" else fs.cnn(seed=0)
  mark("model")
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                        server_optimizer=optax.sgd(1.0), clients_per_round=per_round,
                        batch_size=20, epochs=1)
  state = algorithm.init(model.params, jax.random.key(0))
  mark("algorithm + state")
  state = tree.copy(state)  # as fs.run does: the round donates its state
  mark("state copy")
  traced = runner.make_chunk(algorithm, 1).trace(state, data)
  mark("trace")
  lowered = traced.lower()
  mark("lower")
  compiled = lowered.compile()
  mark("compile")
  state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  mark("first round")
  fusions = compiled.as_text().count(" fusion(")
  rebuilds = {}  # after the timed phases: the model built again, as a notebook or a loop would
  for name, seed in REBUILDS.items():
    start = time.perf_counter()
    jax.block_until_ready((fs.mlp(seed=seed) if kind == "mlp" else fs.cnn(seed=seed)).params)
    rebuilds[name] = time.perf_counter() - start
  import ml_dtypes
  import numpy as np
  return {"case": case, "variant": variant, "ends": ends, "fusions": fusions,
          "rebuild_s": rebuilds,
          "versions": {"jax": jax.__version__, "ml_dtypes": ml_dtypes.__version__,
                       "numpy": np.__version__, "python": sys.version.split()[0]},
          "ipython_loaded": "IPython" in sys.modules}


def run_worker(case: str, variant: str, ml_dtypes_dir: str | None,
               baseline_dir: str | None = None) -> dict:
  # The interpreter's own start (before START) is measured around the subprocess.
  path = ([baseline_dir] if variant == "baseline" else [str(REPO)]) + (
      [ml_dtypes_dir] if variant == "ml_dtypes_0.7" else [])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
  launch = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--worker", case, variant], env=env,
                        capture_output=True, text=True, cwd=REPO)
  total = time.perf_counter() - launch
  if proc.returncode != 0:
    raise RuntimeError(f"{case} {variant}: {proc.stderr[-2000:]}")
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  record["launch_to_exit_s"] = total
  return record


def summarize(records: list[dict]) -> list[dict]:
  rows = []
  for variant in dict.fromkeys(r["variant"] for r in records):
    runs = [r for r in records if r["variant"] == variant]
    durations = {}
    for phase in PHASES:
      before = PHASES[PHASES.index(phase) - 1] if phase != PHASES[0] else None
      durations[phase] = statistics.median(
          r["ends"][phase] - (r["ends"][before] if before else 0.0) for r in runs)
    rows.append({"variant": variant, "runs": len(runs), "phases": durations,
                 "to_first_round_s": statistics.median(r["ends"][PHASES[-1]] for r in runs),
                 "fusions": runs[0].get("fusions"),
                 "rebuild_s": ({name: statistics.median(r["rebuild_s"][name] for r in runs)
                                for name in REBUILDS}
                               if all("rebuild_s" in r for r in runs) else None),
                 "versions": runs[0]["versions"],
                 "ipython_loaded": runs[0]["ipython_loaded"]})
  return rows


ROUND = ("trace", "compile")  # the round's trace, lowering and compilation, as one span


def baseline_ratios(records: list[dict]) -> dict[str, float] | None:
  """With a baseline, installed / baseline per phase, for the round's trace-to-compile
  span and to the first round: the median over repetitions of each repetition's ratio
  (the two processes of a repetition run back to back). None without a baseline."""
  installed = [r for r in records if r["variant"] == "installed"]
  baseline = [r for r in records if r["variant"] == "baseline"]
  if not baseline:
    return None
  spans = {phase: (PHASES[PHASES.index(phase) - 1] if phase != PHASES[0] else None, phase)
           for phase in PHASES}
  spans["trace to compile"] = (PHASES[PHASES.index(ROUND[0]) - 1], ROUND[1])
  spans["to the first round"] = (None, PHASES[-1])
  span = lambda r, a, b: r["ends"][b] - (r["ends"][a] if a else 0.0)
  ratios = {name: statistics.median(span(i, a, b) / span(j, a, b)
                                    for i, j in zip(installed, baseline))
            for name, (a, b) in spans.items()}
  if all("rebuild_s" in r for r in records):
    for name in REBUILDS:
      ratios[name] = statistics.median(i["rebuild_s"][name] / j["rebuild_s"][name]
                                       for i, j in zip(installed, baseline))
  return ratios


def markdown(rows: list[dict], info: dict, ratios: dict[str, float] | None = None) -> str:
  s = lambda x: f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"
  lines = [
      f"# Start-up to the first round ({info['case']})", "",
      f"Device: {info['device']}. {info['when']}, commit {info['commit']}: "
      f"`{info['command']}`.", "",
      "Each repetition: one fresh process per variant (order alternating), timing each "
      "phase from the interpreter's start (after Python's own start-up) to the end of "
      "the first round of the peers' case. Figures: medians over repetitions of each "
      "phase's duration. Variants: installed (this environment); ipython (IPython "
      "imported within `import fedjax_sim`, as flax.nnx did before fedjax_sim kept it "
      "out where no IPython shell runs); ml_dtypes_0.7 (ml_dtypes 0.7 first on the path: "
      "its numpy loop registration is quadratic under numpy < 2.5, so fedjax_sim's "
      "requirements keep 0.6 on Python < 3.12)"
      + (f"; baseline (fedjax_sim at {info['baseline']}, the same worker)"
         if info.get("baseline") else "") + ". Fusions: those in the compiled round. "
      "Model again: after the first round (not in the time to it), the same model built "
      "in turn with " + ", ".join(f"seed {seed} ({name})" for name, seed in REBUILDS.items())
      + ".", "",
      "| variant | " + " | ".join(PHASES) + " | to the first round | fusions | "
      + " | ".join(REBUILDS) + " | versions | runs |",
      "| --- |" + " ---: |" * (len(PHASES) + 2 + len(REBUILDS)) + " --- | ---: |"]
  for r in rows:
    v = r["versions"]
    lines.append(f"| {r['variant']} | " + " | ".join(s(r["phases"][p]) for p in PHASES)
                 + f" | {s(r['to_first_round_s'])} | {r.get('fusions')} | "
                 + " | ".join(s(r["rebuild_s"][n]) if r.get("rebuild_s") else "-"
                              for n in REBUILDS)
                 + f" | python {v['python']}, "
                 f"jax {v['jax']}, "
                 f"ml_dtypes {v['ml_dtypes']}, numpy {v['numpy']} | {r['runs']} |")
  if ratios:
    lines += ["", "Installed / baseline, the median of the repetitions' ratios: "
              + ", ".join(f"{name} {x:.2f}x" for name, x in ratios.items()) + "."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--case", default="mlp100", choices=list(CASES))
  p.add_argument("--ml-dtypes-0.7", dest="ml_dtypes_dir", default=None, metavar="DIR",
                 help="a folder with ml_dtypes 0.7 in it, for the ml_dtypes_0.7 variant")
  p.add_argument("--baseline", default=None, metavar="REV",
                 help="compare against fedjax_sim at git revision REV (variants installed "
                      "and baseline only)")
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(*args.worker)))
    return
  sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "benchmarks" / "peers")]
  import common
  import machine
  if args.baseline:
    variants = ["installed", "baseline"]
  else:
    variants = ["installed", "ipython"] + (["ml_dtypes_0.7"] if args.ml_dtypes_dir else [])
  records = []
  with contextlib.ExitStack() as stack:
    baseline_dir = stack.enter_context(machine.git_worktree(args.baseline)) if args.baseline else None
    common.byte_compile(sys.executable, str(REPO / "benchmarks" / "peers"), str(REPO / "fedjax_sim"),
                        *([os.path.join(baseline_dir, "fedjax_sim")] if baseline_dir else []))
    for rep in range(args.repeats):
      for variant in (variants if rep % 2 == 0 else variants[::-1]):
        records.append(run_worker(args.case, variant, args.ml_dtypes_dir, baseline_dir))
        print(json.dumps(records[-1]), flush=True)
  dev = machine.device_info()
  info = machine.results_info(dev, "startup.py " + " ".join(  # the folder stays on this machine
      "DIR" if a == args.ml_dtypes_dir else a for a in (argv or sys.argv[1:])), case=args.case,
      **({"baseline": machine.short_rev(args.baseline)} if args.baseline else {}))
  rows = summarize(records)
  machine.write_results(args.output, "startup", info, dev, rows, records,
                        markdown(rows, info, baseline_ratios(records)))

if __name__ == "__main__":
  main()
