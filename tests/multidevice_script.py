"""Run by test_multidevice.py in a subprocess with 8 CPU devices; prints JSON.

Not a test module: XLA_FLAGS must be set before jax starts, and the rest of the suite
runs on one device.
"""

import json

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import data as data_lib
from fedjax_sim import memory, models, sharding
from fedjax_sim import tree as tree_lib
from conftest import max_relative_error, ragged_clients

ROUNDS = 2


def main():
  out = {"devices": len(jax.devices())}
  mesh = sharding.client_mesh()
  xs, ys = ragged_clients(sizes=(5, 9, 3, 12, 7, 4, 8, 6, 10, 2))
  train = data_lib.from_clients(xs, ys, num_classes=3)
  model = models.mlp(num_features=5, num_classes=3, seed=1)

  def make(client_lr=0.1, client_sharding=None):
    return fs.fedavg(model.apply, client_optimizer=optax.sgd(client_lr),
                     server_optimizer=optax.sgd(1.0), clients_per_round=8, batch_size=4,
                     steps=2, client_sharding=client_sharding)

  key = jax.random.key(0)
  one = make()
  many = make(client_sharding=sharding.client_sharding(mesh))
  many_state = sharding.replicate(many.init(model.params, key), mesh)
  many_train = sharding.replicate(train, mesh)
  # One compilation gives both the program text and the sharded rounds.
  compiled = jax.jit(many.round).lower(many_state, many_train).compile()
  out["all_reduce"] = "all-reduce" in compiled.as_text()
  state, single_round = one.init(model.params, key), jax.jit(one.round)
  losses = []
  for _ in range(ROUNDS):
    state, metrics = single_round(state, train)
    many_state, many_metrics = compiled(many_state, many_train)
    losses.append(abs(float(metrics["train_loss"]) - float(many_metrics["train_loss"])))
  out["clients_params_error"] = max_relative_error(many_state.params, state.params)
  out["clients_loss_error"] = max(losses)
  out["moved"] = max_relative_error(state.params, model.params) > 1e-2
  out["params_devices"] = len(jax.tree_util.tree_leaves(many_state.params)[0].sharding.device_set)
  # fs.run's copy of the state keeps every leaf where it was, keys included.
  keyed = {"state": many_state,
           "keys": jax.device_put(jax.random.split(key, 8), sharding.client_sharding(mesh))}
  out["copy_moved"] = [
      str(a.sharding) for a, b in zip(*map(jax.tree_util.tree_leaves, (tree_lib.copy(keyed), keyed)))
      if a.sharding != b.sharding]

  make_hp = lambda hp: make(hp["client_lr"])
  grid = {"client_lr": [0.05, 0.1, 0.2, 0.4]}
  single = fs.sweep(make_hp, model.params, train, grid=grid, seeds=[0, 1], rounds=ROUNDS)
  split = fs.sweep(make_hp, model.params, train, grid=grid, seeds=[0, 1], rounds=ROUNDS,
                   mesh=mesh)
  out["sweep_params_error"] = max(max_relative_error(a, b)
                                  for a, b in zip(split.params, single.params))
  out["sweep_loss_error"] = float(np.max(np.abs(split.curves["train_loss"]
                                                - single.curves["train_loss"])))
  # The memory plan of a sharded round is of one device, measured at chunks that hold
  # one and two clients per device (chunks 2 and 4 both held one: 0 bytes per client).
  xs16, ys16 = ragged_clients(sizes=(6,) * 16)
  train16 = sharding.replicate(data_lib.from_clients(xs16, ys16, num_classes=3), mesh)
  make16 = lambda chunk: fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                                   clients_per_round=16, client_chunk_size=chunk, batch_size=3,
                                   steps=1, client_sharding=sharding.client_sharding(mesh))
  plan = memory.measure_round(make16, model.params, train16, clients_per_round=16)
  at16 = make16(16)
  actual = memory.compiled_round_bytes(at16, at16.init(model.params, key), train16)[0]
  out["memory_devices"] = plan.devices
  out["memory_error_at_16"] = abs(plan.total_bytes(16) / actual - 1)
  out["memory_per_client"] = plan.per_client_bytes
  print(json.dumps(out))


if __name__ == "__main__":
  main()
