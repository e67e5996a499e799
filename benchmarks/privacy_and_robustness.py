"""Privacy, robustness and compression: accuracy against epsilon, against the fraction of
Byzantine clients, and against bits per parameter.

Three experiments, each a JSON results file and a plot in benchmarks/results/:

- privacy (`privacy_epsilon`): DP-FedAvg (McMahan et al. 2018) on Synthetic-IID with
  2,000 clients (multinomial logistic regression, 100 clients per round), for a range
  of noise multipliers, with a fixed clipping norm and with adaptive clipping (Andrew et
  al. 2021); epsilon at delta = 1e-4 from dp-accounting's RDP accountant for the
  simulated sampling (100 of 2,000 without replacement each round). Also the
  non-private run and clipping without noise.
- byzantine (`byzantine`): 10%, 20% and 30% of the 30 clients of the digits task (IID,
  all clients every round, so the fraction per round is exact) send -10 x their update
  (sign flipping, scaled); the mean and every robust aggregator, with Krum/Multi-Krum
  configured for f = 9 (30%) and the trimmed mean for beta = 0.3 throughout.
- compression (`compression`): the 2NN MLP on digits (Dirichlet 0.5, 30 clients, 10 per
  round): stochastic quantization to 1-8 bits with and without the Hadamard rotation,
  top-k with error feedback at several fractions (and once without it), against the
  uncompressed float32 run; bits per parameter are what the metrics report as sent.

A sweep over the noise multiplier or the malicious set reuses one compiled round: both
live in the aggregator state. Run from the repository root:

  python benchmarks/privacy_and_robustness.py            # all three, a few minutes on CPU
  python benchmarks/privacy_and_robustness.py --experiments byzantine --rounds 30
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
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import aggregators, attacks, compression, privacy, robust, tasks

RESULTS = os.path.join("benchmarks", "results")
EXPERIMENTS = ("privacy", "byzantine", "compression")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
  parser.add_argument("--rounds", type=int, default=None,
                      help="rounds per run (default: privacy 100, byzantine 50, compression 40)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--noise-multipliers", type=float, nargs="+",
                      default=[1.0, 2.0, 4.0, 8.0, 16.0])
  parser.add_argument("--output-dir", default=RESULTS)
  return parser.parse_args(argv)


def header(args, name: str) -> dict:
  return {"experiment": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "device": str(jax.devices()[0]), "platform": platform.platform(),
          "jax": jax.__version__, "command": " ".join(sys.argv), "seed": args.seed}


def train(algorithm, state, data, rounds, evaluate, round_metrics=None) -> fs.History:
  return fs.run(algorithm, state, data, rounds=rounds, rounds_per_chunk=rounds,
                evaluate=evaluate, progress=False, round_metrics=round_metrics)[1]


def save(result: dict, path: str, plot, panels: int = 1) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".json", "w") as f:
    json.dump(result, f, indent=2)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2))
  plot(ax)
  fig.tight_layout()
  fig.savefig(path + ".png", dpi=120)
  plt.close(fig)
  print(f"wrote {path}.json and {path}.png")


# --- accuracy against epsilon ---------------------------------------------------------


def privacy_experiment(args) -> dict:
  rounds = args.rounds or 100
  num_clients, per_round, delta, clip = 2000, 100, 1e-4, 1.0
  xs, ys = fs.synthetic(iid=True, num_clients=num_clients, max_size=100, seed=0)
  tx, ty, vx, vy = fs.split_clients(xs, ys, 0.2, seed=0)
  train_data = fs.from_clients(tx, ty, num_classes=10)
  model = fs.models.logistic_regression(60, 10, seed=args.seed)
  evaluate = fs.make_evaluator(model.apply, test=(np.concatenate(vx), np.concatenate(vy)))
  kwargs = dict(client_optimizer=optax.sgd(1.0), clients_per_round=per_round, batch_size=20,
                epochs=2, weighting="uniform")
  key = jax.random.key(args.seed)
  runs = []

  def record(label, history, **extra):
    runs.append({"label": label, "test_accuracy": history[-1]["test_accuracy"],
                 "train_loss": [r["train_loss"] for r in history], **extra})
    print(f"  {label}: accuracy {runs[-1]['test_accuracy']:.4f}", extra.get("epsilon", ""))

  start = time.perf_counter()
  plain = fs.fedavg(model.apply, **kwargs)
  record("non-private", train(plain, plain.init(model.params, key), train_data, rounds, evaluate))
  for adaptive in (None, privacy.AdaptiveClipping()):
    # One compiled round per clipping mode; the noise multiplier is set in the state.
    algorithm = fs.fedavg(model.apply, aggregator=privacy.dp_mean(
        clip if adaptive is None else 0.1, 1.0, adaptive=adaptive), **kwargs)
    state = algorithm.init(model.params, key)
    mode = "fixed" if adaptive is None else "adaptive"
    for z in ([0.0] if adaptive is None else []) + list(args.noise_multipliers):
      if adaptive is not None and z >= 2 * privacy.count_stddev(adaptive, per_round):
        print(f"  adaptive clip, z={z:g}: skipped (the count noise {per_round / 20:g} must "
              f"exceed z / 2)")
        continue
      accountant = privacy.DPAccountant(z, per_round, num_clients, delta)
      run_state = state._replace(aggregator_state=state.aggregator_state._replace(
          noise_multiplier=jnp.float32(z)))
      history = train(algorithm, run_state, train_data, rounds, evaluate, accountant)
      record(f"{mode} clip, z={z:g}", history, clipping=mode, noise_multiplier=z,
             epsilon=history[-1]["epsilon"], final_clip_norm=history[-1]["clip_norm"])
  result = {**header(args, "privacy"), "task": "Synthetic-IID, 2000 clients, logistic regression",
            "rounds": rounds, "clients_per_round": per_round, "num_clients": num_clients,
            "delta": delta, "accountant": "rdp, sampling without replacement (REPLACE_ONE)",
            "clip_norm": clip, "adaptive": "initial 0.1, target quantile 0.5, lr 0.2, "
                                          "count noise clients_per_round / 20",
            "client": "2 epochs, batch 20, SGD lr 1.0; server SGD lr 1 (FedAvg)",
            "seconds": round(time.perf_counter() - start, 1), "runs": runs}

  def plot(ax):
    for mode, marker in (("fixed", "o"), ("adaptive", "s")):
      pts = sorted((r["epsilon"], r["test_accuracy"]) for r in runs
                   if r.get("clipping") == mode and r["noise_multiplier"] > 0)
      ax.plot(*zip(*pts), marker=marker, label=f"DP-FedAvg, {mode} clipping")
    ax.axhline(runs[0]["test_accuracy"], color="k", ls="--", label="non-private")
    clip_only = next(r for r in runs if r.get("noise_multiplier") == 0.0)
    ax.axhline(clip_only["test_accuracy"], color="gray", ls=":", label="clipping, no noise")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta={delta:g} after {rounds} rounds (RDP)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-FedAvg: {per_round} of {num_clients} clients per round")
    ax.legend()

  save(result, os.path.join(args.output_dir, "privacy_epsilon"), plot)
  return result


# --- accuracy under Byzantine clients -------------------------------------------------


def byzantine_experiment(args) -> dict:
  rounds = args.rounds or 50
  task = tasks.load_task("digits", seed=args.seed, partition="iid", num_clients=30)
  n = task.train.num_clients
  model = task.make_model("logreg", args.seed)
  evaluate = fs.make_evaluator(model.apply, test=task.test)
  fractions, f = (0.0, 0.1, 0.2, 0.3), 9
  kwargs = dict(client_optimizer=optax.sgd(0.1), clients_per_round=n, batch_size=10, epochs=1)
  reducers = {
      "mean": aggregators.mean, "median": robust.coordinate_median,
      "trimmed_mean": lambda: robust.trimmed_mean(0.3),
      "krum": lambda: robust.krum(f), "multi_krum": lambda: robust.multi_krum(f),
      "geometric_median": robust.geometric_median,
      "norm_bound+mean": None,
  }
  start, runs = time.perf_counter(), []
  for name, make in reducers.items():
    stages = [attacks.sign_flip(np.zeros(n, bool), scale=10.0)]
    stages += [robust.norm_bound(0.5), aggregators.mean()] if make is None else [make()]
    algorithm = fs.fedavg(model.apply, aggregator=aggregators.chain(*stages), **kwargs)
    state = algorithm.init(model.params, jax.random.key(args.seed))
    for fraction in fractions:
      malicious = attacks.choose_malicious(n, fraction, seed=args.seed)
      agg_state = (jnp.asarray(malicious),) + tuple(state.aggregator_state[1:])
      row = {"aggregator": name, "malicious_fraction": fraction,
             "malicious_clients": int(malicious.sum())}
      try:
        history = train(algorithm, state._replace(aggregator_state=agg_state), task.train,
                        rounds, evaluate)
        row.update(test_accuracy=history[-1]["test_accuracy"],
                   final_train_loss=history[-1]["train_loss"])
      except FloatingPointError as e:  # the attack drove the model to NaN: chance or worse
        row.update(test_accuracy=None, diverged=str(e).split(";")[0])
      runs.append(row)
      print(f"  {name}, {fraction:.0%} malicious:",
            row.get("diverged") or f"accuracy {row['test_accuracy']:.4f}")
  result = {**header(args, "byzantine"),
            "task": "digits (scikit-learn 8x8), IID over 30 clients, logistic regression",
            "attack": "sign flipping, malicious clients send -10 x their update",
            "rounds": rounds, "clients_per_round": n, "krum_f": f, "trim_fraction": 0.3,
            "norm_bound": 0.5, "client": "1 epoch, batch 10, SGD lr 0.1; server SGD lr 1",
            "seconds": round(time.perf_counter() - start, 1), "runs": runs}

  def plot(ax):
    for name in reducers:
      pts = [(100 * r["malicious_fraction"], r["test_accuracy"] or 0.0) for r in runs
             if r["aggregator"] == name]
      ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("malicious clients (%), sign flipping x10 (diverged runs plotted at 0)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks([100 * x for x in fractions])
    ax.set_title(f"digits, 30 clients, {rounds} rounds")
    ax.legend(fontsize=8)

  save(result, os.path.join(args.output_dir, "byzantine"), plot)
  return result


# --- accuracy against bits per parameter ----------------------------------------------


def compression_experiment(args) -> dict:
  rounds = args.rounds or 40
  task = tasks.load_task("digits", seed=args.seed, partition="dirichlet", alpha=0.5,
                         num_clients=30)
  model = task.make_model("mlp", args.seed)
  evaluate = fs.make_evaluator(model.apply, test=task.test)
  kwargs = dict(client_optimizer=optax.sgd(0.05), clients_per_round=10, batch_size=10, epochs=1)
  configs = [("float32", "none", None)]
  configs += [(f"{b}-bit", "quantize", compression.quantize(b)) for b in (1, 2, 4, 8)]
  configs += [(f"{b}-bit rotated", "quantize+rotation", compression.quantize(b, rotation=True))
              for b in (1, 2, 4, 8)]
  configs += [(f"top-{p:g}", "top-k, error feedback", compression.top_k(fraction=p))
              for p in (0.01, 0.03, 0.1)]
  configs += [("top-0.03, no EF", "top-k, no error feedback",
               compression.top_k(fraction=0.03, error_feedback=False))]
  start, runs = time.perf_counter(), []
  for label, family, stage in configs:
    aggregator = None if stage is None else aggregators.chain(stage, aggregators.mean())
    algorithm = fs.fedavg(model.apply, aggregator=aggregator, **kwargs)
    state = algorithm.init(model.params, jax.random.key(args.seed), task.train.num_clients)
    history = train(algorithm, state, task.train, rounds, evaluate)
    bits = history[0].get("bits_per_parameter", 32.0)
    uplink = sum(r["uplink_bytes"] for r in history)
    error = float(np.mean([r.get("compression_error", 0.0) for r in history]))
    runs.append({"label": label, "family": family, "bits_per_parameter": bits,
                 "compression_error": error,
                 "test_accuracy": history[-1]["test_accuracy"], "uplink_mb": uplink / 1e6,
                 "downlink_mb": sum(r["downlink_bytes"] for r in history) / 1e6})
    print(f"  {label}: {bits:.3f} bits/parameter, relative error {error:.4f}, "
          f"accuracy {runs[-1]['test_accuracy']:.4f}")
  result = {**header(args, "compression"),
            "task": "digits, Dirichlet(0.5) over 30 clients, 10 per round, 2NN MLP "
                    f"({fs.num_params(model.params)} parameters)",
            "rounds": rounds, "client": "1 epoch, batch 10, SGD lr 0.05; server SGD lr 1",
            "seconds": round(time.perf_counter() - start, 1), "runs": runs}

  families = (("quantize", "o"), ("quantize+rotation", "s"), ("top-k, error feedback", "^"),
              ("top-k, no error feedback", "v"))

  def plot(axes):
    for family, marker in families:
      rows = sorted((r["bits_per_parameter"], r["test_accuracy"], r["compression_error"])
                    for r in runs if r["family"] == family)
      bits, acc, err = zip(*rows)
      axes[0].plot(bits, acc, marker=marker, label=family)
      axes[1].plot(bits, err, marker=marker, label=family)
    axes[0].axhline(runs[0]["test_accuracy"], color="k", ls="--", label="float32 (32 bits)")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title(f"digits, 2NN MLP, {rounds} rounds")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("||decoded - update||^2 / ||update||^2")
    axes[1].set_title("per-client compression error")
    for ax in axes:
      ax.set_xscale("log", base=2)
      ax.set_xlabel("uplink bits per parameter")

  save(result, os.path.join(args.output_dir, "compression"), plot, panels=2)
  return result


def main(argv=None) -> None:
  args = parse_args(argv)
  for name in args.experiments:
    print(f"{name}:")
    {"privacy": privacy_experiment, "byzantine": byzantine_experiment,
     "compression": compression_experiment}[name](args)


if __name__ == "__main__":
  main()
