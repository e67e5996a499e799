"""Defaults that diverge (issue 15, item 2): the adaptive server optimizers' own default
learning rates, and a finite but exploding training loss reported as diverged the same
way by `fs.run` (and so the CLI's summary) and by sweep rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli, optimizers, runner, sweep_config
from fedjax_sim.algorithms import build_algorithm, fedavg, registry


@pytest.mark.parametrize("server_optimizer,lr", [("fedadam", 0.01), ("fedyogi", 0.01),
                                                 ("fedadagrad", 0.1), ("fedavgm", 1.0),
                                                 ("fedavg", 1.0)])
def test_each_server_optimizer_has_its_default_learning_rate(small_mlp, server_optimizer, lr):
  args = cli.build_parser().parse_args(["run", "--server-optimizer", server_optimizer])
  registry.check_args(args)
  assert args.server_lr == lr
  state = build_algorithm("fedavg", small_mlp.apply, clients_per_round=2, batch_size=4, steps=1,
                          server_optimizer=server_optimizer).init(small_mlp.params,
                                                                  jax.random.key(0))
  assert float(state.hp["server_lr"]) == pytest.approx(lr)
  config = sweep_config.parse_config({"algorithm": server_optimizer,
                                      "grid": {"client_lr": [0.1]}})
  assert config.settings["server_lr"] == lr


def test_a_given_server_learning_rate_is_kept():
  args = cli.build_parser().parse_args(["run", "--server-optimizer", "fedadam",
                                        "--server-lr", "0.3"])
  registry.check_args(args)
  assert args.server_lr == 0.3
  assert optimizers.SERVER_LR_DEFAULTS["fedadam"] == 0.01


def _exploding(lr):
  # loss w^2 with one SGD step per round: w <- w (1 - 2 lr). With lr 10, w = 1, -19, 361...:
  # losses 1, 361, 130321 (> 1e3 x the first: diverged at round 3), all finite.
  apply = lambda params, x: params["w"] * x[:, 0]
  loss = lambda params, x, y: params["w"] ** 2 + 0.0 * jnp.sum(x)
  return fedavg(apply, loss=loss, client_optimizer=optax.sgd(lr), clients_per_round=1,
                batch_size=1, steps=1)


def test_a_finite_exploding_loss_stops_fs_run_as_diverged(tmp_path):
  train = fs.from_clients([np.ones((1, 1), np.float32)], [np.zeros(1, int)])
  algorithm = _exploding(10.0)
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  summary_path = tmp_path / "summary.json"
  with pytest.raises(runner.Diverged, match="diverged: training loss 1.303e\\+05 at round 3"):
    fs.run(algorithm, state, train, rounds=6, rounds_per_chunk=2, progress=False,
           metrics_path=tmp_path / "metrics.jsonl", summary_path=summary_path)
  summary = json.loads(summary_path.read_text())
  assert summary["status"] == "diverged at round 3" and summary["rounds"] == 3
  # The same rule marks sweep rows (which cannot stop alone inside the program).
  result = fs.sweep(lambda hp: _exploding(hp["lr"]), {"w": jnp.ones(())}, train,
                    grid={"lr": [0.01, 10.0]}, rounds=4)
  assert [r["diverged"] for r in result.rows] == [False, True]
  assert [r["diverged_round"] for r in result.rows] == [None, 3]
  assert all(np.isfinite(r["final_train_loss"]) for r in result.rows)


def test_divergence_rule():
  assert runner.diverged_round([2.3, 2.0, 1.5]) is None
  assert runner.diverged_round([2.3, 5e3]) == 2              # > 1e3 x 2.3
  assert runner.diverged_round([0.01, 900.0]) is None        # the reference is at least 1
  assert runner.diverged_round([2e6]) == 1                   # above 1e6
  assert runner.diverged_round([1.0, float("nan")]) == 2
  # A round nobody reported (systems: num_aggregated 0) has a NaN loss, not a divergence,
  # and does not count as the reference: 3e3 > 1e3 x 2.0 at round 3.
  nan = float("nan")
  assert runner.diverged_round([nan, 2.0, nan, 1.5], num_aggregated=[0, 3, 0, 3]) is None
  assert runner.diverged_round([nan, 2.0, 3e3], num_aggregated=[0, 3, 3]) == 3
  assert runner.diverged_round([nan, 2.0], num_aggregated=[3, 3]) == 1
  # Nor is a round whose sampled clients have no examples (no systems metrics then).
  assert runner.diverged_round([2.0, nan, 1.5], num_examples=[8, 0, 8]) is None


def test_a_round_of_clients_without_examples_does_not_stop_fs_run():
  # Clients of 4 and 0 examples, one a round: the empty one's rounds have a NaN loss,
  # which stopped the run as diverged.
  train = fs.from_clients([np.ones((4, 1), np.float32), np.ones((0, 1), np.float32)],
                          [np.zeros(4, int), np.zeros(0, int)], allow_empty=True)
  algorithm = _exploding(0.1)
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  _, history = fs.run(algorithm, state, train, rounds=6, rounds_per_chunk=2, progress=False)
  losses = [r["train_loss"] for r in history]
  assert len(losses) == 6 and any(np.isnan(losses)) and not all(np.isnan(losses))
