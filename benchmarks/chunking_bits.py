"""Do a run's results depend on its chunking? 7 rounds in one 7-round program against 7
calls of a 1-round program (`rounds_per_chunk` 7 and 1), under XLA's default flags (what
users compile with), for several algorithms on ragged and on equal-size clients.

Writes benchmarks/results/chunking_bits_<platform>.json and .md (or `--output`): whether
the final parameters are equal to the bit, and the largest difference where they are not.

  python benchmarks/chunking_bits.py --output benchmarks/results/chunking_bits_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
import machine  # noqa: E402


def clients(sizes, seed=0, num_features=5, num_classes=3):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, num_features)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, num_classes, n).astype(np.int32) for n in sizes]
  return fs.from_clients(xs, ys, num_classes=num_classes)


def algorithms(apply):
  kw = dict(clients_per_round=4, batch_size=4, epochs=1)
  sgd = optax.sgd(0.2)
  return {
      "fedavg": lambda: fs.fedavg(apply, client_optimizer=sgd, **kw),
      "fedavg, server adam": lambda: fs.fedavg(apply, client_optimizer=sgd,
                                               server_optimizer=optax.adam(0.01), **kw),
      "fedprox": lambda: fs.fedprox(apply, client_optimizer=sgd, mu=0.1, **kw),
      "scaffold": lambda: fs.scaffold(apply, client_learning_rate=0.2, **kw),
      "fednova": lambda: fs.fednova(apply, client_learning_rate=0.2, **kw),
      "mimelite": lambda: fs.mimelite(apply, client_learning_rate=0.2, momentum=0.5, **kw),
  }


def final_params(make, model, data, rounds_per_chunk):
  algorithm = make()
  state = algorithm.init(model.params, jax.random.key(3), data.num_clients)
  final, _ = fs.run(algorithm, state, data, rounds=7, rounds_per_chunk=rounds_per_chunk,
                    progress=False)
  return np.concatenate([np.ravel(np.asarray(leaf))
                         for leaf in jax.tree_util.tree_leaves(final.params)])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--output", default=None)
  args = p.parse_args(argv)
  model = fs.mlp(num_features=5, num_classes=3, seed=1)
  datasets = {"ragged": clients((3, 17, 8, 30, 1, 12, 9, 25, 14, 6)),
              "equal": clients((20,) * 10)}
  rows = []
  for data_name, data in datasets.items():
    for name, make in algorithms(model.apply).items():
      whole, ones = (final_params(make, model, data, per) for per in (7, 1))
      diff = float(np.abs(whole - ones).max())
      rows.append({"data": data_name, "algorithm": name, "equal_bits": diff == 0.0,
                   "max_abs_difference": diff})
      print(f"{data_name:>6} {name:<22} {'equal bits' if diff == 0 else f'differ by {diff:.1e}'}",
            flush=True)
  dev = machine.device_info()
  info = machine.results_info(dev, "python benchmarks/chunking_bits.py " + " ".join(
      sys.argv[1:] if argv is None else argv))
  lines = ["# Results and chunking: 7 rounds as one 7-round program vs seven 1-round calls",
           "", f"Device: {info['device']}, jax {dev['jax_version']}, commit {info['commit']}; "
           "XLA's default flags. MLP 5-200-200-3 (`fs.mlp`), 10 clients, 4 per round, "
           "1 epoch of batch 4, client SGD lr 0.2.", "",
           "| data | algorithm | final parameters |", "| --- | --- | --- |"]
  lines += [f"| {r['data']} | {r['algorithm']} | "
            + ("equal to the bit" if r["equal_bits"] else
               f"differ by up to {r['max_abs_difference']:.1e}") + " |" for r in rows]
  machine.write_results(args.output, "chunking_bits", info, dev, rows, [],
                        "\n".join(lines) + "\n")
  result = {"info": info, "rows": rows}
  return result


if __name__ == "__main__":
  main()
