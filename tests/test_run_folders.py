"""Run folders are never silently replaced, and unusable output paths are one-line
errors naming them, before anything loads or compiles (`fedjax_sim.run_dir`)."""

import json
import os

import pytest

from fedjax_sim import cli, run_dir

SMALL = ["--rounds", "2", "--eval-every", "2", "--clients-per-round", "5", "--no-progress"]


def error(capsys):
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  return err


def test_default_folder_name_has_a_hash_of_the_configuration():
  parser = cli.build_parser()
  a = run_dir.default_output(parser.parse_args(["run"]))
  b = run_dir.default_output(parser.parse_args(["run", "--client-lr", "0.1"]))
  same = run_dir.default_output(parser.parse_args(["run", "--no-progress", "--overwrite"]))
  assert a != b and a == same
  assert os.path.basename(a).startswith("synthetic-fedavg-seed0-") and len(a.split("-")[-1]) == 8


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_unwritable_output_is_one_line_error_before_loading(case, tmp_path, capsys,
                                                          monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  output = {"file": blocker, "under_file": blocker / "run",
            "read_only": tmp_path / "ro" / "run"}[case]
  if case == "read_only":
    (tmp_path / "ro").mkdir()
    # Root may write anywhere, so the folder's permission is what os.access says.
    real = os.access
    monkeypatch.setattr(run_dir.os, "access", lambda p, mode: False
                        if os.path.abspath(p) == str(tmp_path / "ro") else real(p, mode))
  monkeypatch.setattr(cli.tasks, "load_task", lambda *a, **k: pytest.fail("loaded the task"))
  assert cli.main(["run", *SMALL, "--output", str(output)]) == 2
  err = error(capsys)
  assert str(output) in err
  assert {"file": "is a file", "under_file": "a file",
          "read_only": "is not writable"}[case] in err
  assert not (tmp_path / "ro" / "run").exists()


def test_failed_checks_write_nothing(tmp_path, capsys):
  output = tmp_path / "run"
  assert cli.main(["run", *SMALL, "--clients-per-round", "31", "--output", str(output)]) == 2
  assert "31" in error(capsys)
  assert not output.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A small finished run (one compile, shared by the tests below)."""
  output = tmp_path_factory.mktemp("folders") / "run"
  assert cli.main(["run", *SMALL, "--output", str(output)]) == 0
  return output


def test_another_configuration_is_an_error_offering_resume_and_overwrite(finished, capsys):
  before = {name: (finished / name).read_bytes() for name in run_dir.RUN_FILES}
  capsys.readouterr()
  assert cli.main(["run", *SMALL, "--client-lr", "0.1", "--output", str(finished)]) == 2
  err = error(capsys)
  assert str(finished) in err and "--client-lr" in err
  assert f"--resume {finished}" in err and "--overwrite" in err
  assert {name: (finished / name).read_bytes() for name in run_dir.RUN_FILES} == before


def test_unfinished_run_is_an_error_offering_resume(finished, tmp_path, capsys):
  output = tmp_path / "unfinished"
  output.mkdir()
  config = json.loads((finished / "config.json").read_text())
  config["argv"] = [*config["argv"][:-1], str(output)]  # the same flags, this folder
  (output / "config.json").write_text(json.dumps(config))
  (output / "summary.json").write_text(json.dumps({"status": "interrupted", "rounds": 1}))
  assert cli.main(config["argv"]) == 2
  err = error(capsys)
  assert "unfinished run" in err and f"--resume {output}" in err


def test_not_a_run_folder_is_an_error(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  assert cli.main(["run", *SMALL, "--output", str(tmp_path)]) == 2
  assert "holds no fedjax-sim run" in error(capsys)
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_overwrite_replaces_and_same_configuration_reruns(finished, capsys):
  assert cli.main(["run", *SMALL, "--output", str(finished)]) == 0  # finished, same flags
  assert cli.main(["run", *SMALL, "--client-lr", "0.1", "--overwrite", "--output",
                   str(finished)]) == 0
  config = json.loads((finished / "config.json").read_text())
  assert config["client_lr"] == 0.1 and "--overwrite" in config["argv"]
  assert sorted(os.listdir(finished / "checkpoints")) == ["2"]


def test_resume_errors(finished, tmp_path, capsys):
  assert cli.main(["run", "--resume", str(tmp_path / "none")]) == 2
  assert "no such folder" in error(capsys)
  assert cli.main(["run", "--resume", str(finished), "--rounds", "5"]) == 2
  assert "drop --rounds" in error(capsys)
  # A flag at its default value was dropped silently (--seed 0 on a run of another seed).
  assert cli.main(["run", "--resume", str(finished), "--seed", "0", "--no-progress"]) == 2
  assert "drop --seed" in error(capsys)
  assert cli.main(["run", "--resume", str(finished), "--overwrite"]) == 2
  error(capsys)
