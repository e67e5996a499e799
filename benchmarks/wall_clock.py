"""Test accuracy against simulated wall-clock: synchronous FedAvg, deadlines, over-selection
and FedBuff on the same heterogeneous clients.

Task: scikit-learn's 8x8 digits split over 30 clients by Dirichlet(0.3) label proportions
(every client 47 or 48 training examples, so a client's time is set by its device and link,
not by its data size), the 2NN MLP (64-200-200-10, 55,210 float32 parameters: 221 KB each
way per client), local SGD at lr 0.05, 2 epochs of batch 10, server SGD at lr 1, example
weighting. One set of client profiles (`systems.sample_profiles`) with a long tail: speed
lognormal(median 200 examples/s, sigma 1), downlink lognormal(4 MB/s, sigma 1), uplink
lognormal(1 MB/s, sigma 1), 50 ms latency; a client's full round (download, 10 local steps,
upload) then takes from 0.27 s to 5.3 s, median 1.1 s (seed 0).

Settings, all from the same initial model, client optimizer, local schedule and seed:

- `sync`: synchronous FedAvg, K = 10 clients per round, no deadline: every round waits for
  the slowest sampled client;
- `deadline`: FedAvg with a deadline D = the median full-work time over all clients;
  stragglers (whose full work does not fit in D) are dropped, and a round that aggregates
  fewer than K clients lasts D;
- `overselect`: FedAvg sampling 13 (30% more) and keeping the first K = 10 to report;
- `partial`: FedProx's treatment of stragglers under the same deadline: a client that
  cannot finish sends the local steps that fit in D (`stragglers="partial"`); the
  proximal mu is 0 by default (`--prox-mu`), so that it differs from `deadline` only
  in what is done with the stragglers;
- `fedbuff`: FedBuff with concurrency 20 (2K) clients always in flight and a buffer of
  K = 10 arrivals per server update, staleness weight 1/sqrt(1 + tau).

Budget: every setting runs for the same simulated wall-clock time (`--budget-s`, rounded up
to whole evaluation chunks), not the same number of rounds or client updates. The plot asks
which method reaches a given accuracy first on the clock, and the methods spend time very
differently: `sync` waits for the tail and aggregates 10 updates per slow round, `deadline`
discards work the clients did, FedBuff aggregates many more, partly stale, updates in the
same time. Equal client updates would hide exactly that. The JSON records the rounds and
the aggregated client updates each setting made within the budget.

Each setting is evaluated (central test set: the union of the clients' 20% held-out
splits, 360 examples) about every `--eval-every-s` simulated seconds: after a first chunk
of 2 rounds, the rounds per compiled chunk are set from the mean simulated round time so
far. Per round it records `sim_time_s`, `round_time_s`, `num_aggregated` (FedBuff: the
buffer size), `train_loss` and, for FedBuff, the mean staleness; per setting, how many
updates each client contributed, and the share of them from the clients whose full work
does not fit in the deadline (the slow half: under `deadline` they never contribute).

Run from the repository root, e.g.

  python benchmarks/wall_clock.py                # about 3.5 minutes on 2 shared CPU cores
  python benchmarks/wall_clock.py --replot       # redraw the plot from the JSON

It writes benchmarks/results/wall_clock.json (configuration, device, jax version, profiles,
curves, time to reach each of `--targets`) and wall_clock.png (test accuracy against
simulated time, and against rounds, one line per setting).
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
from fedjax_sim.algorithms.base import model_bytes

LABELS = {
    "sync": "FedAvg, no deadline (waits for the slowest)",
    "deadline": "FedAvg, deadline (stragglers dropped)",
    "overselect": "FedAvg, over-selection (13 sampled, first 10 kept)",
    "partial": "FedProx-style partial work under the deadline",
    "fedbuff": "FedBuff (20 in flight, buffer 10)",
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", nargs="+", default=list(LABELS), choices=list(LABELS))
  parser.add_argument("--budget-s", type=float, default=240.0,
                      help="simulated seconds every setting runs for")
  parser.add_argument("--eval-every-s", type=float, default=8.0,
                      help="simulated seconds between evaluations (approximately)")
  parser.add_argument("--clients-per-round", type=int, default=10, help="K")
  parser.add_argument("--over-selection", type=float, default=0.3,
                      help="fraction of K sampled in addition by `overselect`")
  parser.add_argument("--concurrency", type=int, default=20, help="FedBuff clients in flight")
  parser.add_argument("--deadline-quantile", type=float, default=0.5,
                      help="the deadline is this quantile of all clients' full-work time")
  parser.add_argument("--prox-mu", type=float, default=0.0, help="mu of the `partial` setting")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--num-clients", type=int, default=30)
  parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
  parser.add_argument("--sigma", type=float, default=1.0,
                      help="lognormal sigma of speed and both bandwidths")
  parser.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.85, 0.9],
                      help="test accuracies whose first simulated time is reported")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=os.path.join("benchmarks", "results", "wall_clock"),
                      help="path without extension: writes .json and .png")
  parser.add_argument("--replot", action="store_true",
                      help="only redraw the .png from an existing .json")
  return parser.parse_args(argv)


def build(name: str, apply, profiles: systems.ClientProfiles, deadline_s: float,
          args: argparse.Namespace):
  """The algorithm of setting `name`; everything but the systems treatment is shared."""
  common = dict(client_optimizer=fs.client_optimizer("sgd", args.client_lr),
                batch_size=args.batch_size, epochs=args.epochs)
  k = args.clients_per_round
  if name == "fedbuff":
    return fs.fedbuff(apply, profiles=profiles, concurrency=args.concurrency, buffer_size=k,
                      **common)
  if name == "sync":
    config = systems.SystemsConfig(profiles)
  elif name == "deadline":
    config = systems.SystemsConfig(profiles, deadline_s=deadline_s, stragglers="drop")
  elif name == "overselect":
    config = systems.SystemsConfig(profiles, over_selection=int(round(args.over_selection * k)))
  elif name == "partial":
    config = systems.SystemsConfig(profiles, deadline_s=deadline_s, stragglers="partial")
    return fs.fedprox(apply, mu=args.prox_mu, clients_per_round=k, systems=config, **common)
  else:
    raise ValueError(name)
  return fs.fedavg(apply, clients_per_round=k, systems=config, **common)


def first_time(times, accs, target):
  """The first simulated time at which the test accuracy reached `target` (None if never)."""
  for t, a in zip(times, accs):
    if a >= target:
      return t
  return None


def run_one(name: str, task: tasks.Task, profiles, deadline_s: float, slow: np.ndarray,
            evaluate, args: argparse.Namespace) -> dict:
  """Runs setting `name` for the simulated-time budget; `slow` marks the clients whose
  full work does not fit in the deadline."""
  model = task.make_model("mlp", args.seed)
  algorithm = build(name, model.apply, profiles, deadline_s, args)
  state = algorithm.init(model.params, jax.random.key(args.seed))
  per_round: dict[str, list] = {"round": [], "sim_time_s": [], "round_time_s": [],
                                "num_aggregated": [], "train_loss": []}
  if name == "fedbuff":
    per_round["staleness_mean"] = []
  else:
    per_round["num_stragglers"] = []
  first = evaluate(model.params)
  evals: dict[str, list] = {"round": [0], "sim_time_s": [0.0], "aggregated_updates": [0],
                            "test_accuracy": [first["test_accuracy"]],
                            "test_loss": [first["test_loss"]]}
  start = time.perf_counter()
  done, aggregated, length = 0, 0, 2
  per_client = np.zeros(task.train.num_clients, np.int64)  # aggregated updates per client
  while float(state.sim_time) < args.budget_s:
    # Chunks of one length share one compilation (runner.make_chunk is cached).
    state, history = runner.run(algorithm, state, task.train, rounds=length,
                                rounds_per_chunk=length, progress=False)
    for row in history:
      row.setdefault("num_aggregated", args.clients_per_round)  # FedBuff: the buffer
      for key in per_round:
        per_round[key].append(row[key])
      aggregated += int(row["num_aggregated"])
      kept = row.get("client_aggregated", np.ones(len(row["client_ids"]), bool))
      np.add.at(per_client, np.asarray(row["client_ids"])[np.asarray(kept, bool)], 1)
    done += length
    metrics = evaluate(state.params)
    evals["round"].append(done)
    evals["sim_time_s"].append(float(state.sim_time))
    evals["aggregated_updates"].append(aggregated)
    evals["test_accuracy"].append(metrics["test_accuracy"])
    evals["test_loss"].append(metrics["test_loss"])
    if done == 2:  # from now on, about eval_every_s of simulated time per chunk
      mean_round = float(state.sim_time) / done
      length = max(1, int(round(args.eval_every_s / mean_round)))
  seconds = time.perf_counter() - start
  times, accs = evals["sim_time_s"], evals["test_accuracy"]
  within = [i for i, t in enumerate(times) if t <= args.budget_s]
  last = [accs[i] for i in within[-5:]]
  final = {
      "rounds": done, "sim_time_s": times[-1], "test_accuracy": accs[-1],
      "best_test_accuracy": max(accs),
      "test_accuracy_at_budget": accs[within[-1]],
      "mean_test_accuracy_last_5_evals": float(np.mean(last)),
      "mean_round_time_s": float(np.mean(per_round["round_time_s"])),
      "mean_aggregated_per_round": float(np.mean(per_round["num_aggregated"])),
      "aggregated_updates": aggregated,
      "time_to_accuracy_s": {str(t): first_time(times, accs, t) for t in args.targets},
      "clients_ever_aggregated": int((per_client > 0).sum()),
      "share_of_updates_from_past_deadline_clients": float(per_client[slow].sum() / max(aggregated, 1)),
  }
  if name == "fedbuff":
    final["mean_staleness"] = float(np.mean(per_round["staleness_mean"]))
  else:
    final["mean_stragglers_per_round"] = float(np.mean(per_round["num_stragglers"]))
  reach = "  ".join(f"{t}: {'-' if s is None else f'{s:.0f} s'}"
                    for t, s in final["time_to_accuracy_s"].items())
  print(f"  {name:10s} {seconds:6.1f} s wall, {done:4d} rounds, sim {times[-1]:6.1f} s, "
        f"round {final['mean_round_time_s']:.2f} s, aggregated/round "
        f"{final['mean_aggregated_per_round']:.1f}, acc {accs[-1]:.4f} "
        f"(mean of last 5 evals {final['mean_test_accuracy_last_5_evals']:.4f}); "
        f"{final['clients_ever_aggregated']} clients ever aggregated, "
        f"{final['share_of_updates_from_past_deadline_clients']:.0%} of updates from clients past the deadline; "
        f"reached {reach}", flush=True)
  return {"label": LABELS[name], "wall_seconds": seconds, "final": final,
          "aggregated_updates_per_client": per_client.tolist(),
          "evaluations": evals, "per_round": per_round}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  budget = results["config"]["budget_s"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  for name, run in results["settings"].items():
    ev = run["evaluations"]
    axes[0].plot(ev["sim_time_s"], ev["test_accuracy"], label=run["label"])
    axes[1].plot(ev["round"][1:], ev["test_accuracy"][1:], label=run["label"])  # log x: no 0
  axes[0].set_xlim(0, budget)
  axes[0].set_xlabel("simulated wall-clock (s)")
  axes[0].set_title("test accuracy against simulated time")
  axes[1].set_xlabel("round (FedBuff: server update)")
  axes[1].set_xscale("log")
  axes[1].set_title("test accuracy against rounds")
  axes[0].set_ylabel("test accuracy (central)")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, loc="lower right")
  task = results["task"]
  fig.suptitle(f"digits, Dirichlet({task['alpha']}) over {task['num_clients']} clients, 2NN MLP;"
               f" K={results['config']['clients_per_round']}, deadline "
               f"{results['deadline_s']:.2f} s; lognormal profiles (sigma "
               f"{results['config']['sigma']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.replot:
    with open(args.output + ".json") as f:
      plot(json.load(f), args.output + ".png")
    return 0
  started = time.perf_counter()
  task = tasks.load_task("digits", seed=args.seed, partition="dirichlet", alpha=args.alpha,
                         num_clients=args.num_clients)
  model = task.make_model("mlp", args.seed)
  n = task.train.num_clients
  profiles = systems.sample_profiles(
      n, seed=args.seed, examples_per_s=("lognormal", 200.0, args.sigma),
      downlink_bytes_per_s=("lognormal", 4e6, args.sigma),
      uplink_bytes_per_s=("lognormal", 1e6, args.sigma))
  nbytes = float(model_bytes(model.params))
  full = systems.client_seconds(
      profiles, systems.full_steps(task.train.counts, args.batch_size, args.epochs, None),
      args.batch_size, nbytes, nbytes)
  full = np.asarray(full, np.float64)
  deadline_s = float(np.quantile(full, args.deadline_quantile))
  print(f"{n} clients; full-work time p10/median/p90/max "
        f"{np.percentile(full, 10):.2f}/{np.median(full):.2f}/{np.percentile(full, 90):.2f}/"
        f"{full.max():.2f} s; deadline {deadline_s:.2f} s", flush=True)
  evaluate = evaluation.make_evaluator(model.apply, test=task.test)

  results = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python"] + sys.argv),
      "device": str(jax.devices()[0]), "platform": platform.platform(),
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "config": {k: v for k, v in vars(args).items() if k not in ("output", "replot")},
      "task": {"name": "digits", "partition": "dirichlet", "alpha": args.alpha,
               "num_clients": n, "train_examples": int(np.asarray(task.train.counts).sum()),
               "test_examples": int(len(task.test[1])), "model": "mlp",
               "model_bytes": int(nbytes)},
      "profiles": systems.describe(profiles),
      "client_full_work_s": [round(float(s), 4) for s in full],
      "deadline_s": deadline_s,
      "past_deadline_clients": [int(i) for i in np.flatnonzero(full > deadline_s)],
      "budget_rule": "same simulated wall-clock time for every setting (whole chunks)",
      "settings": {},
  }
  for name in args.settings:
    results["settings"][name] = run_one(name, task, profiles, deadline_s, full > deadline_s,
                                        evaluate, args)
  results["total_wall_seconds"] = time.perf_counter() - started
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output + ".json", "w") as f:
    json.dump(results, f, indent=1)
  plot(results, args.output + ".png")
  print(f"wrote {args.output}.json and {args.output}.png "
        f"({results['total_wall_seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
