"""Round time of the round engine against the commit before it, side by side in one run.

Two long-lived worker processes, one importing this checkout's fedjax_sim and one a
checkout of the old commit (`--before PATH`, e.g. made with
`git worktree add ../fedjax_sim_before fbee7e2`), build the same algorithms on the same
synthetic data, model and keys through the public API both versions share, compile one
round inside a `lax.scan` (as the runner does), check that both versions' first rounds
give the same parameters, then time rounds round-robin: one round in the old process,
one in the new, in turn, so both see the same load. Medians of wall time per round.

  git worktree add ../fedjax_sim_before fbee7e2
  python benchmarks/engine_before_after.py --before ../fedjax_sim_before

writes benchmarks/results/engine_before_after_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROWS = [  # (algorithm, model, clients per round, local steps)
    ("fedavg", "logreg", 10, 5), ("fedavg", "logreg", 100, 5), ("fedavg", "mlp", 10, 5),
    ("fedavg", "mlp", 100, 5), ("fedavg", "mlp", 10, 30), ("fedprox", "mlp", 10, 5),
    ("scaffold", "mlp", 10, 5), ("fednova", "mlp", 10, 5), ("feddyn", "mlp", 10, 5),
    ("mimelite", "mlp", 10, 5), ("ditto", "mlp", 10, 5), ("qffl", "mlp", 10, 5),
]
BATCH, EXAMPLES = 20, 100  # 5 batches per epoch: 30 steps cycle through 6 reshuffled epochs


def worker() -> None:
  """Reads `algorithm model clients` lines; answers `ready <params checksum>`, then
  `time` lines with one round's seconds."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import fedjax_sim as fs
  from fedjax_sim import runner

  def build(name, apply, clients, steps):
    common = dict(clients_per_round=clients, batch_size=BATCH, steps=steps)
    sgd = optax.sgd(0.05)
    return {
        "fedavg": lambda: fs.fedavg(apply, client_optimizer=sgd, **common),
        "fedprox": lambda: fs.fedprox(apply, mu=0.1, client_optimizer=sgd, **common),
        "scaffold": lambda: fs.scaffold(apply, client_learning_rate=0.05, **common),
        "fednova": lambda: fs.fednova(apply, client_learning_rate=0.05, momentum=0.5, **common),
        "feddyn": lambda: fs.feddyn(apply, alpha=0.1, client_optimizer=sgd, **common),
        "mimelite": lambda: fs.mimelite(apply, client_learning_rate=0.05, **common),
        "ditto": lambda: fs.ditto(apply, lam=0.1, client_optimizer=sgd, **common),
        "qffl": lambda: fs.qffl(apply, q=1.0, client_learning_rate=0.05, **common),
    }[name]()

  state = data = step = None
  for line in sys.stdin:
    words = line.split()
    if words[0] == "build":
      name, model_name, clients, steps = words[1], words[2], int(words[3]), int(words[4])
      num_clients = 2 * clients
      rng = np.random.default_rng(0)
      x = rng.normal(size=(num_clients, EXAMPLES, 784)).astype(np.float32)
      y = rng.integers(0, 10, size=(num_clients, EXAMPLES)).astype(np.int32)
      data = fs.from_clients(list(x), list(y), num_classes=10)
      model = (fs.logistic_regression(num_features=784, num_classes=10) if model_name == "logreg"
               else fs.mlp(num_features=784, num_classes=10, seed=0))
      algorithm = build(name, model.apply, clients, steps)
      state = algorithm.init(model.params, jax.random.key(0), num_clients)
      step = runner.make_chunk(algorithm, 1)
      state, _ = step(state, data)
      jax.block_until_ready(state)
      checksum = float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(state.params)))
      print("ready", checksum, flush=True)
    elif words[0] == "time":
      start = time.perf_counter()
      state, _ = step(state, data)
      jax.block_until_ready(state)
      print("time", time.perf_counter() - start, flush=True)


def main() -> None:
  if sys.argv[1:2] == ["--worker"]:
    worker()
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True, help="a checkout of the old commit")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--output", default=None)
  parser.add_argument("--only", nargs="*", default=None,
                      help="rows to run, as algorithm:model:clients:steps")
  args = parser.parse_args()
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def start(root):
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=root,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  procs = {"before": start(os.path.abspath(args.before)), "after": start(here)}

  def ask(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().split()

  import jax
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import machine

  rows = []
  chosen = [r for r in ROWS if args.only is None or ":".join(map(str, r)) in args.only]
  for name, model_name, clients, steps in chosen:
    ready = {k: float(ask(p, f"build {name} {model_name} {clients} {steps}")[1])
             for k, p in procs.items()}
    times = {k: [] for k in procs}
    for _ in range(args.repeats):
      for k, p in procs.items():
        times[k].append(float(ask(p, "time")[1]))
    before, after = (statistics.median(times[k]) for k in ("before", "after"))
    row = dict(algorithm=name, model=model_name, clients=clients, steps=steps, before_s=before,
               after_s=after,
               after_over_before=after / before,
               first_round_params_rel_diff=abs(ready["after"] - ready["before"]) / ready["before"])
    rows.append(row)
    print(f"{name:9s} {model_name:6s} {clients:4d} {steps:3d} steps  before {before * 1e3:8.2f} ms  after "
          f"{after * 1e3:8.2f} ms  after/before {after / before:.3f}  "
          f"first-round |params| rel diff {row['first_round_params_rel_diff']:.1e}", flush=True)
  for p in procs.values():
    p.stdin.close()
    p.wait()
  info = {**machine.device_info(), "load_average": machine.load_average(),
          "commit": machine.git_commit(), "repeats": args.repeats,
          "batch_size": BATCH, "examples_per_client": EXAMPLES}
  output = args.output or os.path.join(here, "benchmarks", "results",
                                       f"engine_before_after_{jax.default_backend()}.json")
  with open(output, "w") as f:
    json.dump({"info": info, "rows": rows}, f, indent=1)
  lines = [f"# Round engine: round time before and after ({info})", "",
           "| algorithm | model | clients per round | local steps | before | after | after / before |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['algorithm']} | {r['model']} | {r['clients']} | {r['steps']} | "
            f"{r['before_s'] * 1e3:.2f} ms | "
            f"{r['after_s'] * 1e3:.2f} ms | {r['after_over_before']:.3f} |" for r in rows]
  with open(output[:-5] + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
