"""Peer benchmark worker: FedAvg written with DrJAX 0.2.1's primitives, in its own environment.

How a DrJAX user writes a FedAvg round: a `@drjax.program(placements={"clients": K})`
function that `drjax.broadcast`s the server model to the K clients of the round,
`drjax.map_fn`s local training over them (DrJAX's map is a `jax.vmap` over the placed
axis; with no device mesh it adds no sharding constraints) and averages the model
deltas with `drjax.reduce_weighted_mean`, weighted by the clients' example counts; the
server adds the mean delta times the server learning rate. Local training: `--epochs`
passes over the client's examples in a fresh random order (`jax.random.permutation`),
minibatches of `--batch-size`, plain SGD, as one `lax.scan` over the steps. The K clients
are sampled without replacement on the device (`jax.random.choice`) from every client's
data held on the device as one array, so a round is one jitted call. Models: the plain
JAX MLP and CNN of jax_models.py (the CNN with `lax.conv_general_dilated`).

`--compiler-options` chooses how the round is jitted: `plain` is `jax.jit` as a DrJAX user
would call it; `fedjax_sim` adds the CPU compiler options fedjax_sim.compile sets (YNNPACK
fusions off, or for convolutions from jaxlib 0.11 and each dot alone too from 0.12; LLVM
level 1, a shorter compile;
copy insertion with region analysis), chosen by fedjax_sim/compile.py itself
(common.fedjax_sim_compile), each applied only where a probe compile accepts it.

Each round is timed with its mean training loss fetched to the host. Writes one JSON
record (common.record). Install (see benchmarks/README.md):
`pip install drjax==0.2.1 jax==0.10.2 optax==0.2.8` in its own virtual environment.
"""

import time

MAIN_START = time.time()

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import drjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jax_models  # noqa: E402

def compiler_options(which: str):
  return None if which == "plain" else common.fedjax_sim_compile().compiler_options()


def make_round(args):
  """The jitted round: (params, key, all x, all y, all counts) -> (params, mean loss)."""
  k, b, lr = args.clients_per_round, args.batch_size, args.client_lr
  n = args.examples_per_client
  if n % b:
    raise SystemExit("run_drjax.py needs examples per client divisible by the batch size")
  steps = n // b

  def loss_fn(params, x, y):
    logits = jax_models.apply(args.model, params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def client_update(params, x, y, key):
    """One client's local SGD from the broadcast model; returns (delta, mean loss)."""
    def sgd_step(p, xy):
      loss, grads = jax.value_and_grad(loss_fn)(p, *xy)
      return jax.tree.map(lambda w, g: w - lr * g, p, grads), loss

    p, losses = params, []
    for key_e in jax.random.split(key, args.epochs):
      order = jax.random.permutation(key_e, n)
      xb = x[order].reshape(steps, b, *x.shape[1:])
      yb = y[order].reshape(steps, b)
      p, loss = jax.lax.scan(sgd_step, p, (xb, yb))
      losses.append(loss)
    delta = jax.tree.map(lambda new, old: new - old, p, params)
    return delta, jnp.concatenate(losses).mean()

  @drjax.program(placements={"clients": k})
  def fedavg_round(params, x, y, counts, keys):
    client_params = drjax.broadcast(params)
    deltas, losses = drjax.map_fn(client_update, (client_params, x, y, keys))
    weights = counts.astype(jnp.float32)
    # reduce_weighted_mean multiplies leaf by leaf: the weight as a pytree like the delta.
    leaf_weights = drjax.map_fn(lambda d, w: jax.tree.map(lambda _: w, d), (deltas, weights))
    mean_delta = drjax.reduce_weighted_mean(deltas, leaf_weights)
    new_params = jax.tree.map(lambda w, d: w + args.server_lr * d, params, mean_delta)
    return new_params, drjax.reduce_weighted_mean(losses, weights)

  def train_round(params, key, all_x, all_y, all_counts):
    key_sample, key_clients = jax.random.split(key)
    ids = jax.random.choice(key_sample, args.num_clients, (k,), replace=False)
    return fedavg_round(params, all_x[ids], all_y[ids], all_counts[ids],
                        jax.random.split(key_clients, k))

  return jax.jit(train_round, compiler_options=compiler_options(args.compiler_options))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_task_args(p)
  p.add_argument("--compiler-options", choices=["plain", "fedjax_sim"], default="plain",
                 help="plain jax.jit, or with fedjax_sim's CPU compiler options")
  args = p.parse_args(argv)
  launch = common.launch_time(MAIN_START)

  xs, ys = zip(*(common.client_data(args.seed, i, args.examples_per_client)
                 for i in range(args.num_clients)))
  all_x, all_y = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))
  all_counts = jnp.full((args.num_clients,), args.examples_per_client, jnp.int32)
  initial = [jnp.asarray(w) for w in jax_models.init_params(args.model, args.seed)]
  train_round = make_round(args)
  apply = jax.jit(functools.partial(jax_models.apply, args.model))
  evaluator = common.Evaluator(args, launch)
  key = jax.random.key(args.seed)
  setup_done = time.time()

  params, round_ends, train_loss = initial, [], []
  for rnd in range(1, args.rounds + 1):
    key, sub = jax.random.split(key)
    params, loss = train_round(params, sub, all_x, all_y, all_counts)
    train_loss.append(float(loss))  # fetched each round, as the other workers do
    jax.block_until_ready(params)
    round_ends.append(time.time())
    if evaluator.after_round(rnd, lambda x: apply(params, x)):
      break

  ex, ey = common.eval_data(args.seed)
  final = common.cross_entropy(np.asarray(apply(params, ex)), ey)
  init_loss = common.cross_entropy(np.asarray(apply(initial, ex)), ey)
  dev = jax.devices()[0]
  opts = compiler_options(args.compiler_options)
  name = "DrJAX" + (", fedjax_sim's compiler options" if args.compiler_options != "plain"
                    else "")
  result = common.record(
      args, simulator=name, launch=launch, main_start=MAIN_START, setup_done=setup_done,
      round_ends=round_ends, device=f"{dev.platform}: {dev.device_kind}",
      packages=common.versions("drjax", "jax", "jaxlib", "optax"),
      extra={"eval_loss_initial": init_loss, "eval_loss_final": final,
             "train_loss_per_round": train_loss, "compiler_options": opts,
             **evaluator.extra(),
             "implementation": "drjax.program(placements={'clients': K}) round: "
                               "drjax.broadcast, drjax.map_fn of a lax.scan of SGD steps, "
                               "drjax.reduce_weighted_mean of deltas by example counts; "
                               "clients sampled on device; jax.jit with compiler_options="
                               f"{opts}; model in plain JAX"
                               + (" (conv as lax.conv_general_dilated)"
                                  if args.model == "cnn" else "")})
  t = result["timings"]
  print(f"{name}: {t['per_round_warm_median_s']:.4f} s/round warm, first round "
        f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s, eval loss "
        f"{init_loss:.4f} -> {final:.4f}", flush=True)


if __name__ == "__main__":
  main()
