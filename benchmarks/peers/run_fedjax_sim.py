"""Peer benchmark worker: fedjax_sim (this package) on the shared task.

Runs `--rounds` FedAvg rounds through `runner.make_chunk` (the jitted `lax.scan` over
rounds that `fedjax_sim.run` calls), `--rounds-per-call` rounds per call, and times
each call with the metrics fetched to the host (as `run` does between chunks). The
first call includes compilation. Writes one JSON record (see common.record).

Normally started by run_all.py; by hand, from the repository root:

  python benchmarks/peers/run_fedjax_sim.py --model mlp --output fjs.json
"""

import time

MAIN_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import conv, runner, tree  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_task_args(p)
  p.add_argument("--compile-cache", default=None, metavar="DIR",
                 help="turn on the persistent compilation cache in DIR "
                      "(fs.enable_compile_cache), before anything compiles")
  p.add_argument("--rounds-per-call", type=int, default=1,
                 help="rounds per compiled call (runner.make_chunk length); must divide "
                      "--rounds")
  args = p.parse_args(argv)
  if args.rounds % args.rounds_per_call:
    p.error("--rounds-per-call must divide --rounds")
  launch = common.launch_time(MAIN_START)
  if args.compile_cache:
    fs.enable_compile_cache(args.compile_cache)

  xs, ys = zip(*(common.client_data(args.seed, i, args.examples_per_client)
                 for i in range(args.num_clients)))
  data = fs.from_clients(list(xs), list(ys), num_classes=common.NUM_CLASSES)
  model = fs.mlp(seed=args.seed) if args.model == "mlp" else fs.cnn(seed=args.seed)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(args.client_lr),
                        server_optimizer=optax.sgd(args.server_lr),
                        clients_per_round=args.clients_per_round,
                        batch_size=args.batch_size, epochs=args.epochs)
  state = algorithm.init(model.params, jax.random.key(args.seed))
  algorithm.validate(state, data)
  state = tree.copy(state)  # the chunk donates it; fs.run copies the same way
  chunk = runner.make_chunk(algorithm, args.rounds_per_call)
  apply = jax.jit(model.apply)
  evaluator = common.Evaluator(args, launch)
  setup_done = time.time()

  round_ends, train_loss = [], []
  for call in range(1, args.rounds // args.rounds_per_call + 1):
    state, metrics = chunk(state, data)
    metrics = jax.device_get(metrics)
    jax.block_until_ready(state)
    round_ends.append(time.time())
    train_loss += [float(v) for v in np.atleast_1d(metrics["train_loss"])]
    if evaluator.after_round(call * args.rounds_per_call,
                             lambda x: apply(state.params, x)):
      break

  ex, ey = common.eval_data(args.seed)
  final = common.cross_entropy(np.asarray(apply(state.params, ex)), ey)
  initial = common.cross_entropy(np.asarray(apply(model.params, ex)), ey)
  dev = jax.devices()[0]
  name = "fedjax_sim" + (f" ({args.rounds_per_call} rounds per call)"
                         if args.rounds_per_call > 1 else "") + (
                             ", compilation cache" if args.compile_cache else "")
  result = common.record(
      args, simulator=name, launch=launch, main_start=MAIN_START, setup_done=setup_done,
      round_ends=round_ends, rounds_per_call=args.rounds_per_call,
      device=f"{dev.platform}: {dev.device_kind}",
      packages=common.versions("jax", "jaxlib", "optax", "flax"),
      extra={"eval_loss_initial": initial, "eval_loss_final": final,
             "train_loss_per_round": train_loss, **evaluator.extra(),
             "implementation": "fedjax_sim.fedavg rounds through runner.make_chunk "
                               f"({args.rounds_per_call} per call); model "
                               f"fedjax_sim.{args.model}() (flax nnx"
                               + (f", conv impl {conv.resolve('auto')!r}" if args.model == "cnn"
                                  else "")
                               + "); optax SGD client and server"
                               + ("; jax's persistent compilation cache on "
                                  "(fs.enable_compile_cache)" if args.compile_cache else "")})
  t = result["timings"]
  print(f"{name}: {t['per_round_warm_median_s']:.4f} s/round warm, first call "
        f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s, eval loss "
        f"{initial:.4f} -> {final:.4f}", flush=True)


if __name__ == "__main__":
  main()
