"""Peer benchmark worker: FedJAX 0.0.17 on the shared task, in FedJAX's own environment.

The way FedJAX's own examples train: `fedjax.algorithms.fed_avg.federated_averaging`
(for_each_client with its default jit backend: a jitted step per batch, driven from
Python), `fedjax.InMemoryFederatedData`, `UniformGetClientSampler`, client batches from
`ShuffleRepeatBatchHParams(batch_size, num_epochs)`, and a haiku model: FedJAX's own
`models.emnist.create_dense_model(only_digits=True, hidden_units=200)` (784-200-200-10)
for the MLP; the CNN of McMahan et al. 2017 (5x5 conv 32 and 64 'SAME', 2x2 max pool,
512 dense) written here in haiku, through `fedjax.create_model_from_haiku`. Each round is
timed with the server parameters blocked on. Writes one JSON record (common.record).

Install (see benchmarks/README.md): `pip install fedjax==0.0.17` in its own virtual
environment. FedJAX 0.0.17 calls `jax.tree_map`, which jax 0.6 removed; this worker sets
`jax.tree_map = jax.tree_util.tree_map` before importing fedjax.
"""

import time

MAIN_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402

if not hasattr(jax, "tree_map"):  # removed in jax 0.6; FedJAX 0.0.17 still calls it
  jax.tree_map = jax.tree_util.tree_map

import fedjax  # noqa: E402
import haiku as hk  # noqa: E402
from fedjax.core import for_each_client  # noqa: E402
import numpy as np  # noqa: E402


def cnn_model() -> "fedjax.Model":
  """The FedAvg CNN (1,663,370 parameters for 28x28x1, 10 classes) in haiku."""

  def forward(batch):
    x = batch["x"].reshape(-1, *common.IMAGE, 1)
    pool = lambda v: hk.max_pool(v, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1),
                                 padding="VALID")
    x = pool(jax.nn.relu(hk.Conv2D(32, kernel_shape=5, padding="SAME")(x)))
    x = pool(jax.nn.relu(hk.Conv2D(64, kernel_shape=5, padding="SAME")(x)))
    x = jax.nn.relu(hk.Linear(512)(hk.Flatten()(x)))
    return hk.Linear(common.NUM_CLASSES)(x)

  return fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward),
      sample_batch={"x": np.zeros((1, *common.IMAGE), np.float32),
                    "y": np.zeros((1,), np.int32)},
      train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
      eval_metrics={"loss": fedjax.metrics.CrossEntropyLoss()})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_task_args(p)
  args = p.parse_args(argv)
  launch = common.launch_time(MAIN_START)

  fd = fedjax.InMemoryFederatedData({
      str(i).encode(): dict(zip(("x", "y"), common.client_data(
          args.seed, i, args.examples_per_client)))
      for i in range(args.num_clients)})
  if args.model == "mlp":
    model = fedjax.models.emnist.create_dense_model(only_digits=True, hidden_units=200)
  else:
    model = cnn_model()
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(args.client_lr),
      fedjax.optimizers.sgd(args.server_lr),
      fedjax.ShuffleRepeatBatchHParams(batch_size=args.batch_size, num_epochs=args.epochs))
  params = model.init(jax.random.PRNGKey(args.seed))
  state = algorithm.init(params)
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      fd, num_clients=args.clients_per_round, seed=args.seed)
  apply = jax.jit(lambda p, x: model.apply_for_eval(p, {"x": x}))
  evaluator = common.Evaluator(args, launch)
  setup_done = time.time()

  round_ends = []
  for rnd in range(1, args.rounds + 1):
    state, _ = algorithm.apply(state, sampler.sample())
    jax.block_until_ready(state.params)
    round_ends.append(time.time())
    if evaluator.after_round(rnd, lambda x: apply(state.params, x)):
      break

  ex, ey = common.eval_data(args.seed)
  final = common.cross_entropy(np.asarray(apply(state.params, ex)), ey)
  initial = common.cross_entropy(np.asarray(apply(params, ex)), ey)
  dev = jax.devices()[0]
  num_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))
  result = common.record(
      args, simulator="FedJAX", launch=launch, main_start=MAIN_START, setup_done=setup_done,
      round_ends=round_ends, device=f"{dev.platform}: {dev.device_kind}",
      packages=common.versions("fedjax", "jax", "jaxlib", "dm-haiku", "optax"),
      extra={"eval_loss_initial": initial, "eval_loss_final": final, "params": num_params,
             **evaluator.extra(),
             "implementation": "fedjax.algorithms.fed_avg.federated_averaging, default "
                               "for_each_client backend ("
                               + type(for_each_client.get_for_each_client_backend()).__name__
                               + "); haiku model: " + (
                                   "fedjax.models.emnist.create_dense_model(only_digits=True,"
                                   " hidden_units=200)" if args.model == "mlp" else
                                   "the CNN with hk.Conv2D (lax.conv)")})
  t = result["timings"]
  print(f"FedJAX: {t['per_round_warm_median_s']:.4f} s/round warm, first round "
        f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s, eval loss "
        f"{initial:.4f} -> {final:.4f}", flush=True)


if __name__ == "__main__":
  main()
