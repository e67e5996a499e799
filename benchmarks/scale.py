"""FedAvg with 10,000 clients per round, in client chunks planned for a memory budget.

MNIST-shaped synthetic data (28x28 floats in [0, 1), labels from a fixed random linear
teacher so that the loss falls), `--examples` examples per client, every client sampled
each round by default; the 2NN MLP (784-200-200-10) or logistic regression (`--model`),
`--steps` local SGD steps of `--batch-size`, server SGD at lr 1.

What it does, in order, on the device named in the output:

1. `fs.memory.measure_round`: compiles (without running) the round at two chunk sizes
   and fits `fixed + chunk x per_client` bytes to XLA's memory analysis;
2. `fs.memory.plan_client_chunk(memory, clients, budget)`: the largest divisor of the
   clients per round that fits `--budget-mb`;
3. compiles the unchunked round (not run) and reads its memory analysis, next to the
   line's prediction, to show that it would need more than the budget;
4. compiles the planned round (with `fedjax_sim.compile`'s options, as the runner does),
   reads its memory analysis (measured) against the line (predicted), then runs
   `--rounds` rounds, each timed with `block_until_ready`.

Memory is XLA's compiled memory analysis (arguments + outputs + temporaries - aliased),
what `fs.memory.compiled_round_bytes` reads, not the process's resident memory.
Run from the repository root:

  python benchmarks/scale.py --clients 10000 --budget-mb 1024

It writes benchmarks/results/scale_<backend>.json and a markdown summary next to it
(.md); `--out` changes the folder, `--rewrite-markdown` redoes the .md from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import compile as compile_lib
from fedjax_sim import memory as memory_lib
from fedjax_sim.data import FederatedData

import machine  # benchmarks/machine.py: device, versions, load, commit

MB = 2**20


def make_data(num_clients: int, examples: int, seed: int) -> FederatedData:
  """28x28 floats in [0, 1); labels argmax of a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  x = rng.random((num_clients, examples, 28, 28), dtype=np.float32)
  teacher = rng.normal(size=(784, 10)).astype(np.float32)
  y = np.argmax((x.reshape(-1, 784) - 0.5) @ teacher, axis=1).reshape(num_clients, examples)
  # Every client has the same size, so the padded arrays are these arrays.
  return FederatedData(jax.numpy.asarray(x), jax.numpy.asarray(y.astype(np.int32)),
                       jax.numpy.full((num_clients,), examples, np.int32))


def analysis_bytes(compiled) -> int:
  """Total bytes as `fs.memory.compiled_round_bytes` counts them, of a compiled round."""
  a = compiled.memory_analysis()
  return int(a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
             - a.alias_size_in_bytes)


def write_markdown(path: str, out: dict) -> None:
  d = out["device"]
  device = d["device_kind"] if d["platform"] != "cpu" else (
      f"CPU: {d['cpu_model']}, {d['cpu_count']} cores")
  m, s = out["memory"], out["settings"]
  mb = lambda b: f"{b / MB:,.1f} MB"
  lines = [
      f"# {s['clients_per_round']:,} clients per round in planned chunks",
      "",
      f"`{out['command']}`",
      "",
      f"Device: {device} ({d['platform']}); jax {d['jax_version']}, jaxlib "
      f"{d['jaxlib_version']}. Load average (1, 5, 15 min) before: {out['load_before']}, "
      f"after: {out['load_after']}.",
      "",
      f"FedAvg, {s['model']} ({out['num_params']:,} parameters), {s['num_clients']:,} clients "
      f"of {s['examples']} MNIST-shaped examples, {s['clients_per_round']:,} per round, "
      f"{s['steps']} local SGD steps of batch {s['batch_size']}; memory budget "
      f"{mb(out['budget_bytes'])}.",
      "",
      f"- memory line (`fs.memory.measure_round`, {out['measure_s']} s): fixed "
      f"{mb(m['fixed_bytes'])} (of which the round's inputs {mb(m['argument_bytes'])}) + "
      f"{mb(m['per_client_bytes'])} per client trained at once",
      f"- planned chunk (`fs.memory.plan_client_chunk`): **{out['chunk']}** clients at a time, "
      f"{out['num_chunks']} chunks per round",
      "",
      "| round | predicted by the line | compiled memory analysis | fits the budget |",
      "| --- | ---: | ---: | --- |",
      f"| unchunked ({s['clients_per_round']:,} at once; compiled, not run) | "
      f"{mb(out['unchunked_predicted_bytes'])} | {mb(out['unchunked_measured_bytes'])} | "
      f"{'yes' if out['unchunked_measured_bytes'] <= out['budget_bytes'] else 'no'} |",
      f"| chunks of {out['chunk']} (run) | {mb(out['chunked_predicted_bytes'])} | "
      f"{mb(out['chunked_measured_bytes'])} | "
      f"{'yes' if out['chunked_measured_bytes'] <= out['budget_bytes'] else 'no'} |",
      "",
      f"- seconds per round: **{out['seconds_per_round']}** (median of {len(out['round_s'])} "
      f"rounds: {out['round_s']}); compilation of the planned round {out['compile_s']} s",
      f"- {out['clients_per_second']:,.0f} clients per second, "
      f"{out['examples_per_second']:,.0f} examples per second of local training",
      f"- training loss per round: {out['train_loss']}",
      *([f"- for comparison, chunks of {out['also_chunk']['chunk']} (timed round-robin with the "
         f"planned ones): {out['also_chunk']['seconds_per_round']} s per round "
         f"({out['also_chunk']['round_s']}), compiled memory "
         f"{mb(out['also_chunk']['measured_bytes'])} (predicted "
         f"{mb(out['also_chunk']['predicted_bytes'])})"] if out.get("also_chunk") else []),
      f"- predicted / measured, planned round: {out['chunked_predicted_over_measured']}",
      "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=10_000, help="clients per round")
  parser.add_argument("--num-clients", type=int, default=None,
                      help="clients in the data (default: --clients)")
  parser.add_argument("--examples", type=int, default=20, help="examples per client")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--model", choices=["mlp", "logistic"], default="mlp")
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--budget-mb", type=float, default=1024)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--also-chunk", type=int, default=None,
                      help="also time rounds in chunks of this many clients (a divisor of "
                           "--clients), interleaved with the planned ones")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                      help="folder for scale_<backend>.json and .md")
  parser.add_argument("--rewrite-markdown", action="store_true",
                      help="only rewrite the .md from the existing scale_<backend>.json")
  args = parser.parse_args()
  base = os.path.join(args.out, f"scale_{jax.default_backend()}")
  if args.rewrite_markdown:
    with open(base + ".json") as f:
      write_markdown(base + ".md", json.load(f))
    return
  load_before = machine.load_average()
  start = time.perf_counter()
  num_clients = args.num_clients or args.clients
  budget = int(args.budget_mb * MB)

  train = make_data(num_clients, args.examples, seed=0)
  model = (fs.models.mlp(num_features=784, num_classes=10) if args.model == "mlp"
           else fs.models.logistic_regression(num_features=784, num_classes=10))
  num_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(model.params))

  def make(chunk):
    return fs.fedavg(model.apply, client_optimizer=optax.sgd(args.client_lr),
                     server_optimizer=optax.sgd(1.0), clients_per_round=args.clients,
                     batch_size=args.batch_size, steps=args.steps, client_chunk_size=chunk)

  t = time.perf_counter()
  memory = memory_lib.measure_round(make, model.params, train, clients_per_round=args.clients)
  measure_s = time.perf_counter() - t
  chunk = memory_lib.plan_client_chunk(memory, args.clients, budget)
  print(f"memory line: {memory}; planned chunk {chunk}", flush=True)

  key = jax.random.key(0)
  unchunked = make(None)
  unchunked_measured, _ = memory_lib.compiled_round_bytes(
      unchunked, jax.eval_shape(lambda: unchunked.init(model.params, key)), train)

  algorithm = make(chunk)
  state = algorithm.init(model.params, key)
  t = time.perf_counter()
  compiled = compile_lib.jit(algorithm.round).lower(state, train).compile()
  compile_s = time.perf_counter() - t
  chunked_measured = analysis_bytes(compiled)
  print(f"unchunked: {unchunked_measured / MB:.1f} MB; chunked: {chunked_measured / MB:.1f} MB "
        f"(predicted {memory.total_bytes(chunk) / MB:.1f} MB); compiled in {compile_s:.1f} s",
        flush=True)

  variants = {"planned": (compiled, state)}
  also = None
  if args.also_chunk is not None:
    other = make(args.also_chunk)
    other_compiled = compile_lib.jit(other.round).lower(state, train).compile()
    also = {"chunk": args.also_chunk, "measured_bytes": analysis_bytes(other_compiled),
            "predicted_bytes": memory.total_bytes(args.also_chunk), "round_s": []}
    variants["also"] = (other_compiled, other.init(model.params, key))

  round_s, losses = [], []
  for r in range(args.rounds):
    for name, (fn, st) in variants.items():  # round-robin: both see the same load
      t = time.perf_counter()
      st, metrics = fn(st, train)
      jax.block_until_ready((st, metrics))
      variants[name] = (fn, st)
      seconds = round(time.perf_counter() - t, 2)
      if name == "planned":
        round_s.append(seconds)
        losses.append(round(float(metrics["train_loss"]), 4))
      else:
        also["round_s"].append(seconds)
      print(f"round {r} ({name}): {seconds} s, train loss {float(metrics['train_loss']):.4f}",
            flush=True)
  per_round = statistics.median(round_s)

  out = {
      "device": machine.device_info(),
      "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
      "load_before": load_before, "load_after": machine.load_average(),
      "settings": {"model": args.model, "num_clients": num_clients,
                   "clients_per_round": args.clients, "examples": args.examples,
                   "steps": args.steps, "batch_size": args.batch_size,
                   "client_lr": args.client_lr, "server_lr": 1.0, "rounds": args.rounds},
      "num_params": num_params,
      "budget_bytes": budget,
      "memory": {"fixed_bytes": memory.fixed_bytes, "per_client_bytes": memory.per_client_bytes,
                 "model_bytes": memory.model_bytes, "data_bytes": memory.data_bytes,
                 "argument_bytes": memory.argument_bytes},
      "measure_s": round(measure_s, 1),
      "chunk": chunk, "num_chunks": args.clients // chunk,
      "unchunked_predicted_bytes": memory.total_bytes(args.clients),
      "unchunked_measured_bytes": unchunked_measured,
      "unchunked_exceeds_budget": unchunked_measured > budget,
      "chunked_predicted_bytes": memory.total_bytes(chunk),
      "chunked_measured_bytes": chunked_measured,
      "chunked_predicted_over_measured": round(memory.total_bytes(chunk) / chunked_measured, 3),
      "compile_s": round(compile_s, 1),
      "round_s": round_s, "seconds_per_round": per_round,
      "clients_per_second": args.clients / per_round,
      "examples_per_second": args.clients * args.steps * args.batch_size / per_round,
      "train_loss": losses,
      "also_chunk": also and {**also, "seconds_per_round": statistics.median(also["round_s"])},
      "total_s": round(time.perf_counter() - start, 1),
  }
  print(json.dumps(out, indent=2))
  os.makedirs(args.out, exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(out, f, indent=2)
  write_markdown(base + ".md", out)
  print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
  main()
