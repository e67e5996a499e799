"""`fedjax-sim run`: every synchronous algorithm with the shared features (an aggregator
chain, systems), the hyperparameter table, and refusals that name their flag."""

import json
import re

import jax
import pytest

from fedjax_sim import cli
from fedjax_sim.algorithms import ALGORITHMS, build_algorithm, registry

TINY = ["--rounds", "2", "--eval-every", "2", "--clients-per-round", "3", "--steps", "2",
        "--batch-size", "10", "--no-progress"]
MODEL_BYTES = (60 * 10 + 10) * 4  # logistic regression on Synthetic(1,1), float32


def rows(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_scaffold_with_dp(tmp_path):
  out = tmp_path / "dp"
  assert cli.main(["run", "--algorithm", "scaffold", "--clip", "0.5", "--noise-multiplier", "0.8",
                   "--accountant", "pld", "--output", str(out), *TINY]) == 0
  got = rows(out)
  assert [r["round"] for r in got] == [1, 2]
  assert all(r["clip_norm"] == 0.5 for r in got)
  # DP's noise on the mean of the 3 clients' whole uploads; epsilon accounted every round.
  assert got[0]["noise_stddev"] == pytest.approx(0.8 * 0.5 / 3)
  assert 0 < got[0]["epsilon"] < got[1]["epsilon"]
  # Each client uploads its delta and its control-variate delta: both counted.
  assert got[0]["uplink_bytes"] == 3 * 2 * MODEL_BYTES
  assert "control_variate_norm" in got[0]


def test_scaffold_under_a_deadline(tmp_path, capsys):
  out = tmp_path / "deadline"
  assert cli.main(["run", "--algorithm", "scaffold", "--deadline", "0.3", "--profiles-seed", "2",
                   "--output", str(out), *TINY]) == 0
  got = rows(out)
  assert [r["round"] for r in got] == [1, 2]
  for r in got:
    assert r["num_aggregated"] <= 3 and r["round_time_s"] <= 0.3 + 1e-6
    assert r["round_time_s"] == pytest.approx(0.3) or r["num_aggregated"] == 3
  assert got[1]["sim_time_s"] == pytest.approx(got[0]["round_time_s"] + got[1]["round_time_s"])
  assert "simulated time" in capsys.readouterr().out
  assert json.loads((out / "config.json").read_text())["deadline"] == 0.3


@pytest.mark.parametrize("flags,message", [
    (["--algorithm", "scaffold", "--client-optimizer", "adam"],
     "--client-optimizer adam: scaffold defines its own local step"),
    (["--algorithm", "feddyn", "--server-optimizer", "fedadam"],
     "--server-optimizer fedadam: feddyn has its own server update"),
    (["--algorithm", "qffl", "--server-lr", "0.5"],
     "--server-lr: --algorithm qffl does not use it"),
    (["--mu", "0.1"], "--mu: --algorithm fedavg does not use it; it applies to fedprox"),
    (["--client-momentum", "0.5"], "--client-momentum applies with --client-optimizer momentum"),
    (["--algorithm", "mimelite", "--mime-momentum", "1"],
     r"--mime-momentum must lie in \[0, 1\), got 1.0"),
    # The engine's refusals, once the task and model are loaded, before the round compiles.
    (["--algorithm", "fednova", "--aggregator", "median"],
     "fednova's server rule divides example-weighted means"),
    (["--algorithm", "qffl", "--clip", "1", "--noise-multiplier", "1"],
     "qffl's server rule divides example-weighted means"),
    (["--algorithm", "scaffold", "--deadline", "5", "--aggregator", "median"],
     "--deadline: .*reducer must be the weighted mean"),
])
def test_refusals_are_one_line_naming_the_flag(tmp_path, capsys, count_compiles, flags, message):
  out = tmp_path / "x"
  assert cli.main(["run", "--output", str(out), *TINY, *flags]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("fedjax-sim: error: "), err
  assert re.search(message, err), err
  assert not out.exists()
  if "--aggregator" not in flags and "--clip" not in flags:
    assert count_compiles() == 0  # refused before the task loads


def test_every_hyperparameter_is_a_flag_and_in_the_state(small_mlp):
  help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
  for h in registry.HPARAMS:
    assert h.flag in help_text
  for name in ALGORITHMS:
    for optimizer in registry.CLIENT_OPTIMIZERS_OF.get(name, ("sgd", "momentum")):
      algorithm = build_algorithm(name, small_mlp.apply, clients_per_round=2, batch_size=4,
                                  steps=1, client_optimizer=optimizer)
      expected = {h.state_name(name) for h in registry.hparams_of(name, "algorithm")
                  if h.needs is None or optimizer == h.needs[1]}
      expected |= {"momentum"} if name == "fednova" else set()  # 0 with plain SGD
      assert set(algorithm.hparams) == expected, (name, optimizer)
      state = algorithm.init(small_mlp.params, jax.random.key(0), 6)
      assert set(state.hp) == expected
  # Defaults from the table; given values by their key.
  state = build_algorithm("feddyn", small_mlp.apply, clients_per_round=2, batch_size=4, steps=1,
                          feddyn_alpha=0.3).init(small_mlp.params, jax.random.key(0), 6)
  assert float(state.hp["alpha"]) == pytest.approx(0.3)
  assert float(state.hp["client_lr"]) == pytest.approx(registry.HPARAM["client_lr"].default)
  with pytest.raises(ValueError, match="unknown hyperparameters \\['alpha'\\]"):
    build_algorithm("feddyn", small_mlp.apply, clients_per_round=2, batch_size=4, steps=1,
                    alpha=0.3)


def test_fedrep_reports_its_personalized_accuracy(tmp_path, capsys):
  """FedRep's global model has an untrained head; what it learns is in the clients' heads."""
  out = tmp_path / "run"
  assert cli.main(["run", "--algorithm", "fedrep", "--model", "mlp", "--rounds", "2",
                   "--output", str(out), "--no-progress"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert 0.0 <= summary["personalized"]["personal_client_test_accuracy"] <= 1.0
  assert "fedrep's personalized models: client test accuracy" in capsys.readouterr().out
