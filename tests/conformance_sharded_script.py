"""Run by test_conformance.py in a subprocess with 8 CPU devices; prints JSON.

Every synchronous algorithm of `features.ALGORITHMS`, 2 rounds of the default setup
(8 clients per round) with the clients split over the 8 devices (`client_sharding`),
all algorithms in one program, so the process pays JAX's start-up and XLA's
per-program overhead once. The test compares the results with its own one-device
runs of the same algorithms.

Not a test module: XLA_FLAGS must be set before jax starts, and the rest of the suite
runs on one device.
"""

import json

import jax
import numpy as np

from fedjax_sim import sharding
from fedjax_sim.algorithms import features

ROUNDS = 2


def fast_compile_options():
  """As in test_conformance.py: XLA:CPU compiles these small programs 2-3x faster so
  (None where this jaxlib does not take the options)."""
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(1.0)
  except Exception:
    return None
  return options


def main():
  out = {"devices": len(jax.devices()), "algorithms": {}}
  mesh = sharding.client_mesh()
  setup = features.default_setup()
  assert setup.clients_per_round % len(jax.devices()) == 0
  sharded = features.feature("sharded clients")
  names = [n for n in features.ALGORITHMS if features.try_feature(n, sharded, setup) is None]
  key = jax.random.key(0)
  algs = {n: features.build(n, sharded, setup) for n in names}
  starts = {n: algs[n].init(setup.model.params, key, setup.num_clients) for n in names}

  def program(states, data):
    return {n: jax.lax.scan(lambda s, _: algs[n].round(s, data), states[n], None, length=ROUNDS)
            for n in names}

  states = sharding.replicate(starts, mesh)
  data = sharding.replicate(setup.data, mesh)
  compiled = jax.jit(program, compiler_options=fast_compile_options()).lower(states, data).compile()
  out["all_reduce"] = "all-reduce" in compiled.as_text()
  results = compiled(states, data)
  for n in names:
    state, metrics = results[n]
    per_client = metrics["client_train_loss"]
    client_states = (None if state.client_states is None else
                     np.concatenate([np.asarray(a).reshape(a.shape[0], -1) for a in
                                     jax.tree_util.tree_leaves(state.client_states)], axis=1))
    out["algorithms"][n] = {
        "params": [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves(state.params)],
        "client_states": None if client_states is None else client_states.ravel().tolist(),
        "train_loss": np.asarray(metrics["train_loss"]).tolist(),
        "split": (len(per_client.sharding.device_set) == 8
                  and not per_client.sharding.is_fully_replicated),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
