"""Peer benchmark worker: pfl-research 0.6.0 (Apple) with its PyTorch backend, in its own environment.

The way pfl's own benchmarks set up FedAvg: `pfl.algorithm.FederatedAveraging` run with
`NNAlgorithmParams` (cohort `--clients-per-round`, `--rounds` central iterations), a
`pfl.aggregate.simulate.SimulatedBackend` with the `WeightByDatapoints` postprocessor
(the example-weighted mean of the model differences), a `pfl.model.pytorch.PyTorchModel`
wrapping a torch `nn.Module` (the 2NN MLP 784-200-200-10, or the FedAvg CNN with
`nn.Conv2d`) with `torch.optim.SGD` as the local optimizer (`NNTrainHyperParams`:
`--epochs` epochs of batch `--batch-size`, lr `--client-lr`) and as the central optimizer
(lr `--server-lr`, which applies the averaged difference as FedAvg does), and a
`pfl.data.federated_dataset.FederatedDataset` over the same per-client examples as every
other worker (common.py), users sampled uniformly at random (pfl's 'random' user
sampler). pfl's `Dataset` batches a user's examples in stored order, so the dataset
function hands pfl each sampled user's examples in a fresh random order (one
permutation per round, as the other simulators shuffle each epoch).

Round times come from a `TrainingProcessCallback` whose `after_central_iteration` takes
the time (and, for time-to-accuracy runs, evaluates on the held-out set and stops
training at the target). pfl evaluates each trained user before and after local
training on central iterations divisible by `evaluation_frequency`; it is set past the
last iteration, so that happens only in the first round. Writes one JSON record
(common.record). Install (see benchmarks/README.md): `pip install "pfl[pytorch]==0.6.0"`
in its own virtual environment, with a CPU build of torch.
"""

import time

MAIN_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402


class Net(nn.Module):
  """The 2NN MLP or the FedAvg CNN, with the `loss` and `metrics` pfl's model calls."""

  def __init__(self, model: str):
    super().__init__()
    self.kind = model
    if model == "mlp":
      self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(),
                                nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    else:
      self.body = nn.Sequential(
          nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
          nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
          nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10))

    # The JAX peers' initialization (LeCun normal weights, zero biases), not torch's
    # default (uniform, 1/sqrt(3) of that scale), so that training proceeds alike.
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=(m.weight[0].numel()) ** -0.5)
        nn.init.zeros_(m.bias)

  def forward(self, x):  # x [batch, 28, 28]
    return self.body(x.reshape(x.shape[0], 1, *common.IMAGE) if self.kind == "cnn" else x)

  def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
    self.eval() if eval else self.train()
    return F.cross_entropy(self(x), y)

  @torch.no_grad()
  def metrics(self, x, y, eval=False):  # noqa: A002
    self.eval() if eval else self.train()
    loss = F.cross_entropy(self(x), y, reduction="sum").item()
    return {"loss": Weighted(loss, len(y))}


class RoundTimer(TrainingProcessCallback):
  """Takes the time after every central iteration; evaluates when due; stops at a target."""

  def __init__(self, net: nn.Module, evaluator: common.Evaluator):
    self.net, self.evaluator, self.ends = net, evaluator, []

  def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
    self.ends.append(time.time())
    stop = self.evaluator.after_round(central_iteration + 1, logits)
    return stop, Metrics()


def logits(x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    NET.eval()
    return NET(torch.from_numpy(x)).numpy()


NET: nn.Module


def main(argv=None):
  global NET
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_task_args(p)
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's own, the CPU count)")
  args = p.parse_args(argv)
  launch = common.launch_time(MAIN_START)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)  # pfl's 'random' user sampler draws from numpy's global state

  users = {}
  for i in range(args.num_clients):
    x, y = common.client_data(args.seed, i, args.examples_per_client)
    users[i] = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))  # torch's labels
  order_rng = torch.Generator().manual_seed(args.seed)

  def make_dataset(user_id):
    x, y = users[user_id]
    perm = torch.randperm(len(y), generator=order_rng)
    return Dataset(raw_data=[x[perm], y[perm]], user_id=user_id)

  training_data = FederatedDataset(make_dataset,
                                   get_user_sampler("random", list(range(args.num_clients))))
  NET = Net(args.model)
  initial = {k: v.clone() for k, v in NET.state_dict().items()}
  model = PyTorchModel(model=NET, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(NET.parameters(), lr=args.server_lr))
  backend = SimulatedBackend(training_data=training_data, val_data=None,
                             postprocessors=[WeightByDatapoints()])
  algorithm_params = NNAlgorithmParams(
      central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
      train_cohort_size=args.clients_per_round, val_cohort_size=None)
  train_params = NNTrainHyperParams(local_num_epochs=args.epochs,
                                    local_learning_rate=args.client_lr,
                                    local_batch_size=args.batch_size)
  evaluator = common.Evaluator(args, launch)
  timer = RoundTimer(NET, evaluator)
  setup_done = time.time()

  FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                           model_train_params=train_params, callbacks=[timer])

  ex, ey = common.eval_data(args.seed)
  final = common.cross_entropy(logits(ex), ey)
  trained = {k: v.clone() for k, v in NET.state_dict().items()}
  NET.load_state_dict(initial)
  init_loss = common.cross_entropy(logits(ex), ey)
  NET.load_state_dict(trained)
  result = common.record(
      args, simulator="pfl-research", launch=launch, main_start=MAIN_START,
      setup_done=setup_done, round_ends=timer.ends,
      device=f"cpu (torch, {torch.get_num_threads()} threads)",
      packages=common.versions("pfl", "torch", "numpy"),
      extra={"eval_loss_initial": init_loss, "eval_loss_final": final,
             **evaluator.extra(),
             "implementation": "pfl.algorithm.FederatedAveraging with SimulatedBackend "
                               "(WeightByDatapoints), PyTorchModel of a torch nn.Module ("
                               + ("nn.Linear MLP" if args.model == "mlp" else
                                  "nn.Conv2d CNN") + "), torch.optim.SGD local and "
                               "central, FederatedDataset with the 'random' user sampler"})
  t = result["timings"]
  print(f"pfl: {t['per_round_warm_median_s']:.4f} s/round warm, first round "
        f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s, eval loss "
        f"{init_loss:.4f} -> {final:.4f}", flush=True)


if __name__ == "__main__":
  main()
