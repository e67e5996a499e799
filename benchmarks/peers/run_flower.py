"""Peer benchmark worker: Flower 1.42's Simulation Runtime on the shared task.

A ServerApp running the Message-API `flwr.serverapp.strategy.FedAvg` (example-weighted
averaging of the returned arrays, i.e. FedAvg with server learning rate 1) for
`--rounds` rounds, sampling `clients-per-round` of `num-clients` SuperNodes per round
(`fraction_train`), with no federated evaluation; the ClientApp of flower_client.py
trains with JAX + optax. Both run under `flwr.simulation.run_simulation` with its Ray
backend (`--client-cpus` CPUs per ClientApp: Flower's default is 2, which on a 2-core
machine means one Ray actor running the clients one after another).

Round times come from the strategy's `evaluate_fn` hook, which Flower calls before the
first round and after every round; it only takes the time (and, in time-to-accuracy
runs, evaluates the global model on the held-out set when due, ending training by an
exception caught in the ServerApp once the target is reached). End to end is from the
driver's launch of this process to the end of the last round (Ray's shutdown after it
is not counted). Writes one JSON record (common.record).

Install (see benchmarks/README.md): `pip install "flwr[simulation]==1.42.*" jax optax`
in its own virtual environment. Telemetry is switched off (FLWR_TELEMETRY_ENABLED=0)
since the benchmark machine may be offline.
"""

import time

MAIN_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import flower_client  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_task_args(p)
  p.add_argument("--client-loop", choices=["step", "epoch"], default="step",
                 help="ClientApp training: a jitted step per minibatch (default), or a "
                      "whole epoch jitted as one lax.scan")
  p.add_argument("--client-cpus", type=float, default=2,
                 help="Ray CPUs per ClientApp (Flower's default 2)")
  args = p.parse_args(argv)
  if args.server_lr != 1.0:
    p.error("Flower's FedAvg averages the client models: --server-lr must be 1")
  launch = common.launch_time(MAIN_START)

  ticks: list[float] = []
  out: dict = {}
  initial = flower_client.init_params(args.model, args.seed)
  apply = jax.jit(lambda prm, x: flower_client.apply(args.model, prm, x))
  evaluator = common.Evaluator(args, launch)
  server_app = ServerApp()

  class TargetReached(Exception):
    """Raised from the evaluate_fn hook to end training at the target accuracy."""

  def on_round(rnd, arrays):
    ticks.append(time.time())
    if rnd and evaluator.due(rnd):
      params = arrays.to_numpy_ndarrays()
      if evaluator.after_round(rnd, lambda x: apply(params, x)):
        out["arrays"] = params
        raise TargetReached()

  @server_app.main()
  def _main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train=args.clients_per_round / args.num_clients,
                      fraction_evaluate=0.0, min_available_nodes=args.num_clients)
    cfg = ConfigRecord({"model": args.model, "client-lr": args.client_lr,
                        "batch-size": args.batch_size, "epochs": args.epochs,
                        "seed": args.seed, "examples-per-client": args.examples_per_client,
                        "client-loop": args.client_loop})
    try:
      result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                              num_rounds=args.rounds, train_config=cfg,
                              evaluate_fn=on_round)
    except TargetReached:
      return
    out["arrays"] = result.arrays.to_numpy_ndarrays()
    out["train_loss"] = [float(m["train_loss"])
                         for _, m in sorted(result.train_metrics_clientapp.items())]

  run_simulation(server_app=server_app, client_app=flower_client.app,
                 num_supernodes=args.num_clients,
                 backend_config={"client_resources": {"num_cpus": args.client_cpus,
                                                      "num_gpus": 0.0}})
  if len(ticks) != args.rounds + 1 and evaluator.reached is None:
    raise SystemExit(f"Flower ran {len(ticks) - 1} of {args.rounds} rounds")

  ex, ey = common.eval_data(args.seed)
  final = common.cross_entropy(np.asarray(apply(out["arrays"], ex)), ey)
  init_loss = common.cross_entropy(np.asarray(apply(initial, ex)), ey)
  result = common.record(
      args, simulator="Flower", launch=launch, main_start=MAIN_START, setup_done=ticks[0],
      round_ends=ticks[1:], device="cpu (Ray actors: " + str(args.client_cpus)
      + " CPUs per ClientApp)",
      packages=common.versions("flwr", "ray", "jax", "jaxlib", "optax", "protobuf"),
      extra={"eval_loss_initial": init_loss, "eval_loss_final": final,
             "train_loss_per_round": out.get("train_loss"), **evaluator.extra(),
             "client_loop": args.client_loop, "client_cpus": args.client_cpus,
             "implementation": "flwr.simulation.run_simulation (Ray backend); ServerApp "
                               "with flwr.serverapp.strategy.FedAvg; ClientApp training "
                               f"with JAX + optax (client-loop={args.client_loop}); "
                               "model in plain JAX"
                               + (" (conv as lax.conv_general_dilated)"
                                  if args.model == "cnn" else "")})
  t = result["timings"]
  print(f"Flower: {t['per_round_warm_median_s']:.4f} s/round warm, first round "
        f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s, eval loss "
        f"{init_loss:.4f} -> {final:.4f}", flush=True)


if __name__ == "__main__":
  main()
