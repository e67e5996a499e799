"""One process of a 2-process jax.distributed run, started by test_multihost.py.

Not a test module. Usage (the test sets the environment):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python multihost_script.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Every process runs the same program: it joins the coordinator on localhost:PORT, builds
one mesh over all processes' devices (`sharding.client_mesh()`, here 2 x 2 = 4 CPU
devices), replicates the state and the data on it, runs ROUNDS FedAvg rounds with
`fs.run` and the sampled clients split over the mesh, and writes the final parameters
(replicated, so every process holds them all) to OUT.npz. It prints one JSON line
describing the run (its last line).

If jax.distributed cannot start, it prints {"init_error": ...} and exits with status 3,
which the test turns into a skip.
"""

import json
import sys
import time
import traceback

START = time.perf_counter()

import jax

INIT_FAILED = 3
ROUNDS = 3


def problem():
  """(model, train data): tiny, and the same in every process and in the test."""
  from conftest import ragged_clients
  from fedjax_sim import data as data_lib
  from fedjax_sim import models
  xs, ys = ragged_clients(sizes=(5, 9, 3, 12, 7, 4, 8, 6, 10, 2))
  return (models.mlp(num_features=5, num_classes=3, seed=1),
          data_lib.from_clients(xs, ys, num_classes=3))


def make_algorithm(model, client_sharding=None):
  """FedAvg, 8 of 10 clients per round, 2 local steps; sharded if client_sharding."""
  import optax
  import fedjax_sim as fs
  return fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                   server_optimizer=optax.sgd(1.0), clients_per_round=8, batch_size=4,
                   steps=2, client_sharding=client_sharding)


def main():
  process_id, num_processes, port, out_path = (int(sys.argv[1]), int(sys.argv[2]),
                                               int(sys.argv[3]), sys.argv[4])
  try:
    # Cross-process collectives on CPU: gloo (jax 0.10's default; explicit where the
    # option exists, for versions whose default was none).
    if "jax_cpu_collectives_implementation" in jax.config.values:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
  except Exception as e:  # pylint: disable=broad-except
    print(json.dumps({"init_error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-2000:]}))
    sys.exit(INIT_FAILED)
  initialized = time.perf_counter()

  import numpy as np

  import fedjax_sim as fs
  from fedjax_sim import runner, sharding

  mesh = sharding.client_mesh()  # every process's devices
  model, train = problem()  # the same in every process (deterministic)
  algorithm = make_algorithm(model, sharding.client_sharding(mesh))
  state = sharding.replicate(algorithm.init(model.params, jax.random.key(0)), mesh)
  train = sharding.replicate(train, mesh)
  final, history = fs.run(algorithm, state, train, rounds=ROUNDS, rounds_per_chunk=ROUNDS,
                          progress=False)
  trained = time.perf_counter()
  # The program fs.run ran (cached: no second compilation), to look for the all-reduce.
  text = runner.make_chunk(algorithm, ROUNDS).lower(state, train).compile().as_text()

  leaves = jax.tree_util.tree_leaves(final.params)
  # The parameters are replicated over the mesh: this process's first shard is all of each.
  host = [np.asarray(leaf.addressable_shards[0].data) for leaf in leaves]
  np.savez(out_path, *host)
  print(json.dumps({
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
      "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
      "params_devices": len(leaves[0].sharding.device_set),
      "params_fully_replicated": all(leaf.is_fully_replicated for leaf in leaves),
      "all_reduce": "all-reduce" in text,
      # Per-client metrics are split over both processes' devices; fs.run gathers them.
      "losses": [row["train_loss"] for row in history],
      "client_ids": [np.asarray(row["client_ids"]).tolist() for row in history],
      "seconds": {"initialized": round(initialized - START, 1),
                  "trained": round(trained - START, 1),
                  "done": round(time.perf_counter() - START, 1)},
  }), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
