"""A sweep of S configurations as one program against S separate runs and one run.

FedAvg on Synthetic(1,1) (Li et al. 2020; 30 clients, multinomial logistic
regression, 10 clients per round, one local epoch of batch 10), a grid of client
learning rates x seeds. Three timings, wall clock with compilation included (what a
user waits for), each measured in this one process on the device named:

- sweep: `fs.sweep` over the S configurations (one compilation, one vmapped program);
- separate: S calls of `fs.run`, one per configuration (each learning rate is a new
  algorithm, so a new compilation), in this same process: no interpreter start-up,
  imports or data loading per run, so the lower bound of separate runs;
- one run: the first separate run (a fresh compilation, like the sweep's), the ideal a
  sweep is measured against.

Before them, an untimed one-round sweep and one-round run compile the small helper
programs (key creation, initialization) that both paths share, so that neither pays
them alone. XLA compilation time within each phase is recorded too
(`jax.monitoring`'s backend compile events).

It also reports the largest difference in final parameters between the sweep and
the separate runs. Keep the learning rates where training is stable: at 0.1
Synthetic(1,1) diverges, and a diverging run amplifies float32 rounding (1e-7) into
visible differences within a few rounds. Run from the repository root:

  python benchmarks/sweeps.py --rounds 100 --lrs 0.001 0.003 0.01 0.02 --seeds 0 1 2

It writes benchmarks/results/sweeps_<backend>.json and a markdown summary next to it
(.md); `--out` changes the folder, `--rewrite-markdown` redoes the .md from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs

import machine  # benchmarks/machine.py: device, versions, load, commit

_COMPILE_SECONDS: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kw: _COMPILE_SECONDS.append(seconds)
    if name == "/jax/core/compile/backend_compile_duration" else None)


def max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


class Phase:
  """Wall seconds and XLA compile seconds of a `with` block."""

  def __enter__(self):
    self.compiles = len(_COMPILE_SECONDS)
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
    self.compile_seconds = sum(_COMPILE_SECONDS[self.compiles:])


def write_markdown(path: str, out: dict) -> None:
  d = out["device"]
  device = d["device_kind"] if d["platform"] != "cpu" else (
      f"CPU: {d['cpu_model']}, {d['cpu_count']} cores")
  lines = [
      "# Sweeps: one program against separate runs",
      "",
      f"`{out['command']}`",
      "",
      f"Device: {device} ({d['platform']}); jax {d['jax_version']}, jaxlib "
      f"{d['jaxlib_version']}. Load average (1, 5, 15 min) before: {out['load_before']}, "
      f"after: {out['load_after']}.",
      "",
      f"FedAvg on Synthetic(1,1), logistic regression, {out['clients_per_round']} clients per "
      f"round, 1 local epoch of batch 10, {out['rounds']} rounds; client learning rates "
      f"{out['lrs']} x seeds {out['seeds']} = {out['configurations']} configurations. Wall "
      "seconds with compilation, all measured in one process.",
      "",
      "| | wall s | of which XLA compile s |",
      "| --- | ---: | ---: |",
      f"| one sweep of {out['configurations']} configurations | {out['sweep_s']} | "
      f"{out['sweep_compile_s']} |",
      f"| {out['configurations']} separate `fs.run` calls | {out['separate_runs_s']} | "
      f"{out['separate_compile_s']} |",
      f"| one run (the first separate run) | {out['one_run_s']} | {out['one_run_compile_s']} |",
      "",
      f"- sweep / separate runs: **{out['sweep_over_separate']}** "
      f"(the sweep is {out['speedup_vs_separate']}x faster)",
      f"- sweep / one run: **{out['sweep_over_one_run']}** (1 would be the ideal: "
      f"{out['configurations']} configurations for the price of one)",
      f"- without XLA compilation: sweep {out['sweep_s'] - out['sweep_compile_s']:.2f} s, "
      f"separate runs {out['separate_runs_s'] - out['separate_compile_s']:.2f} s, one run "
      f"{out['one_run_s'] - out['one_run_compile_s']:.2f} s",
      f"- largest difference in final parameters, sweep vs separate runs: "
      f"{out['max_param_difference']:.2g}",
      "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.02])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                      help="folder for sweeps_<backend>.json and .md")
  parser.add_argument("--rewrite-markdown", action="store_true",
                      help="only rewrite the .md from the existing sweeps_<backend>.json")
  args = parser.parse_args()
  base = os.path.join(args.out, f"sweeps_{jax.default_backend()}")
  if args.rewrite_markdown:
    with open(base + ".json") as f:
      write_markdown(base + ".md", json.load(f))
    return
  load_before = machine.load_average()

  xs, ys = fs.synthetic(alpha=1.0, beta=1.0, seed=0)
  train_x, train_y, _, _ = fs.split_clients(xs, ys, test_fraction=0.2)
  train = fs.from_clients(train_x, train_y, num_classes=10)
  model = fs.models.logistic_regression(num_features=60, num_classes=10)

  def make(hp):
    return fs.fedavg(model.apply, client_optimizer=optax.sgd(hp["client_lr"]),
                     clients_per_round=args.clients_per_round, batch_size=10, epochs=1)

  def separate_run(lr, seed, rounds):
    algorithm = make({"client_lr": lr})
    state, _ = fs.run(algorithm, algorithm.init(model.params, jax.random.key(seed)),
                      train, rounds=rounds, rounds_per_chunk=rounds, progress=False)
    return jax.block_until_ready(state.params)

  # Untimed: the helper programs both paths share (keys, init, sampling).
  jax.block_until_ready(fs.sweep(make, model.params, train, grid={"client_lr": [0.01]},
                                 seeds=[7], rounds=1).params)
  separate_run(0.01, 7, 1)

  with Phase() as sweep_phase:
    result = fs.sweep(make, model.params, train, grid={"client_lr": args.lrs},
                      seeds=args.seeds, rounds=args.rounds)
    jax.block_until_ready(result.params)

  runs, errors = [], []
  for i, row in enumerate(result.rows):
    with Phase() as phase:
      params = separate_run(row["client_lr"], row["seed"], args.rounds)
    runs.append(phase)
    errors.append(max_abs_difference(result.params[i], params))
  separate_s = sum(p.seconds for p in runs)

  out = {
      "device": machine.device_info(),
      "command": "python benchmarks/sweeps.py " + " ".join(sys.argv[1:]),
      "load_before": load_before, "load_after": machine.load_average(),
      "lrs": args.lrs, "seeds": args.seeds, "clients_per_round": args.clients_per_round,
      "configurations": len(result.rows), "rounds": args.rounds,
      "sweep_s": round(sweep_phase.seconds, 2),
      "sweep_compile_s": round(sweep_phase.compile_seconds, 2),
      "separate_runs_s": round(separate_s, 2),
      "separate_compile_s": round(sum(p.compile_seconds for p in runs), 2),
      "separate_each_s": [round(p.seconds, 2) for p in runs],
      "one_run_s": round(runs[0].seconds, 2),
      "one_run_compile_s": round(runs[0].compile_seconds, 2),
      "sweep_over_separate": round(sweep_phase.seconds / separate_s, 3),
      "speedup_vs_separate": round(separate_s / sweep_phase.seconds, 2),
      "sweep_over_one_run": round(sweep_phase.seconds / runs[0].seconds, 2),
      "max_param_difference": max(errors),
  }
  print(json.dumps(out, indent=2))
  os.makedirs(args.out, exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(out, f, indent=2)
  write_markdown(base + ".md", out)
  print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
  main()
