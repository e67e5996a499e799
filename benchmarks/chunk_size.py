"""Seconds per FedAvg round against `client_chunk_size`: what `"auto"` is chosen from.

For each case (a model, clients per round, equal or ragged client sizes) it compiles the
round once per chunk size (`runner.make_chunk(algorithm, 1)`), then times the chunk
sizes round-robin (one round of each in turn, `--repeats` times), so they all see the
same load. `all` trains every client at once (`client_chunk_size=None`); `auto` is what
`base.resolve_chunk_size` picks on this device. The JSON records each size's median and
every repeat.

Cases: logistic regression, the 2NN MLP, the FedAvg CNN and the next-character model on
synthetic data of 100 examples per client, 5 local steps of batch 20 (as in
round_throughput.py); and `cnn_ragged`: the CNN for 1 local epoch on clients whose sizes
are lognormal (mean 100, capped at 200, as emnist_e2e.py draws them), where a client
trained alone takes only its own steps, while clients trained together take as many
steps as the largest of them.

Run from the repository root:

  python benchmarks/chunk_size.py                       # every case (CPU: ~15 minutes)
  python benchmarks/chunk_size.py --cases mlp100 --repeats 3

It writes benchmarks/results/chunk_size_<platform>.json and a .md table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import models, runner
from fedjax_sim.algorithms.base import resolve_chunk_size
from fedjax_sim.datasets import text as text_lib

import machine  # benchmarks/machine.py: device, versions, load, commit

# case: (model, clients per round, chunk sizes, ragged)
CASES = {
    "logreg1000": ("logreg", 1000, [10, 50, 250, None], False),
    "mlp100": ("mlp", 100, [1, 2, 5, 10, 20, 50, None], False),
    "mlp1000": ("mlp", 1000, [5, 10, 50, None], False),
    "cnn100": ("cnn", 100, [1, 2, 5, 10, None], False),
    "char_rnn10": ("char_rnn", 10, [1, 2, 5, None], False),
    "cnn_ragged": ("cnn", 10, [1, 2, 5, None], True),
}


def make_model(name: str) -> models.Model:
  if name == "char_rnn":
    return models.char_rnn(text_lib.vocab_size())
  return {"logreg": lambda: models.logistic_regression(784, 10), "mlp": models.mlp,
          "cnn": models.cnn}[name]()


def make_data(name: str, clients: int, ragged: bool, seed: int) -> fs.FederatedData:
  rng = np.random.default_rng(seed)
  if name == "char_rnn":
    vocab = text_lib.vocab_size()
    tokens = rng.integers(1, vocab, (clients, 100, 81), dtype=np.int32)
    return fs.from_clients(list(tokens[..., :-1]), list(tokens[..., 1:]), num_classes=vocab)
  if ragged:
    sigma = 0.6
    sizes = np.clip(rng.lognormal(np.log(100) - sigma ** 2 / 2, sigma, 20 * clients), 1, 200)
  else:
    sizes = np.full(clients, 100)
  xs = [rng.random((int(k), 28, 28), dtype=np.float32) for k in sizes]
  ys = [rng.integers(0, 10, int(k)) for k in sizes]
  return fs.from_clients(xs, ys, num_classes=10)


def bench_case(case: str, repeats: int, seed: int) -> dict:
  name, clients, sizes, ragged = CASES[case]
  data = make_data(name, clients, ragged, seed)
  schedule = dict(epochs=1) if ragged else dict(steps=5)
  auto = resolve_chunk_size("auto", clients, make_model(name).params)
  if auto not in sizes:
    sizes = sorted(sizes + [auto], key=lambda c: clients if c is None else c)
  rounds = {}
  for chunk in sizes:
    model = make_model(name)
    algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.05),
                          server_optimizer=optax.sgd(1.0), clients_per_round=clients,
                          batch_size=20, client_chunk_size=chunk, **schedule)
    state = algorithm.init(model.params, jax.random.key(seed))
    compiled = runner.make_chunk(algorithm, 1).lower(state, data).compile()
    state = jax.block_until_ready(compiled(state, data)[0])  # warm-up round
    rounds[chunk] = [compiled, state, []]
  for _ in range(repeats):
    for entry in rounds.values():
      start = time.perf_counter()
      entry[1] = jax.block_until_ready(entry[0](entry[1], data)[0])
      entry[2].append(time.perf_counter() - start)
  label = lambda c: "all" if c is None else str(c)
  times = {label(c): {"median_s": statistics.median(e[2]), "times_s": e[2]}
           for c, e in rounds.items()}
  best = min(times, key=lambda k: times[k]["median_s"])
  row = {"case": case, "model": name, "clients": clients, "ragged": ragged,
         "schedule": schedule, "auto": label(auto), "best": best, "times": times,
         "all_over_auto": times["all"]["median_s"] / times[label(auto)]["median_s"],
         "auto_over_best": times[label(auto)]["median_s"] / times[best]["median_s"],
         "load_after": machine.load_average()}
  print(f"{case}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in times.items())
        + f" (auto = {label(auto)})", flush=True)
  return row


def markdown(result: dict) -> str:
  dev, run = result["meta"]["device"], result["meta"]["run"]
  lines = [f"# Seconds per round against client_chunk_size ({dev['platform']}: "
           f"{dev['device_kind']})", "",
           f"jax {dev['jax_version']}, {dev['cpu_count']} CPUs ({dev['cpu_model']}), commit "
           f"{run['git_commit']}, {run['date']}: `{run['command']}`. FedAvg, client SGD lr "
           "0.05, batch 20; 5 local steps on 100 examples per client, or (ragged) 1 local "
           "epoch on lognormal client sizes (mean 100, at most 200). Median of "
           f"{run['repeats']} rounds per chunk size, timed round-robin after a warm-up round.",
           "", "| case | clients | chunk size: s/round | auto | best | all / auto |",
           "| --- | ---: | --- | ---: | ---: | ---: |"]
  for r in result["results"]:
    cells = ", ".join(f"{k}: {v['median_s'] * 1e3:,.0f} ms" for k, v in r["times"].items())
    lines.append(f"| {r['case']} | {r['clients']} | {cells} | {r['auto']} | {r['best']} | "
                 f"{r['all_over_auto']:.2f}x |")
  lines += ["", "all: every client at once (`client_chunk_size=None`); auto: the default "
            "`client_chunk_size=\"auto\"` on this device; all / auto: how much longer a round "
            "takes with every client at once."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None,
                 help="JSON path (default benchmarks/results/chunk_size_<platform>.json)")
  args = p.parse_args(argv)
  info = machine.device_info()
  output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"chunk_size_{info['platform']}.json")
  run = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "git_commit": machine.git_commit(), "repeats": args.repeats}
  result = {"meta": {"device": info, "run": run}, "results": []}
  for case in args.cases:
    result["results"].append(bench_case(case, args.repeats, args.seed))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:  # rewritten after every case: an interruption keeps them
      json.dump(result, f, indent=2)
    with open(os.path.splitext(output)[0] + ".md", "w") as f:
      f.write(markdown(result))
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()
