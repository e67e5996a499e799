"""fedjax_sim's round against the same round written as DrJAX writes it, in one process.

The peers' comparison runs every simulator in its own fresh process, where this
machine's speed varies by tens of percent from process to process. Here both rounds
run in one process, compiled with fedjax_sim's CPU options, interleaved (30 rounds of
one, then 30 of the other, `--repeats` times), on the peers' task (common.py: 10 of 100
MNIST-shaped clients a round, 1 epoch of batch 20, client SGD lr 0.1, FedAvg): so the
two programs are compared with the process and the load held the same.

"DrJAX-style" is run_drjax.py's round in plain JAX: `drjax.map_fn` is a `jax.vmap` over
the placed clients, so it is a vmap of a `lax.scan` of SGD steps over each client's
shuffled examples, and an example-weighted mean of the deltas; clients sampled on the
device. Where `drjax` imports in this environment (`pip install --no-deps drjax==0.2.1`:
it is pure Python), DrJAX's own round (run_drjax.py's, with fedjax_sim's options) runs
as a third program; its weighted mean multiplies and sums where the plain version has
dots. fedjax_sim's rounds fetch their metrics and wait for the state, as its peers
worker does, the others their training loss.

  python benchmarks/peers/in_process.py [--model mlp] [--repeats 7] [--output PATH.json]

writes benchmarks/results/peers_in_process_<platform>.md and .json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
import jax_models  # noqa: E402
import machine  # noqa: E402
import fedjax_sim as fs  # noqa: E402
from fedjax_sim import compile as compile_lib  # noqa: E402
from fedjax_sim import runner  # noqa: E402

CLIENTS, PER_ROUND, EXAMPLES, BATCH, LR = 100, 10, 100, 20, 0.1


def drjax_style_round(model: str):
  """run_drjax.py's round without the drjax package: (params, key, x, y, counts)."""
  steps = EXAMPLES // BATCH

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        jax_models.apply(model, params, x), y).mean()

  def client_update(params, x, y, key):
    def sgd_step(p, xy):
      loss, grads = jax.value_and_grad(loss_fn)(p, *xy)
      return jax.tree_util.tree_map(lambda w, g: w - LR * g, p, grads), loss

    order = jax.random.permutation(key, EXAMPLES)
    p, losses = jax.lax.scan(sgd_step, params, (x[order].reshape(steps, BATCH, *x.shape[1:]),
                                                y[order].reshape(steps, BATCH)))
    return jax.tree_util.tree_map(lambda new, old: new - old, p, params), losses.mean()

  def train_round(params, key, all_x, all_y, all_counts):
    key_sample, key_clients = jax.random.split(key)
    ids = jax.random.choice(key_sample, CLIENTS, (PER_ROUND,), replace=False)
    deltas, losses = jax.vmap(client_update, in_axes=(None, 0, 0, 0))(
        params, all_x[ids], all_y[ids], jax.random.split(key_clients, PER_ROUND))
    weights = all_counts[ids].astype(jnp.float32)
    weights = weights / weights.sum()
    mean = jax.tree_util.tree_map(lambda d: jnp.tensordot(weights, d, 1), deltas)
    return (jax.tree_util.tree_map(jnp.add, params, mean), jnp.dot(losses, weights))

  return train_round


def drjax_round(model: str):
  """run_drjax.py's jitted round with fedjax_sim's options, or None without `drjax`."""
  try:
    import run_drjax
  except ImportError:
    return None
  p = argparse.ArgumentParser()
  common.add_task_args(p)
  args = p.parse_args(["--output", "-", "--model", model, "--examples-per-client",
                       str(EXAMPLES), "--clients-per-round", str(PER_ROUND),
                       "--num-clients", str(CLIENTS), "--batch-size", str(BATCH),
                       "--client-lr", str(LR)])
  args.compiler_options = "fedjax_sim"
  logging.getLogger("absl").setLevel(logging.ERROR)  # its no-mesh warnings, every trace
  return run_drjax.make_round(args)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--rounds", type=int, default=30, help="rounds per repetition and program")
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  args = p.parse_args(argv)
  xs, ys = zip(*(common.client_data(0, i, EXAMPLES) for i in range(CLIENTS)))
  all_x, all_y = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))
  counts = jnp.full((CLIENTS,), EXAMPLES, jnp.int32)
  params = [jnp.asarray(w) for w in jax_models.init_params(args.model, 0)]
  key = jax.random.key(0)
  drjax = jax.jit(drjax_style_round(args.model),
                  compiler_options=compile_lib.compiler_options()).lower(
                      params, key, all_x, all_y, counts).compile()

  data = fs.from_clients(list(xs), list(ys), num_classes=common.NUM_CLASSES)
  model = fs.mlp(seed=0) if args.model == "mlp" else fs.cnn(seed=0)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(LR),
                        server_optimizer=optax.sgd(1.0), clients_per_round=PER_ROUND,
                        batch_size=BATCH, epochs=1)
  state = fs.tree.copy(algorithm.init(model.params, key))  # the chunk donates it
  chunk = runner.make_chunk(algorithm, 1).lower(state, data).compile()

  def runs(program):
    current = params

    def run(i):
      nonlocal current
      current, loss = program(current, jax.random.fold_in(key, i), all_x, all_y, counts)
      return float(loss)
    return run

  def run_fedjax_sim(i):
    nonlocal state
    state, metrics = chunk(state, data)
    metrics = jax.device_get(metrics)
    jax.block_until_ready(state)
    return float(np.asarray(metrics["train_loss"]).ravel()[-1])

  programs = {"fedjax_sim": run_fedjax_sim, "DrJAX-style plain JAX": runs(drjax)}
  own = drjax_round(args.model)
  if own is not None:
    programs["DrJAX 0.2.1, fedjax_sim's options"] = runs(
        own.lower(params, key, all_x, all_y, counts).compile())
  times = {name: [] for name in programs}
  for _ in range(args.repeats):
    for name, run in programs.items():
      run(0)  # the first call after the other program's rounds is not timed
      start = time.perf_counter()
      for i in range(args.rounds):
        run(i + 1)
      times[name].append((time.perf_counter() - start) / args.rounds)
  base = times["fedjax_sim"]
  rows = [{"program": name, "ms_per_round": statistics.median(t) * 1e3,
           "over_fedjax_sim": statistics.median(a / b for a, b in zip(t, base)),
           "every_repetition_ms": [round(x * 1e3, 2) for x in t]} for name, t in times.items()]
  dev = machine.device_info()
  info = machine.results_info(dev, "in_process.py " + " ".join(argv or sys.argv[1:]),
                              model=args.model)
  title = "DrJAX's round" if len(programs) > 2 else "a DrJAX-style round"
  lines = [f"# fedjax_sim and {title} in one process ({info['device']})", "",
           f"{info['when']}, commit {info['commit']}, jax {dev['jax_version']}: "
           f"`{info['command']}`. The peers' {args.model} task, 10 of 100 clients a round, "
           f"1 epoch of batch 20; {args.rounds} rounds of each program in turn, "
           f"{args.repeats} times (benchmarks/peers/in_process.py).", "",
           "| program | per round (median) | / fedjax_sim | every repetition (ms) |",
           "| --- | ---: | ---: | --- |"]
  lines += [f"| {r['program']} | {r['ms_per_round']:.2f} ms | {r['over_fedjax_sim']:.2f}x | "
            + ", ".join(f"{x:.1f}" for x in r["every_repetition_ms"]) + " |" for r in rows]
  machine.write_results(args.output, "peers_in_process", info, dev, rows, [],
                        "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
