"""Test accuracy per round of every algorithm, on Synthetic(1,1) and on Dirichlet digits.

For each task and each algorithm in `fedjax_sim.algorithms.ALGORITHMS` (FedAvg,
FedProx, SCAFFOLD, FedNova, FedDyn, MimeLite, Ditto, q-FFL) it trains from the same
initial model with the same seed (so the same clients are sampled each round) and
records, every `--eval-every` rounds:

- `test_accuracy`: the global model on the central test set;
- `client_test_accuracy` and `client_test_accuracy_p10`: the global model on each
  client's own test split (example-weighted mean, and the 10th percentile over
  clients: the worse-off clients, which q-FFL targets);
- for Ditto also `personal_client_test_accuracy(_p10)`: each client's personalized
  model on its own test split;
- the training loss of every round, and the wall time of the run (compile included).

Tasks (the package's named tasks, offline):

- synthetic: Synthetic(1,1) of Li et al. 2020, 30 clients, multinomial logistic regression;
- digits: scikit-learn's 8x8 digits split over 30 clients by label with Dirichlet(alpha)
  proportions (Hsu et al. 2019), the 2NN MLP (64-200-200-10).

Run from the repository root, e.g.

  python benchmarks/algorithms.py --rounds 100 --eval-every 5

It writes benchmarks/results/algorithms.json and a plot, algorithms.png (accuracy and
10th-percentile client accuracy per round, one panel per task).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from fedjax_sim import evaluation, runner, tasks
from fedjax_sim.algorithms import ALGORITHMS, build_algorithm, registry

# Per task: the task's options, the model, and the local schedule shared by all algorithms.
TASKS = {
    "synthetic": dict(options={}, model="logreg", client_lr=0.02, epochs=5, batch_size=10),
    "digits": dict(options=dict(partition="dirichlet", alpha=0.3, num_clients=30), model="mlp",
                   client_lr=0.05, epochs=2, batch_size=10),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--eval-every", type=int, default=5)
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--mu", type=float, default=0.1, help="FedProx")
  parser.add_argument("--feddyn-alpha", type=float, default=0.01, help="FedDyn")
  parser.add_argument("--mime-momentum", type=float, default=0.9, help="MimeLite")
  parser.add_argument("--ditto-lambda", type=float, default=0.1, help="Ditto")
  parser.add_argument("--q", type=float, default=1.0, help="q-FFL")
  parser.add_argument("--output", default=os.path.join("benchmarks", "results", "algorithms"),
                      help="path without extension: writes .json and .png")
  parser.add_argument("--replot", action="store_true",
                      help="only redraw the .png from an existing .json")
  return parser.parse_args(argv)


def run_one(name: str, task: tasks.Task, setup: dict, args: argparse.Namespace) -> dict:
  """Trains algorithm `name` on `task`; returns its curves."""
  model = task.make_model(setup["model"], args.seed)
  own = {"mu": args.mu, "feddyn_alpha": args.feddyn_alpha, "mime_momentum": args.mime_momentum,
         "ditto_lambda": args.ditto_lambda, "q": args.q}
  used = {h.key for h in registry.hparams_of(name, "algorithm")}  # others are refused
  algorithm = build_algorithm(
      name, model.apply, clients_per_round=args.clients_per_round,
      batch_size=setup["batch_size"], epochs=setup["epochs"], client_lr=setup["client_lr"],
      **{k: v for k, v in own.items() if k in used})
  evaluate = evaluation.make_evaluator(model.apply, test=task.test, client_test=task.client_test)
  personal = (evaluation.make_personalized_evaluator(model.apply, task.client_test)
              if name == "ditto" else None)
  state = algorithm.init(model.params, jax.random.key(args.seed), task.train.num_clients)
  curves: dict[str, list] = {"round": [], "train_loss": []}
  start = time.perf_counter()
  done = 0
  while done < args.rounds:
    length = min(args.eval_every, args.rounds - done)
    # Chunks of the same length reuse one compilation (runner.make_chunk is cached).
    state, history = runner.run(algorithm, state, task.train, rounds=length,
                                rounds_per_chunk=length, progress=False)
    curves["train_loss"] += [row["train_loss"] for row in history]
    done += length
    metrics = evaluate(state.params)
    if personal is not None:
      metrics.update(personal(state.client_states))
    curves["round"].append(done)
    for key, value in metrics.items():
      curves.setdefault(key, []).append(value)
  seconds = time.perf_counter() - start
  final = {k: v[-1] for k, v in curves.items() if k not in ("round", "train_loss")}
  print(f"  {name:9s} {seconds:6.1f} s  " + "  ".join(
      f"{k.replace('_accuracy', '_acc')} {v:.4f}" for k, v in final.items() if "accuracy" in k),
      flush=True)
  return {"seconds": seconds, "final": final, "curves": curves}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results["tasks"])
  fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
  for col, task in enumerate(names):
    runs = results["tasks"][task]["algorithms"]
    for row, (metric, label) in enumerate([("test_accuracy", "test accuracy (central)"),
                                           ("client_test_accuracy_p10",
                                            "10th percentile of client accuracy")]):
      ax = axes[row][col]
      for name, run in runs.items():
        rounds = run["curves"]["round"]
        if name == "ditto":
          # Its global model is FedAvg's, round for round (the same keys): plot the
          # personalized models, each on its own client's test split, instead.
          personal = "personal_client_test_accuracy" + ("_p10" if "p10" in metric else "")
          ax.plot(rounds, run["curves"][personal], linestyle="--", label="ditto (personalized)")
        else:
          ax.plot(rounds, run["curves"][metric], label=name)
      ax.set_title(f"{task}: {label}")
      ax.set_xlabel("round")
      ax.grid(alpha=0.3)
      if row == 0 and col == 0:
        ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.replot:
    with open(args.output + ".json") as f:
      plot(json.load(f), args.output + ".png")
    return 0
  results = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python"] + sys.argv),
      "device": str(jax.devices()[0]), "platform": platform.platform(),
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "settings": {k: v for k, v in vars(args).items() if k != "output"},
      "tasks": {},
  }
  for task_name in args.tasks:
    setup = TASKS[task_name]
    task = tasks.load_task(task_name, seed=args.seed, **setup["options"])
    print(f"{task_name}: {task.train.num_clients} clients, model {setup['model']}", flush=True)
    results["tasks"][task_name] = {
        "setup": setup, "num_clients": task.train.num_clients,
        "algorithms": {name: run_one(name, task, setup, args) for name in args.algorithms}}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output + ".json", "w") as f:
    json.dump(results, f, indent=1)
  plot(results, args.output + ".png")
  print(f"wrote {args.output}.json and {args.output}.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
