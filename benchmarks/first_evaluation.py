"""`fs.run` with an evaluation, from its call to its return, against an older commit.

Since the evaluator got `prepare`, `fs.run` compiles the evaluation in a thread while the
round's program compiles (XLA:CPU keeps only part of the cores busy compiling one
program), so the first evaluation finds it compiled. Each repetition runs each variant in
a fresh process (order alternating): the peers' task (benchmarks/peers: FedAvg, 10 of 100
clients a round, 1 epoch of batch 20 on 100 examples each; `--model mlp|cnn`), `fs.run`
for 4 rounds in chunks of 2 with `fs.make_evaluator` on the peers' 2,000 held-out
examples. It records the run's wall time, the first evaluation's and the final metrics
(the same in both variants). Variants: `installed` (this tree) and `baseline` (fedjax_sim
at git revision `--baseline REV`, from a temporary worktree).

  python benchmarks/first_evaluation.py --baseline REV [--repeats 5] [--model mlp]

writes benchmarks/results/first_evaluation_<platform>.md and .json (or `--output`).
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


def worker(model: str) -> dict:
  sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
  import common
  import fedjax_sim as fs
  algorithm, state, data = common.fedjax_sim_fedavg(model, 100, 100, 10)
  built = fs.mlp(seed=0) if model == "mlp" else fs.cnn(seed=0)
  evaluator = fs.make_evaluator(built.apply, test=common.eval_data(0))
  seconds = []

  def evaluate(params):
    start = time.perf_counter()
    out = evaluator(params)
    seconds.append(time.perf_counter() - start)
    return out

  evaluate.check = evaluator.check
  if hasattr(evaluator, "prepare"):
    evaluate.prepare = evaluator.prepare
  start = time.perf_counter()
  _, history = fs.run(algorithm, state, data, rounds=4, rounds_per_chunk=2,
                      evaluate=evaluate, progress=False)
  return {"run_s": time.perf_counter() - start, "first_evaluation_s": seconds[0],
          "later_evaluation_s": seconds[1:],
          "final": {k: float(v) for k, v in history[-1].items() if getattr(v, "ndim", 0) == 0},
          "fedjax_sim": fs.__file__}


def run_worker(model: str, path: str) -> dict:
  env = {**os.environ, "PYTHONPATH": path}
  proc = subprocess.run([sys.executable, __file__, "--worker", model], env=env, cwd=REPO,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-2000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--baseline", metavar="REV", help="the git revision to compare with")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker)))
    return
  if not args.baseline:
    p.error("--baseline REV is required")
  sys.path.insert(0, str(REPO / "benchmarks"))
  import machine
  records = []
  with machine.git_worktree(args.baseline) as baseline_dir:
    paths = {"installed": str(REPO), "baseline": baseline_dir}
    for rep in range(args.repeats):
      for variant in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
        records.append({"variant": variant, **run_worker(args.model, paths[variant])})
        print(json.dumps(records[-1]), flush=True)
  rows = []
  for variant in ("installed", "baseline"):
    runs = [r for r in records if r["variant"] == variant]
    rows.append({"variant": variant, "runs": len(runs),
                 "run_s": statistics.median(r["run_s"] for r in runs),
                 "first_evaluation_s": statistics.median(r["first_evaluation_s"] for r in runs),
                 "final": runs[0]["final"]})
  ratios = []  # installed over baseline, within each repetition
  for pair in zip(records[0::2], records[1::2]):
    run_s = {r["variant"]: r["run_s"] for r in pair}
    ratios.append(run_s["installed"] / run_s["baseline"])
  dev = machine.device_info()
  info = machine.results_info(dev, "first_evaluation.py " + " ".join(argv or sys.argv[1:]),
                              model=args.model, baseline=machine.short_rev(args.baseline))
  same = rows[0]["final"] == rows[1]["final"]
  lines = [f"# fs.run with an evaluation, against {info['baseline']} ({args.model})", "",
           f"Device: {info['device']}, jax {dev['jax_version']}, python {dev['python']}. "
           f"{info['when']}, commit {info['commit']}: `{info['command']}`. Medians over "
           f"{args.repeats} fresh processes per variant, order alternating; 4 rounds in "
           "chunks of 2, evaluated after each chunk on 2,000 examples.", "",
           "| variant | fs.run | first evaluation | runs |", "| --- | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['run_s']:.2f} s | {r['first_evaluation_s'] * 1e3:.0f} "
                 f"ms | {r['runs']} |")
  lines += ["", "Installed over baseline, fs.run, each repetition: "
            + ", ".join(f"{x:.2f}" for x in ratios) + "x. Final metrics the same: "
            + ("yes" if same else "NO") + "."]
  machine.write_results(args.output, "first_evaluation", info, dev, rows + [{"ratios": ratios}],
                        records, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
