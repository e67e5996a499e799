"""`fedjax-sim plot` / `fs.plot_runs` and `fedjax-sim runs` on real run and sweep folders.

One module fixture makes them cheaply: two 4-round `fedjax-sim run`s that differ in the
client learning rate (one with the simulated clock) and a 2 x 2-seed sweep, all in-process.
"""

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import cli, cli_results, plots, results  # noqa: E402

RUN = ["run", "--rounds", "4", "--eval-every", "2", "--clients-per-round", "3", "--steps", "2",
       "--batch-size", "10", "--deadline", "5", "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("results")
  for lr in ("0.05", "0.1"):
    assert cli.main([*RUN, "--client-lr", lr, "--output", str(root / "runs" / f"lr{lr}")]) == 0
  config = {"task": "synthetic", "algorithm": "fedavg",
            "settings": {"rounds": 4, "eval_every": 2, "clients_per_round": 3, "steps": 2,
                         "batch_size": 10},
            "grid": {"client_lr": [0.02, 0.05]}, "seeds": [0, 1]}
  (root / "sweep.json").write_text(json.dumps(config))
  assert cli.main(["sweep", "--config", str(root / "sweep.json"), "--output",
                   str(root / "sweep")]) == 0
  return root


def _plot(argv):
  return cli_results.plot_command(cli.build_parser().parse_args(["plot", *argv]))


def _legend(ax):
  return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_two_runs_labels_them_by_their_configuration_difference(folders, tmp_path):
  png = tmp_path / "fig.png"
  ax = _plot([str(folders / "runs" / "lr0.05"), str(folders / "runs" / "lr0.1"),
              "--output", str(png)])
  assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
  assert _legend(ax) == ["client_lr=0.05", "client_lr=0.1"]
  assert ax.get_xlabel() == "round" and ax.get_ylabel() == "test accuracy (fraction correct)"
  # The line is the run's test accuracy at its evaluated rounds.
  rows = [json.loads(line) for line in
          (folders / "runs" / "lr0.1" / "metrics.jsonl").read_text().splitlines()]
  line = ax.get_lines()[1]
  assert list(line.get_xdata()) == [2, 4]
  np.testing.assert_allclose(line.get_ydata(), [r["test_accuracy"] for r in rows
                                                if "test_accuracy" in r])
  # Distinguishable: colour or line style differ.
  a, b = ax.get_lines()[:2]
  assert (a.get_color(), a.get_linestyle()) != (b.get_color(), b.get_linestyle())


def test_plot_sweep_draws_seeds_as_mean_and_band(folders, tmp_path):
  png = tmp_path / "sweep.png"
  ax = _plot([str(folders / "sweep"), "--output", str(png)])
  assert png.stat().st_size > 10_000
  assert _legend(ax) == ["client_lr=0.02 (mean of 2 seeds)", "client_lr=0.05 (mean of 2 seeds)"]
  curves = np.load(folders / "sweep" / "curves.npz")
  accuracy = curves["eval_test_accuracy"]  # rows: (0.02, seed 0), (0.02, 1), (0.05, 0), (0.05, 1)
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), accuracy[:2].mean(axis=0))
  np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), accuracy[2:].mean(axis=0))
  bands = ax.collections
  assert len(bands) == 2
  low, high = bands[1].get_paths()[0].vertices[:, 1].min(), accuracy[2:].max()
  assert low == pytest.approx(accuracy[2:].min()) and high >= low
  # Runs and sweep rows together: labelled by what differs among all of them (here the
  # learning rate, the steps... and the deadline, which only the runs set).
  ax = fs.plot_runs([folders / "runs" / "lr0.1", folders / "sweep"], metric="train_loss")
  labels = _legend(ax)
  assert len(labels) == 3 and all("client_lr=" in label for label in labels)
  assert "deadline=5" in labels[0] and "deadline=None" in labels[1]


def test_plot_counts_a_configuration_s_seed_once(folders, tmp_path):
  # The same sweep in two folders (a copy, or a run beside the sweep row it repeats):
  # a band's mean counted every seed twice ("mean of 4 seeds"), lines overwrote each other.
  copy = tmp_path / "copy"
  shutil.copytree(folders / "sweep", copy)
  with pytest.warns(UserWarning, match="the same configuration and seed again, left out: "):
    ax = fs.plot_runs([folders / "sweep", copy])
  assert _legend(ax) == ["client_lr=0.02 (mean of 2 seeds)", "client_lr=0.05 (mean of 2 seeds)"]
  accuracy = np.load(folders / "sweep" / "curves.npz")["eval_test_accuracy"]
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), accuracy[:2].mean(axis=0))
  with pytest.warns(UserWarning, match="left out"):
    ax = fs.plot_runs([folders / "sweep", copy], seeds="lines")
  assert _legend(ax) == [f"client_lr={lr}, seed={s}" for lr in ("0.02", "0.05") for s in (0, 1)]


def test_plot_x_axes_are_cumulative_bytes_and_simulated_time(folders):
  run = folders / "runs" / "lr0.05"
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  ax = fs.plot_runs([run], metric="train_loss", x="uplink_bytes")
  uplink = np.cumsum([r["uplink_bytes"] for r in rows])  # bytes per round, summed
  divisor = {"kB": 1e3, "MB": 1e6, "bytes": 1.0}[ax.get_xlabel().split("(")[1][:-1]]
  np.testing.assert_allclose(ax.get_lines()[0].get_xdata() * divisor, uplink, rtol=1e-6)
  assert ax.get_xlabel().startswith("cumulative uplink (")
  assert ax.get_xscale() == "linear"  # one run's bytes span decades from round 1: not log
  assert ax.get_ylabel() == "training loss (mean per example)"
  # On the y axis bytes are the round's own, not summed (the label said cumulative).
  ax = fs.plot_runs([run], metric="uplink_bytes")
  assert ax.get_ylabel().startswith("uplink per round (")
  ax = fs.plot_runs([run], x="sim_time_s")
  assert ax.get_xlabel() == "simulated time (s)"
  np.testing.assert_allclose(ax.get_lines()[0].get_xdata(),
                             [r["sim_time_s"] for r in rows if "test_accuracy" in r])
  # The sweep ran without the simulated clock: a clear error.
  with pytest.raises(ValueError, match="no per-round 'sim_time_s'.*--deadline"):
    fs.plot_runs([folders / "sweep"], x="sim_time_s")


def test_plot_scales_styles_and_errors(folders, tmp_path, capsys):
  assert plots.spans_decades(np.array([1e3, 1e6])) and not plots.spans_decades(np.array([2., 9.]))
  # A loss falling from 100 to 0.1 is drawn on a log axis; an accuracy never is.
  falling = tmp_path / "falling"
  falling.mkdir()
  (falling / "config.json").write_text(json.dumps({"task": "synthetic", "seed": 0}))
  (falling / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r, "train_loss": 100.0 / 10 ** r, "test_accuracy": 0.001 * 10 ** r})
      + "\n" for r in range(4)))
  assert fs.plot_runs(falling, metric="train_loss").get_yscale() == "log"
  assert fs.plot_runs(falling, metric="test_accuracy").get_yscale() == "linear"
  assert fs.plot_runs(folders / "runs" / "lr0.1", metric="train_loss").get_yscale() == "linear"
  twenty = {(str(s["color"]), s["linestyle"]) for s in (plots.style(i, 20) for i in range(20))}
  assert len(twenty) == 20
  assert cli.main(["plot", str(folders / "runs" / "lr0.1"), "--metric", "nope"]) == 2
  assert "no run has metric 'nope'; they have" in capsys.readouterr().err
  assert cli.main(["plot", str(folders)]) == 2
  assert "not a run folder" in capsys.readouterr().err
  # A run with no metric rows at all (diverged in round 1) says so, with its status.
  nan = tmp_path / "nan"
  nan.mkdir()
  (nan / "config.json").write_text(json.dumps({"task": "synthetic", "seed": 0}))
  (nan / "metrics.jsonl").write_text("")
  (nan / "summary.json").write_text(json.dumps({"status": "diverged at round 1"}))
  assert cli.main(["plot", str(nan)]) == 2
  assert "no metrics were recorded (nan: diverged at round 1)" in capsys.readouterr().err


def test_output_places_and_derived_dp_noise_are_no_configuration_difference(folders, tmp_path):
  """Seeds that save their parameters to their own files, or that calibrated the same
  noise from --target-epsilon (config keeps the flag, dp_noise_multiplier the value),
  are one configuration: one line and band, no column."""
  run = folders / "runs" / "lr0.1"
  config = json.loads((run / "config.json").read_text())
  for seed in (0, 1):
    shutil.copytree(run, tmp_path / f"s{seed}")
    (tmp_path / f"s{seed}" / "config.json").write_text(json.dumps(
        {**config, "seed": seed, "save_params": f"params/s{seed}.npz",
         "noise_multiplier": None, "dp_noise_multiplier": 0.4}))
  runs = [r for seed in (0, 1) for r in results.load(tmp_path / f"s{seed}")]
  assert results.differences(runs) == []
  assert _legend(fs.plot_runs([tmp_path / "s0", tmp_path / "s1"])) == [
      "fedavg on synthetic (mean of 2 seeds)"]


def test_runs_table_shows_each_status(folders, tmp_path, capsys):
  root = tmp_path / "many"
  done = folders / "runs" / "lr0.1"
  for name in ("finished", "failed", "interrupted", "killed"):
    shutil.copytree(done, root / name)
  summary = json.loads((done / "summary.json").read_text())
  (root / "failed" / "summary.json").write_text(
      json.dumps({**summary, "status": "failed: ValueError: boom\n  on two lines", "rounds": 4}))
  # configured for 8 rounds: "rounds" is then a key column, beside the rounds done
  config = json.loads((done / "config.json").read_text())
  (root / "failed" / "config.json").write_text(json.dumps({**config, "rounds": 8}))
  lines = (done / "metrics.jsonl").read_text().splitlines()
  (root / "interrupted" / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
  (root / "interrupted" / "summary.json").write_text(
      json.dumps({**summary, "status": "interrupted", "rounds": 2}))
  # As fs.run leaves it when killed: "running", with the seconds of its start.
  (root / "killed" / "summary.json").write_text(
      json.dumps({"status": "running", "rounds": 0, "seconds": 0.0}))
  (root / "killed" / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"round": 4, "tr')
  shutil.copytree(folders / "sweep", root / "sweep")
  (root / "sweep-running").mkdir()  # a sweep before its results: its config only
  shutil.copy(folders / "sweep" / "config.json", root / "sweep-running" / "config.json")
  (root / "finished" / "tensorboard").mkdir()  # folders inside a run are not runs
  out = tmp_path / "runs.csv"
  assert cli.main(["runs", str(root), "--sort", "best_test_accuracy", "--csv", str(out)]) == 0
  printed = capsys.readouterr().out
  with open(out) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"finished", "failed", "interrupted", "killed", "sweep-running[*]",
                       *(f"sweep[{i}]" for i in range(4))}
  assert rows["sweep-running[*]"]["status"] == results.NO_SUMMARY
  assert rows["finished"]["status"] == "completed" and rows["finished"]["rounds_done"] == "4"
  assert rows["failed"]["status"] == "failed: ValueError: boom on two lines"  # one line
  table = [line for line in printed.splitlines() if not line.startswith("fedjax-sim:")]
  assert len(table) == 1 + len(rows)  # a header, then a line per run
  assert rows["failed"]["rounds"] == "8" and rows["failed"]["rounds_done"] == "4"
  assert rows["interrupted"]["status"] == "interrupted" and rows["interrupted"]["rounds_done"] == "2"
  assert rows["killed"]["status"] == results.NO_SUMMARY and rows["killed"]["rounds_done"] == "3"
  assert rows["killed"]["seconds"] == ""  # not the stale 0.0
  assert rows["sweep[1]"]["status"] == "completed" and rows["sweep[1]"]["seed"] == "1"
  for name in ("finished", "failed", "interrupted", "killed", "sweep[0]"):
    assert f"{name} " in printed
  assert "client_lr" in printed.splitlines()[0]  # the configuration difference is a column
  # The unfinished sweep's model is unknown (the task's default), not a difference.
  assert "model" not in printed.splitlines()[0].split()
  # Sorted by best test accuracy, highest first, the row without one last.
  best = [float(r["best_test_accuracy"]) for r in rows.values() if r["best_test_accuracy"]]
  with open(out) as f:
    order = [r["best_test_accuracy"] for r in csv.DictReader(f)]
  assert order[:-1] == [str(v) for v in sorted(best, reverse=True)] and order[-1] == ""
  assert float(rows["interrupted"]["final_test_accuracy"]) == pytest.approx(
      json.loads(lines[1])["test_accuracy"])
