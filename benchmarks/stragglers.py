"""The FedProx straggler experiment (Li et al. 2020, Sec. 5.2, Figure 1) on Synthetic(1,1).

Each round samples 10 of the 30 clients; a fraction s of them (0%, 50%, 90%: exactly
round(s x 10), drawn at random each round) are stragglers that manage only e of the
E = 20 local epochs, e uniform in {1..20} (`systems.SystemsConfig(straggler_fraction=s)`).
Three ways to treat them, from the same initial model and seed (so the same clients,
stragglers and amounts of work each round):

- `fedavg_drop`: FedAvg, stragglers dropped (`stragglers="drop"`, mu = 0);
- `fedprox_mu0_partial`: FedProx with mu = 0, stragglers' partial work aggregated;
- `fedprox_mu1_partial`: FedProx with mu = 1, partial work aggregated.

Setup as in the paper: multinomial logistic regression, local SGD with learning rate
0.01, batch 10, E = 20 epochs. Clients' system profiles (`systems.sample_profiles`)
only set the simulated clock (`sim_time_s`); who straggles is the protocol's draw.

Every `--eval-every` rounds it records the global model's test accuracy (central test
set: the union of the clients' 20% held-out splits) and its training loss over all
training examples (the paper's training loss); every round, the loss of the aggregated
clients' local training (`train_loss`) and how many were aggregated.

Run from the repository root, e.g.

  python benchmarks/stragglers.py --rounds 200 --eval-every 5

It writes benchmarks/results/stragglers.json and stragglers.png (test accuracy per
round, one panel per straggler fraction).
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

import fedjax_sim as fs
from fedjax_sim import evaluation, runner, systems, tasks

SETTINGS = {
    "fedavg_drop": dict(mu=0.0, stragglers="drop", label="FedAvg (stragglers dropped)"),
    "fedprox_mu0_partial": dict(mu=0.0, stragglers="partial", label="FedProx mu=0 (partial work)"),
    "fedprox_mu1_partial": dict(mu=1.0, stragglers="partial", label="FedProx mu=1 (partial work)"),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=200)
  parser.add_argument("--eval-every", type=int, default=5,
                      help="rounds per compiled chunk; evaluation after each")
  parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.5, 0.9])
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--client-lr", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=os.path.join("benchmarks", "results", "stragglers"),
                      help="path without extension: writes .json and .png")
  parser.add_argument("--replot", action="store_true",
                      help="only redraw the .png from an existing .json")
  return parser.parse_args(argv)


def run_one(setting: dict, fraction: float, task: tasks.Task, profiles: systems.ClientProfiles,
            evaluate, args: argparse.Namespace) -> dict:
  """Trains one (setting, straggler fraction); returns its curves."""
  model = task.make_model("logreg", args.seed)
  config = systems.SystemsConfig(profiles, stragglers=setting["stragglers"],
                                 straggler_fraction=fraction)
  algorithm = fs.fedprox(model.apply, mu=setting["mu"],
                         client_optimizer=fs.client_optimizer("sgd", args.client_lr),
                         clients_per_round=args.clients_per_round, batch_size=args.batch_size,
                         epochs=args.epochs, systems=config)
  state = algorithm.init(model.params, jax.random.key(args.seed))
  curves: dict[str, list] = {"round": [], "test_accuracy": [], "global_train_loss": [],
                             "sim_time_s": [], "train_loss": [], "num_aggregated": []}
  start = time.perf_counter()
  done = 0
  while done < args.rounds:
    length = min(args.eval_every, args.rounds - done)
    # Chunks of one length share one compilation (runner.make_chunk is cached).
    state, history = runner.run(algorithm, state, task.train, rounds=length,
                                rounds_per_chunk=length, progress=False)
    curves["train_loss"] += [row["train_loss"] for row in history]
    curves["num_aggregated"] += [row["num_aggregated"] for row in history]
    done += length
    metrics = evaluate(state.params)
    curves["round"].append(done)
    curves["test_accuracy"].append(metrics["test_accuracy"])
    curves["global_train_loss"].append(metrics["global_train_loss"])
    curves["sim_time_s"].append(float(state.sim_time))
  seconds = time.perf_counter() - start
  final = {"test_accuracy": curves["test_accuracy"][-1],
           "global_train_loss": curves["global_train_loss"][-1],
           "best_test_accuracy": max(curves["test_accuracy"]),
           "mean_aggregated": float(np.mean(curves["num_aggregated"]))}
  print(f"  {setting['label']:32s} {seconds:6.1f} s  acc {final['test_accuracy']:.4f}  "
        f"loss {final['global_train_loss']:.4f}  aggregated/round {final['mean_aggregated']:.1f}",
        flush=True)
  return {"seconds": seconds, "final": final, "curves": curves}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fractions = list(results["fractions"])
  fig, axes = plt.subplots(2, len(fractions), figsize=(5 * len(fractions), 7.5), squeeze=False,
                           sharey="row")
  for col, fraction in enumerate(fractions):
    runs = results["fractions"][fraction]
    for row, (metric, label) in enumerate([("test_accuracy", "test accuracy"),
                                           ("global_train_loss", "training loss")]):
      ax = axes[row][col]
      for name, run in runs.items():
        ax.plot(run["curves"]["round"], run["curves"][metric], label=SETTINGS[name]["label"])
      ax.set_title(f"{float(fraction):.0%} stragglers: {label}")
      ax.set_xlabel("round")
      ax.grid(alpha=0.3)
      if row == 0 and col == 0:
        ax.legend(fontsize=8)
  fig.suptitle("Synthetic(1,1), 10 of 30 clients per round, E=20, B=10, lr 0.01")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.replot:
    with open(args.output + ".json") as f:
      plot(json.load(f), args.output + ".png")
    return 0
  task = tasks.load_task("synthetic", seed=args.seed)
  profiles = systems.sample_profiles(task.train.num_clients, seed=args.seed)
  train_x = np.concatenate([np.asarray(task.train.x[i, :n])
                            for i, n in enumerate(np.asarray(task.train.counts))])
  train_y = np.concatenate([np.asarray(task.train.y[i, :n])
                            for i, n in enumerate(np.asarray(task.train.counts))])
  model = task.make_model("logreg", args.seed)
  test_eval = evaluation.make_evaluator(model.apply, test=task.test)
  train_eval = evaluation.make_evaluator(model.apply, test=(train_x, train_y))

  def evaluate(params):
    return {"test_accuracy": test_eval(params)["test_accuracy"],
            "global_train_loss": train_eval(params)["test_loss"]}

  results = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python"] + sys.argv),
      "device": str(jax.devices()[0]), "platform": platform.platform(),
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "settings": {k: v for k, v in vars(args).items() if k != "output"},
      "task": {"name": "synthetic", "alpha": 1.0, "beta": 1.0,
               "num_clients": task.train.num_clients, "train_examples": int(len(train_y)),
               "test_examples": int(len(task.test[1])), "model": "logreg"},
      "profiles": systems.describe(profiles),
      "methods": {k: {kk: vv for kk, vv in v.items()} for k, v in SETTINGS.items()
                  if k in args.settings},
      "fractions": {},
  }
  for fraction in args.fractions:
    print(f"{fraction:.0%} stragglers", flush=True)
    results["fractions"][str(fraction)] = {
        name: run_one(SETTINGS[name], fraction, task, profiles, evaluate, args)
        for name in args.settings}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output + ".json", "w") as f:
    json.dump(results, f, indent=1)
  plot(results, args.output + ".png")
  print(f"wrote {args.output}.json and {args.output}.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
