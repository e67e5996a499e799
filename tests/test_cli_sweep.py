"""`fedjax-sim sweep --config FILE`: tiny grids end to end, and bad configs refused early."""

import csv
import json
import pathlib
import re

import pytest

from fedjax_sim import cli, sweep_config

# Synthetic(1,1), 2 rounds of 2 local steps, 3 clients per round: one compile, a few seconds.
SETTINGS = {"rounds": 2, "eval_every": 2, "clients_per_round": 3, "steps": 2, "batch_size": 10}


def write(tmp_path, config, name="sweep.json"):
  path = tmp_path / name
  path.write_text(json.dumps(config))
  return str(path)


def read_rows(out):
  with open(out / "results.csv") as f:
    return list(csv.DictReader(f))


def test_fedadam_grid_writes_table_and_equals_run(tmp_path, capsys):
  config = {"task": "synthetic", "algorithm": "fedadam", "settings": SETTINGS,
            "grid": {"client_lr": [0.02, 0.05], "server_lr": [0.01, 0.03]}, "seeds": [0, 1],
            "plot": "test_accuracy"}
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", write(tmp_path, config), "--output", str(out)]) == 0
  rows = read_rows(out)
  assert [(float(r["client_lr"]), float(r["server_lr"]), int(r["seed"])) for r in rows] == [
      (c, s, seed) for c in (0.02, 0.05) for s in (0.01, 0.03) for seed in (0, 1)]
  for name in ("final_train_loss", "best_train_loss", "final_test_accuracy",
               "best_test_accuracy"):
    assert name in rows[0]
  assert (out / "test_accuracy.png").stat().st_size > 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["configurations"] == 8 and summary["eval_rounds"] == [2]
  assert len(summary["seconds_per_compilation"]) == 1
  # The written config is a config: it parses back to the same sweep.
  written = json.loads((out / "config.json").read_text())
  assert sweep_config.parse_config(written).to_json() == written
  assert written["settings"]["server_optimizer"] == "fedadam"
  printed = capsys.readouterr().out
  assert "sweeping 4 configuration(s) x 2 seed(s) for 2 rounds, 1 compiled program(s)" in printed
  assert "done: 8 rows x 2 rounds" in printed

  # The row with seed 0 is `fedjax-sim run --seed 0` with the same settings.
  run_out = tmp_path / "run"
  assert cli.main(["run", "--rounds", "2", "--eval-every", "2", "--clients-per-round", "3",
                   "--steps", "2", "--batch-size", "10", "--server-optimizer", "fedadam",
                   "--client-lr", "0.05", "--server-lr", "0.03", "--seed", "0", "--output",
                   str(run_out), "--no-progress"]) == 0
  final = json.loads((run_out / "summary.json").read_text())["final"]
  row = rows[6]
  assert (row["client_lr"], row["server_lr"], row["seed"]) == ("0.05", "0.03", "0")
  assert float(row["final_train_loss"]) == pytest.approx(final["train_loss"], rel=1e-5)
  assert float(row["final_test_loss"]) == pytest.approx(final["test_loss"], rel=1e-5)
  assert float(row["final_test_accuracy"]) == pytest.approx(final["test_accuracy"], abs=1e-6)


def test_fedprox_mu_grid_with_static_groups_from_toml(tmp_path, capsys):
  toml = """
task = "synthetic"
algorithm = "fedprox"
seeds = [0]

[settings]
rounds = 1
eval_every = 1
steps = 2
batch_size = 10
client_lr = 0.1

[grid]
mu = [0.0, 1.0]

[static]
clients_per_round = [2, 3]
"""
  path = tmp_path / "prox.toml"
  path.write_text(toml)
  out = tmp_path / "prox"
  assert cli.main(["sweep", "--config", str(path), "--output", str(out)]) == 0
  rows = read_rows(out)
  assert [(int(r["clients_per_round"]), float(r["mu"])) for r in rows] == [
      (2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
  assert rows[0]["final_test_loss"] != rows[1]["final_test_loss"]  # mu changed training
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["seconds_per_compilation"]) == 2
  assert not (out / "test_accuracy.png").exists()
  assert "2 compiled program(s)" in capsys.readouterr().out


def run_final(tmp_path, name, flags):
  out = tmp_path / name
  assert cli.main(["run", "--rounds", "2", "--eval-every", "2", "--clients-per-round", "3",
                   "--steps", "2", "--batch-size", "10", "--seed", "0", "--output", str(out),
                   "--no-progress", *flags]) == 0
  return json.loads((out / "summary.json").read_text())["final"]


def assert_row_is_run(row, final):
  assert float(row["final_train_loss"]) == pytest.approx(final["train_loss"], rel=1e-5)
  assert float(row["final_test_loss"]) == pytest.approx(final["test_loss"], rel=1e-5)
  assert float(row["final_test_accuracy"]) == pytest.approx(final["test_accuracy"], abs=1e-6)


def test_feddyn_alpha_grid_equals_runs(tmp_path):
  config = {"task": "synthetic", "algorithm": "feddyn", "settings": SETTINGS,
            "grid": {"feddyn_alpha": [0.01, 0.5]}, "seeds": [0]}
  out = tmp_path / "dyn"
  assert cli.main(["sweep", "--config", write(tmp_path, config), "--output", str(out)]) == 0
  rows = read_rows(out)
  assert [float(r["feddyn_alpha"]) for r in rows] == [0.01, 0.5]
  assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]  # alpha changed training
  for row in rows:
    assert_row_is_run(row, run_final(tmp_path, f"dyn{row['feddyn_alpha']}",
                                     ["--algorithm", "feddyn", "--feddyn-alpha",
                                      row["feddyn_alpha"]]))
  written = json.loads((out / "config.json").read_text())
  assert sweep_config.parse_config(written).to_json() == written


def test_dp_noise_multiplier_grid_equals_runs(tmp_path, capsys):
  # SCAFFOLD under DP: the noise multiplier is traced; each row has its own epsilon.
  settings = {**SETTINGS, "clip": 0.5, "accountant": "pld"}
  config = {"task": "synthetic", "algorithm": "scaffold", "settings": settings,
            "grid": {"noise_multiplier": [0.5, 2.0]}, "seeds": [0]}
  out = tmp_path / "dp"
  assert cli.main(["sweep", "--config", write(tmp_path, config), "--output", str(out)]) == 0
  rows = read_rows(out)
  assert [float(r["noise_multiplier"]) for r in rows] == [0.5, 2.0]
  assert float(rows[0]["final_epsilon"]) > float(rows[1]["final_epsilon"])
  assert "final_epsilon" in capsys.readouterr().out
  for row in rows:
    final = run_final(tmp_path, f"dp{row['noise_multiplier']}",
                      ["--algorithm", "scaffold", "--clip", "0.5", "--noise-multiplier",
                       row["noise_multiplier"], "--accountant", "pld"])
    assert_row_is_run(row, final)
    assert float(row["final_epsilon"]) == pytest.approx(final["epsilon"], rel=1e-9)


@pytest.mark.parametrize("name, settings, grid, flags", [
    ("systems", {"dropout": 0.3}, {"deadline": [0.5, 3.0]}, ["--dropout", "0.3"]),
    ("backdoor", {"attack": "backdoor", "malicious_fraction": 0.2},
     {"client_lr": [0.05, 0.1]}, ["--attack", "backdoor", "--malicious-fraction", "0.2"])])
def test_systems_and_backdoor_sweeps_equal_runs(tmp_path, name, settings, grid, flags):
  # The client profiles and the backdoor's trigger (from the data's range) are built
  # inside the sweep's traced program: on jax 0.12 both failed there, with a traceback.
  config = {"task": "synthetic", "algorithm": "fedavg", "settings": {**SETTINGS, **settings},
            "grid": grid, "seeds": [0]}
  out = tmp_path / name
  assert cli.main(["sweep", "--config", write(tmp_path, config), "--output", str(out)]) == 0
  (key, values), = grid.items()
  rows = read_rows(out)
  assert [float(r[key]) for r in rows] == values
  for row in rows:
    final = run_final(tmp_path, f"{name}{row[key]}",
                      [f"--{key.replace('_', '-')}", row[key], *flags])
    assert_row_is_run(row, final)
    if name == "backdoor":  # reported as by `fedjax-sim run`
      assert float(row["final_backdoor_accuracy"]) == pytest.approx(
          final["backdoor_accuracy"], abs=1e-6)


GOOD = {"task": "synthetic", "algorithm": "fedavg", "settings": SETTINGS,
        "grid": {"client_lr": [0.02, 0.05]}, "seeds": [0]}


def changed(**changes):
  config = json.loads(json.dumps(GOOD))
  for key, value in changes.items():
    *parents, last = key.split("__")
    target = config
    for parent in parents:
      target = target.setdefault(parent, {})
    if value is KeyError:
      target.pop(last)
    else:
      target[last] = value
  return config


@pytest.mark.parametrize("config, message", [
    (changed(gird={"client_lr": [0.1]}), "unknown key 'gird' (did you mean 'grid'?)"),
    (changed(task="mnist7"), "unknown task 'mnist7'; choose from"),
    (changed(algorithm="fedfoo"), "unknown algorithm 'fedfoo'; choose from fedavg, fedprox"),
    (changed(algorithm="fedbuff"), "algorithm 'fedbuff' is asynchronous"),
    (changed(grid={}), "grid is empty: give at least one of client_lr, server_lr"),
    (changed(grid=KeyError), "no 'grid'"),
    (changed(grid__client_lr=[]), "grid.client_lr is empty"),
    (changed(grid__client_lr=0.1), "grid.client_lr must be a list of numbers, got 0.1"),
    (changed(grid__client_lr=[0.1, "0.3"]), "grid.client_lr must hold finite numbers, got '0.3'"),
    (changed(grid__mu=[0.1]), "grid.mu: fedavg does not use mu (it applies to fedprox)"),
    (changed(grid__client_momentum=[0.5]), "client_momentum applies with client_optimizer"),
    (changed(grid__client_lr=[0.05, 0.0]), "grid.client_lr: client_lr must be positive, got 0.0"),
    (changed(grid__dropout=[0.5, 1.0]), "grid.dropout: dropout must lie in [0, 1), got 1.0"),
    (changed(settings__mu=0.1), "settings.mu: fedavg does not use mu"),
    (changed(settings__target_epsilon=1.0, grid__noise_multiplier=[1.0]),
     "give target_epsilon alone"),
    (changed(settings__attack="backdoor", grid__server_lr=[1.0]), "list server_lr under 'static'"),
    (changed(grid__steps=[1, 2]), "shape-changing settings go under 'static'"),
    (changed(settings__clients_per_rnd=3), "did you mean 'clients_per_round'?"),
    (changed(settings__rounds="2"), "settings.rounds must be an integer, got '2'"),
    (changed(settings__epochs=1), "give local epochs or steps, not both"),
    (changed(settings__client_lr=0.1), "client_lr is both in settings and in grid"),
    (changed(settings__server_optimizer="adam"), "settings.server_optimizer must be one of"),
    (changed(static={"client_chunk_size": []}), "static.client_chunk_size must be a non-empty"),
    (changed(static={"client_chunk_size": [3, 2, 3]}),
     "static.client_chunk_size repeats a value: [3, 2, 3]"),
    (changed(static={"model": ["mlp"]}), "static.model: every row of a sweep shares it"),
    (changed(static={"clients_per_rnd": [3]}), "static: unknown key 'clients_per_rnd'"),
    (changed(seeds=[]), "seeds must be a non-empty list of integers"),
    (changed(seeds=[2 ** 32]), "seeds must be a non-empty list of integers in [0, 2^32)"),
    (changed(settings__init_seed=2 ** 32), "settings.init_seed must be an integer in [0, 2^32)"),
    # The rows of the sgd group would be one run under two labels.
    (changed(grid__client_momentum=[0.0, 0.9], static={"client_optimizer": ["sgd", "momentum"]}),
     "grid.client_momentum applies with client_optimizer 'momentum' alone, but "
     "static.client_optimizer also lists ['sgd']"),
    (changed(settings__num_clients=30), "(task 'synthetic'): unknown key 'num_clients'"),
    (changed(settings__alpha="x"), "settings.alpha (an option of task 'synthetic') must be a"),
    (changed(algorithm="fedadam", settings__server_optimizer="fedyogi"),
     "algorithm 'fedadam' is FedAvg with server optimizer 'fedadam'"),
])
def test_bad_config_is_refused_before_anything_compiles(tmp_path, capsys, count_compiles,
                                                        config, message):
  out = tmp_path / "out"
  assert cli.main(["sweep", "--config", write(tmp_path, config), "--output", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and "sweep.json" in err, err
  assert count_compiles() == 0 and not out.exists()


@pytest.mark.parametrize("changes, message", [
    ({"settings__clip": 1.0, "grid__client_lr": [0.05]},
     "client_lr=0.05: --clip/--adaptive-clip are DP-FedAvg's"),
    ({"settings__clients_per_round": 31}, "clients_per_round=31 but the data has only 30"),
    ({"plot": "test_acc"}, "plot: no metric 'test_acc'; choose from train_loss, test_loss"),
])
def test_bad_values_are_refused_before_the_sweep(tmp_path, capsys, changes, message):
  out = tmp_path / "out"
  code = cli.main(["sweep", "--config", write(tmp_path, changed(**changes)), "--output",
                   str(out)])
  assert code == 2
  assert message in capsys.readouterr().err
  assert not out.exists()


def test_unreadable_config_files(tmp_path, capsys):
  assert cli.main(["sweep", "--config", str(tmp_path / "missing.json")]) == 2
  assert "missing.json" in capsys.readouterr().err
  bad = tmp_path / "bad.json"
  bad.write_text('{"grid": ')
  assert cli.main(["sweep", "--config", str(bad)]) == 2
  assert "bad.json: not valid JSON" in capsys.readouterr().err


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_example_config_parses():
  example = ROOT / "benchmarks" / "sweep_example.json"
  config = sweep_config.load_config(example)
  assert config.algorithm == "fedavg" and config.settings["server_optimizer"] == "fedadam"
  assert len(config.grid["client_lr"]) * len(config.grid["server_lr"]) > 1


def test_readme_config_is_the_example():
  block = re.search(r"```json\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
  example = sweep_config.load_config(ROOT / "benchmarks" / "sweep_example.json")
  assert sweep_config.parse_config(json.loads(block)).to_json() == example.to_json()


def test_a_new_sweep_never_shows_the_old_one_s_results(tmp_path, monkeypatch, capsys):
  # A sweep sent to a finished sweep's folder that then failed left the old results.csv
  # and summary.json beside its own config.json: read back as its rows, "completed".
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", write(tmp_path, GOOD), "--output", str(out)]) == 0
  assert (out / "results.csv").exists()

  def boom(*args, **kwargs):
    raise RuntimeError("the sweep failed")

  monkeypatch.setattr(cli, "run_sweep", boom)
  # Another sweep is refused: it deleted these results before it had any of its own.
  other = changed(settings__rounds=4)
  capsys.readouterr()
  assert cli.main(["sweep", "--config", write(tmp_path, other, "other.json"), "--output",
                   str(out)]) == 2
  assert "holds the results of another sweep" in capsys.readouterr().err
  assert all((out / name).exists() for name in ("results.csv", "curves.npz", "summary.json"))
  assert json.loads((out / "config.json").read_text())["settings"]["rounds"] != 4
  # The same sweep again replaces them, and if it fails shows none of them as its own.
  with pytest.raises(RuntimeError):
    cli.main(["sweep", "--config", write(tmp_path, GOOD), "--output", str(out)])
  assert not any((out / name).exists() for name in cli.SWEEP_RESULTS)
  # nor does a sweep write into a run's folder
  run = tmp_path / "run"
  assert cli.main(["run", "--rounds", "2", "--eval-every", "2", "--clients-per-round", "3",
                   "--steps", "2", "--output", str(run), "--no-progress"]) == 0
  capsys.readouterr()
  assert cli.main(["sweep", "--config", write(tmp_path, GOOD), "--output", str(run)]) == 2
  assert "holds a run of `fedjax-sim run`, not a sweep" in capsys.readouterr().err
  # nor a run into a sweep's folder, even with --overwrite (its files stayed beside)
  for flags in ([], ["--overwrite"]):
    assert cli.main(["run", "--rounds", "2", "--output", str(out), "--no-progress",
                     *flags]) == 2
    assert "holds a sweep (`fedjax-sim sweep`), not a run" in capsys.readouterr().err


def test_a_stop_after_the_last_round_loses_nothing(tmp_path, monkeypatch, capsys):
  # The checkpoints were deleted before every row's epsilon was computed and the results
  # written: a Ctrl-C in between (seconds per row under DP) left config.json alone, and
  # --resume found nothing to resume.
  settings = {**SETTINGS, "clip": 0.5, "accountant": "pld"}
  config = write(tmp_path, {"task": "synthetic", "settings": settings,
                            "grid": {"noise_multiplier": [0.5, 2.0]}, "seeds": [0]})
  out = tmp_path / "dp"
  epsilon, calls = sweep_config.Builder.epsilon, []

  def interrupted(self, row):
    calls.append(row)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return epsilon(self, row)

  monkeypatch.setattr(sweep_config.Builder, "epsilon", interrupted)
  assert cli.main(["sweep", "--config", config, "--output", str(out)]) == 130
  assert not (out / "results.csv").exists() and any((out / "checkpoints").iterdir())
  monkeypatch.setattr(sweep_config.Builder, "epsilon", epsilon)
  assert cli.main(["sweep", "--config", config, "--output", str(out), "--resume"]) == 0
  assert [float(r["final_epsilon"]) > 0 for r in read_rows(out)] == [True, True]
  assert not (out / "checkpoints").exists()
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "curves.npz", "results.csv",
                                                   "summary.json"]
