"""A sweep of S configurations as one program against S separate runs and one run.

FedAvg on Synthetic(1,1) (Li et al. 2020; 30 clients, multinomial logistic
regression, 10 clients per round, one local epoch of batch 10), a grid of client
learning rates x seeds. Three timings, wall clock with compilation included (what a
user waits for), each measured in this one process on the device named:

- sweep: `fs.sweep` over the S configurations (one compilation, one vmapped program);
- separate: S calls of `fs.run`, one per configuration (each learning rate is a new
  algorithm, so a new compilation);
- one run: a single configuration, the ideal a sweep is measured against.

It also reports the largest difference in final parameters between the sweep and
the separate runs. Keep the learning rates where training is stable: at 0.1
Synthetic(1,1) diverges, and a diverging run amplifies float32 rounding (1e-7) into
visible differences within a few rounds. Run from the repository root:

  python benchmarks/sweeps.py --rounds 50 --lrs 0.001 0.003 0.01 0.02 --seeds 0 1

It writes benchmarks/results/sweeps_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs


def max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.02])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()

  xs, ys = fs.synthetic(alpha=1.0, beta=1.0, seed=0)
  train_x, train_y, _, _ = fs.split_clients(xs, ys, test_fraction=0.2)
  train = fs.from_clients(train_x, train_y, num_classes=10)
  model = fs.models.logistic_regression(num_features=60, num_classes=10)

  def make(hp):
    return fs.fedavg(model.apply, client_optimizer=optax.sgd(hp["client_lr"]),
                     clients_per_round=10, batch_size=10, epochs=1)

  start = time.perf_counter()
  result = fs.sweep(make, model.params, train, grid={"client_lr": args.lrs}, seeds=args.seeds,
                    rounds=args.rounds)
  jax.block_until_ready(result.params)
  sweep_s = time.perf_counter() - start

  separate_s, one_s, errors = 0.0, None, []
  for i, row in enumerate(result.rows):
    start = time.perf_counter()
    algorithm = make({"client_lr": row["client_lr"]})
    state, _ = fs.run(algorithm, algorithm.init(model.params, jax.random.key(row["seed"])),
                      train, rounds=args.rounds, rounds_per_chunk=args.rounds, progress=False)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    separate_s += seconds
    one_s = seconds if one_s is None else one_s  # the first: a fresh compilation, like the sweep
    errors.append(max_abs_difference(result.params[i], state.params))

  out = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "configurations": len(result.rows), "rounds": args.rounds,
      "sweep_s": round(sweep_s, 2), "separate_runs_s": round(separate_s, 2),
      "one_run_s": round(one_s, 2), "speedup_vs_separate": round(separate_s / sweep_s, 2),
      "sweep_over_one_run": round(sweep_s / one_s, 2),
      "max_param_difference": max(errors),
  }
  print(json.dumps(out, indent=2))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"sweeps_{jax.default_backend()}.json"), "w") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
