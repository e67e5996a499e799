"""End to end: the EMNIST CNN FedAvg setup used by FedJAX, on data of EMNIST's shape.

The setup (FedJAX's EMNIST benchmark; Reddi et al. 2021): the FedAvg CNN with 62
classes, 10 clients per round, 1 local epoch, batch 20, client SGD lr 10^-1.5, server
Adam lr 10^-2.5 with eps 10^-4, 1500 rounds. Data: `--num-clients` writers (EMNIST
has 3,400) with example counts drawn like EMNIST's (lognormal, mean about 200), 28x28x1
images, 62 classes. The images are synthetic but learnable (pixels in [0, 1], a class
prototype plus noise, with a per-writer distortion), so the accuracy column means something and the
accuracy cost of bfloat16 (`--precision bf16`, `models.mixed_precision`) can be read
off it; no download is needed.

Measured per precision, in one process: time to completion of all rounds including
compilation (`fs.run`, evaluation at the end only), the first chunk's time (mostly
compilation), steady seconds per round, final test accuracy. Data generation and the
transfer to the device are timed separately.

Run from the repository root, e.g. (a GPU run of the real setup)

  python benchmarks/emnist_e2e.py --rounds 1500 --num-clients 3400 --precision f32 bf16

or a small CPU run:

  python benchmarks/emnist_e2e.py --rounds 20 --num-clients 200 --rounds-per-chunk 10

It writes benchmarks/results/emnist_e2e_<platform>.json and a .md table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import evaluation, models

import machine  # benchmarks/machine.py: device, versions, load, commit


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=1500)
  p.add_argument("--num-clients", type=int, default=3400)
  p.add_argument("--mean-examples", type=float, default=200.0)
  p.add_argument("--max-examples", type=int, default=400, help="cap per client (padding)")
  p.add_argument("--clients-per-round", type=int, default=10)
  p.add_argument("--rounds-per-chunk", type=int, default=100)
  p.add_argument("--precision", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
  p.add_argument("--conv-impl", default="patches", choices=["patches", "lax"])
  p.add_argument("--test-examples", type=int, default=10_000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None,
                 help="JSON path (default benchmarks/results/emnist_e2e_<platform>.json)")
  return p.parse_args(argv)


def emnist_shaped(num_clients: int, mean_examples: float, max_examples: int,
                  test_examples: int, seed: int):
  """Per-writer images with pixels in [0, 1] like EMNIST's: a class prototype (a
  blurred random stroke pattern), shifted by the writer's own offset, plus noise."""
  rng = np.random.default_rng(seed)
  raw = rng.random((62, 30, 30))
  blurred = sum(raw[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)) / 9
  prototypes = (blurred > np.median(blurred, axis=(1, 2), keepdims=True)).astype(np.float32)
  sigma = 0.6
  sizes = rng.lognormal(np.log(mean_examples) - sigma ** 2 / 2, sigma, num_clients)
  sizes = np.clip(sizes.round().astype(int), 1, max_examples)

  def draw(n, writer_shift):
    y = rng.integers(0, 62, n).astype(np.int32)
    noise = rng.normal(scale=1.0, size=(n, 28, 28)).astype(np.float32)
    x = np.clip(prototypes[y] + writer_shift + noise, 0.0, 1.0)
    return x[..., None], y

  xs, ys = [], []
  for n in sizes:
    x, y = draw(int(n), 0.3 * rng.normal(size=(1, 28, 28)).astype(np.float32))
    xs.append(x)
    ys.append(y)
  test = draw(test_examples, 0.0)
  return fs.from_clients(xs, ys, num_classes=62, pad_to=max_examples), test, sizes


def run_one(precision: str, data, test, args) -> dict:
  model = models.cnn(num_classes=62, seed=args.seed, conv_impl=args.conv_impl)
  if precision == "bf16":
    model = models.mixed_precision(model)
  algorithm = fs.fedavg(
      model.apply, client_optimizer=optax.sgd(10 ** -1.5),
      server_optimizer=optax.adam(10 ** -2.5, eps=1e-4),
      clients_per_round=args.clients_per_round, batch_size=20, epochs=1)
  state = algorithm.init(model.params, jax.random.key(args.seed))
  chunk_times = []

  def timed_round_metrics(round_index):
    # called on the host for each row after a chunk comes back: marks chunk ends
    if round_index % args.rounds_per_chunk == 0 or round_index == args.rounds:
      chunk_times.append(time.perf_counter())
    return {}

  start = time.perf_counter()
  state, history = fs.run(algorithm, state, data, rounds=args.rounds,
                          rounds_per_chunk=args.rounds_per_chunk, progress=False,
                          round_metrics=timed_round_metrics)
  jax.block_until_ready(state.params)
  total = time.perf_counter() - start
  evaluate = evaluation.make_evaluator(model.apply, test=test)
  metrics = evaluate(state.params)
  marks = [start] + chunk_times
  per_chunk = np.diff(marks)
  full_chunks = args.rounds // args.rounds_per_chunk
  steady = (float(np.median(per_chunk[1:full_chunks])) / args.rounds_per_chunk
            if full_chunks >= 2 else None)
  return {"precision": precision, "seconds_total": total, "seconds_first_chunk": float(per_chunk[0]),
          "steady_seconds_per_round": steady, "final_train_loss": history[-1]["train_loss"],
          **{k: float(v) for k, v in metrics.items()}}


def write_markdown(path: str, result: dict) -> None:
  info, cfg = result["meta"], result["config"]
  lines = [f"# EMNIST-shape FedAvg CNN end to end ({info['device_kind']}, {info['platform']})",
           "", f"jax {info['jax_version']}, commit {info['commit']}, {info['time']}. {cfg['rounds']} rounds, "
           f"{cfg['num_clients']} clients ({result['data']['examples']:,} examples), "
           f"{cfg['clients_per_round']} per round, 1 local epoch of batch 20, client SGD "
           "10^-1.5, server Adam 10^-2.5 (eps 1e-4); data generated in "
           f"{result['data']['seconds']:.1f} s.", "",
           "| precision | total (compile included) | first chunk | steady s/round | "
           "test accuracy | final train loss |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in result["results"]:
    steady = "-" if r["steady_seconds_per_round"] is None else f"{r['steady_seconds_per_round']:.4f}"
    lines.append(f"| {r['precision']} | {r['seconds_total']:.1f} s | {r['seconds_first_chunk']:.1f} s"
                 f" | {steady} | {r.get('test_accuracy', float('nan')):.4f} | "
                 f"{r['final_train_loss']:.4f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
  args = parse_args(argv)
  t = time.perf_counter()
  data, test, sizes = emnist_shaped(args.num_clients, args.mean_examples, args.max_examples,
                                    args.test_examples, args.seed)
  data = jax.device_put(data)
  jax.block_until_ready(data)
  data_seconds = time.perf_counter() - t
  print(f"data: {args.num_clients} clients, {int(sizes.sum()):,} examples, "
        f"{data_seconds:.1f} s", flush=True)
  results = []
  for precision in args.precision:
    results.append(run_one(precision, data, test, args))
    print(json.dumps(results[-1]), flush=True)
  out = args.output or os.path.join("benchmarks", "results",
                                    f"emnist_e2e_{jax.devices()[0].platform}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  meta = {**machine.device_info(), "commit": machine.git_commit(),
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  result = {"meta": meta, "config": vars(args),
            "data": {"examples": int(sizes.sum()), "seconds": data_seconds}, "results": results}
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  write_markdown(os.path.splitext(out)[0] + ".md", result)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
