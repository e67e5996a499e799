"""`fedjax-sim run` end to end on the embedded default, at a few rounds."""

import json

from fedjax_sim import cli


def test_cli_default_task_writes_metrics_and_summary(tmp_path, capsys):
  out = tmp_path / "run"
  code = cli.main(["run", "--rounds", "4", "--eval-every", "2", "--output", str(out),
                   "--no-progress"])
  assert code == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert "test_accuracy" in rows[1] and "test_accuracy" in rows[3]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["rounds"] == 4
  assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
  config = json.loads((out / "config.json").read_text())
  assert config["task"] == "synthetic" and config["model"] == "logreg"
  assert "done: 4 rounds" in capsys.readouterr().out


def test_cli_flags_choose_schedule_and_optimizers(tmp_path):
  out = tmp_path / "run"
  code = cli.main(["run", "--rounds", "2", "--eval-every", "2", "--steps", "3",
                   "--batch-size", "5", "--clients-per-round", "4", "--server-optimizer",
                   "fedadam", "--server-lr", "0.01", "--client-optimizer", "momentum",
                   "--client-lr", "0.01", "--seed", "3", "--output", str(out), "--no-progress"])
  assert code == 0
  config = json.loads((out / "config.json").read_text())
  assert config["steps"] == 3 and config["server_optimizer"] == "fedadam"


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
  code = cli.main(["run", "--clients-per-round", "31", "--output", str(tmp_path / "x"),
                   "--no-progress"])
  assert code == 2
  assert "clients_per_round=31 but the data has only 30 clients" in capsys.readouterr().err
  assert cli.main(["run", "--client-lr", "0", "--no-progress"]) == 2
  assert "--client-lr must be positive, got 0.0" in capsys.readouterr().err
  # jax's keys take 32 bits of a seed: 2^32 + 5 ran seed 5's run in another folder
  assert cli.main(["run", "--seed", str(2 ** 32 + 5), "--no-progress"]) == 2
  assert "--seed must be an integer in [0, 2^32), got 4294967301" in capsys.readouterr().err
  assert cli.main(["run", "--wandb-mode", "offline", "--no-progress"]) == 2
  assert "--wandb-mode has no effect here: it applies with --wandb" in capsys.readouterr().err
  assert cli.main(["sweep", "--config", "missing.json", "--checkpoint-every", "-3"]) == 2
  assert "--checkpoint-every must be an integer >= 0, got -3" in capsys.readouterr().err


def test_a_bad_rounds_or_eval_every_keeps_a_finished_run(tmp_path, capsys):
  # It was refused only by the runner, after --overwrite had cleared the folder.
  out = str(tmp_path / "x")
  small = ["run", "--rounds", "2", "--eval-every", "2", "--clients-per-round", "3", "--steps",
           "2", "--output", out, "--no-progress"]
  assert cli.main(small) == 0
  for flag in ("--rounds", "--eval-every"):
    assert cli.main([*small, flag, "0", "--overwrite"]) == 2
    assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err
    assert (tmp_path / "x" / "summary.json").exists()
