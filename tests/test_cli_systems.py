"""`fedjax-sim run` with client systems, FedBuff, the server warm start and model compute
flags: tiny runs on the embedded Synthetic task (30 clients, logistic regression)."""

import argparse
import json
import re

import jax
import numpy as np
import pytest

from fedjax_sim import cli, data as data_lib, run_dir, run_options, systems, tasks, warm_start


def rows(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, name, *flags):
  out = tmp_path / name
  code = cli.main(["run", "--output", str(out), "--no-progress", *flags])
  return code, out


def write_trace(path, speeds, latency=0.5, nbytes=2440.0):
  lines = ["examples_per_s,downlink_bytes_per_s,uplink_bytes_per_s,latency_s,availability"]
  lines += [f"{s},{nbytes},{nbytes},{latency},1" for s in speeds]
  path.write_text("\n".join(lines) + "\n")


def test_deadline_and_over_selection_from_a_trace(tmp_path, capsys):
  # Logistic regression: 610 float32 = 2,440 bytes each way, at 2,440 bytes/s: 1 s each.
  # 2 steps of 10 examples: 1 s at 20 examples/s (fast), 10 s at 2 (slow). A fast client
  # takes 0.5 + 1 + 1 + 1 = 3.5 s, a slow one 12.5 s; the deadline of 5 s drops the slow.
  trace = tmp_path / "trace.csv"
  write_trace(trace, [20.0 if i % 2 else 2.0 for i in range(30)])
  code, out = run(tmp_path, "sync", "--profiles", str(trace), "--deadline", "5",
                  "--over-selection", "2", "--steps", "2", "--batch-size", "10",
                  "--rounds", "3", "--eval-every", "3")
  assert code == 0
  got = rows(out)
  for r in got:
    sampled_fast = 12 - r["num_stragglers"]
    assert r["num_aggregated"] == min(10, sampled_fast) and r["num_dropped"] == 0
    # The round ends at the 10th report, or waits out the deadline if fewer come.
    assert r["round_time_s"] == pytest.approx(3.5 if sampled_fast >= 10 else 5.0)
  np.testing.assert_allclose([r["sim_time_s"] for r in got],
                             np.cumsum([r["round_time_s"] for r in got]), rtol=1e-6)
  printed = capsys.readouterr().out
  assert f"simulated time {got[-1]['sim_time_s']:.2f} s" in printed
  assert "client profiles (" in printed
  config = json.loads((out / "config.json").read_text())
  assert config["deadline"] == 5.0 and config["profiles_summary"]["latency_s"]["median"] == 0.5


def test_resuming_with_a_changed_profiles_file_is_refused(tmp_path, capsys):
  # The rounds to come read the new file: its rounds disagreed with config.json's hash.
  trace = tmp_path / "trace.csv"
  write_trace(trace, [20.0] * 30)
  code, out = run(tmp_path, "sync", "--profiles", str(trace), "--rounds", "2", "--steps", "1")
  assert code == 0
  write_trace(trace, [2.0] * 30)
  capsys.readouterr()
  assert cli.main(["run", "--resume", str(out)]) == 2
  assert "the input file behind --profiles has changed since the run started" in (
      capsys.readouterr().err)


def test_resuming_from_another_folder_reads_relative_inputs_where_the_run_started(
    tmp_path, monkeypatch, capsys):
  # --profiles trace.csv was read from the folder the run started in; resumed from
  # another folder it was looked up there and refused as a changed file.
  monkeypatch.chdir(tmp_path)
  write_trace(tmp_path / "trace.csv", [20.0] * 30)
  assert cli.main(["run", "--output", "out", "--no-progress", "--profiles", "trace.csv",
                   "--rounds", "2", "--steps", "1"]) == 0
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  capsys.readouterr()
  assert cli.main(["run", "--resume", "../out", "--no-progress"]) == 0
  assert str(tmp_path / "trace.csv") in capsys.readouterr().out
  # A project moved away from the folder it started in: the paths as given, from here.
  config_path = tmp_path / "out" / "config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "cwd": str(tmp_path / "moved-away")}))
  monkeypatch.chdir(tmp_path)
  assert cli.main(["run", "--resume", "out", "--no-progress"]) == 0
  # A URL is no relative path: gs://... stays as given.
  config_path.write_text(json.dumps(
      {**config, "argv": config["argv"] + ["--data-dir", "gs://bucket/tfds"]}))
  parser = cli.build_parser()
  argv = ["run", "--resume", "out"]
  resumed = run_dir.resume_args(parser, parser.parse_args(argv), argv)
  assert resumed.data_dir == "gs://bucket/tfds"
  assert resumed.profiles == str(tmp_path / "trace.csv")
  (tmp_path / "trace.csv").unlink()
  monkeypatch.chdir(tmp_path / "elsewhere")
  assert cli.main(["run", "--resume", "../out", "--no-progress"]) == 2
  assert "input file is missing: --profiles " in capsys.readouterr().err


def test_drawn_profiles_with_fedprox_partial_work(tmp_path):
  code, out = run(tmp_path, "prox", "--algorithm", "fedprox", "--profiles-seed", "1",
                  "--speed-median", "300", "--speed-sigma", "0.3", "--stragglers", "partial",
                  "--straggler-fraction", "0.5", "--dropout", "0.1", "--rounds", "2",
                  "--eval-every", "2")
  assert code == 0
  got = rows(out)
  assert all(r["round_time_s"] > 0 for r in got)
  assert got[1]["sim_time_s"] == pytest.approx(got[0]["round_time_s"] + got[1]["round_time_s"])
  # Without a deadline a protocol straggler's partial work is still aggregated.
  assert all(r["num_aggregated"] == 10 - r["num_dropped"] for r in got)
  drawn = systems.describe(systems.sample_profiles(30, seed=1,
                                                   examples_per_s=("lognormal", 300.0, 0.3)))
  config = json.loads((out / "config.json").read_text())
  assert config["profiles_summary"] == drawn
  summary = json.loads((out / "summary.json").read_text())
  assert summary["final"]["sim_time_s"] == pytest.approx(got[-1]["sim_time_s"])


def test_fedbuff_from_the_command_line(tmp_path, capsys):
  code, out = run(tmp_path, "buff", "--algorithm", "fedbuff", "--clients-per-round", "3",
                  "--concurrency", "6", "--staleness", "constant", "--profiles-seed", "4",
                  "--rounds", "3", "--eval-every", "3")
  assert code == 0
  got = rows(out)
  times = [r["sim_time_s"] for r in got]
  assert times == sorted(times) and times[0] > 0
  assert all("staleness_mean" in r and r["staleness_max"] >= 0 for r in got)
  assert "simulated time" in capsys.readouterr().out
  assert out.name == "buff" and json.loads((out / "config.json").read_text())["concurrency"] == 6


def test_warm_start_save_and_init_params(tmp_path, capsys):
  saved = tmp_path / "ckpt" / "warm.npz"
  code, out = run(tmp_path, "warm", "--warm-start-steps", "30", "--server-examples", "60",
                  "--warm-start-lr", "0.1", "--mixed-precision", "--save-params", str(saved),
                  "--rounds", "1", "--eval-every", "1")
  assert code == 0
  summary = json.loads((out / "summary.json").read_text())
  warm = summary["warm_start"]
  assert warm["server_steps"] == 30 and warm["server_examples"] == 60
  assert 0.0 <= warm["test_accuracy"] <= 1.0 and summary["saved_params"] == str(saved)
  assert "warm start: 30 steps on 60 server examples" in capsys.readouterr().out
  # The clients train on what is left: 4,308 training examples minus the server's 60.
  assert rows(out)[0]["num_examples"] < 4308
  like = tasks.load_task("synthetic").make_model("logreg", 0).params
  first = warm_start.load_params(saved, like)
  assert max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(first)) > 0.01  # not 0-init
  # Starting from it with a negligible learning rate ends where it started.
  again = tmp_path / "again.npz"
  code, _ = run(tmp_path, "init", "--init-params", str(saved), "--client-lr", "1e-9",
                "--save-params", str(again), "--rounds", "1", "--eval-every", "1")
  assert code == 0
  for a, b in zip(jax.tree_util.tree_leaves(warm_start.load_params(again, like)),
                  jax.tree_util.tree_leaves(first)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_server_examples_are_held_out_of_the_clients():
  rng = np.random.default_rng(0)
  sizes = [1, 4, 7, 2]
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 5, n).astype(np.int32) for n in sizes]
  data = data_lib.from_clients(xs, ys)
  left, sx, sy = run_options.hold_out_server_examples(data, 6, seed=3)
  counts = np.asarray(left.counts)
  assert counts.sum() == sum(sizes) - 6 and counts.min() >= 1 and len(sx) == len(sy) == 6
  kept = np.concatenate([left.client(i)[0] for i in range(4)])
  # Every original example is either kept by its client or the server's, never both.
  everything = sorted(map(tuple, np.concatenate(xs).tolist()))
  assert sorted(map(tuple, np.concatenate([kept, sx]).tolist())) == everything
  assert all(left.client(i)[0][0].tolist() == xs[i][0].tolist() for i in range(4))
  again = run_options.hold_out_server_examples(data, 6, seed=3)
  np.testing.assert_array_equal(again[1], sx)
  with pytest.raises(ValueError, match="at most 10 can be held out"):
    run_options.hold_out_server_examples(data, 11, seed=3)


def test_conv_impl_and_mixed_precision_build_the_cnn():
  x = np.zeros((2, 3, 8, 8, 1), np.float32)
  train = data_lib.FederatedData(x, np.zeros((2, 3), np.int32), np.array([3, 3]))
  task = tasks.Task(train, None, None, 10, tasks._image_model((8, 8, 1), 10), "cnn")

  def jaxpr(**flags):
    args = argparse.Namespace(**{"model": None, "seed": 0, "conv_impl": None,
                                 "mixed_precision": False, **flags})
    model = run_options.make_model(task, args)
    return str(jax.make_jaxpr(model.apply)(model.params, x[0]))

  # 'sequential' is a custom VJP around lax convolutions; 'lax' is XLA's own autodiff
  # (the bias add and the pooling have custom VJPs of their own in both).
  sequential = jaxpr(conv_impl="sequential")
  assert "name=_sequential_conv" in sequential and "bf16[" not in sequential
  lax = jaxpr(conv_impl="lax", mixed_precision=True)
  assert "name=_sequential_conv" not in lax and "conv_general_dilated" in lax
  assert "bf16[" in lax
  with pytest.raises(ValueError, match="--conv-impl applies to the CNN"):
    jaxpr(conv_impl="lax", model="mlp")


def test_profiles_file_errors(tmp_path):
  short = tmp_path / "short.csv"
  write_trace(short, [10.0, 20.0, 30.0])
  with pytest.raises(ValueError, match=r"--profiles .*short.csv: examples_per_s has shape \(3,\)"):
    run_options.load_profiles(str(short), 30)
  typo = tmp_path / "typo.csv"
  typo.write_text("examples_per_s,downlink_bytes_per_s,uplink_bytes_per_s,availabilty\n1,2,3,1\n")
  with pytest.raises(ValueError, match=r"unknown \['availabilty'\]"):
    run_options.load_profiles(str(typo), 1)
  bad = tmp_path / "bad.npz"
  np.savez(bad, examples_per_s=np.array([1.0, -1.0]), downlink_bytes_per_s=np.ones(2),
           uplink_bytes_per_s=np.ones(2))
  with pytest.raises(ValueError, match="examples_per_s must be > 0 and finite: client 1"):
    run_options.load_profiles(str(bad), 2)
  good = tmp_path / "good.npz"
  np.savez(good, examples_per_s=np.array([1.0, 2.0]), downlink_bytes_per_s=np.ones(2),
           uplink_bytes_per_s=np.ones(2))
  profiles = run_options.load_profiles(str(good), 2)
  assert profiles.latency_s.tolist() == [0, 0] and profiles.availability.tolist() == [1, 1]


@pytest.mark.parametrize("flags,match", [
    (["--deadline", "0"], "--deadline must be positive, got 0.0"),
    (["--dropout", "1"], r"--dropout must lie in \[0, 1\), got 1.0"),
    (["--straggler-fraction", "1.5"], r"--straggler-fraction must lie in \[0, 1\]"),
    (["--over-selection", "25"], r"--over-selection 25: --clients-per-round \+ --over-selection "
                                 r"= 10 \+ 25 = 35 but the data has only 30 clients"),
    (["--algorithm", "fedbuff", "--concurrency", "5"],
     "--concurrency 5 must be at least --clients-per-round 10"),
    (["--algorithm", "fedbuff", "--concurrency", "40"],
     "--concurrency 40 but the data has only 30 clients"),
    (["--concurrency", "12"], "--concurrency: applies to --algorithm fedbuff, not fedavg"),
    (["--algorithm", "fedbuff", "--stragglers", "partial"],
     "--stragglers: .* fedbuff is asynchronous and takes only --profiles"),
    (["--algorithm", "fedbuff", "--deadline", "5"], "fedbuff is asynchronous"),
    (["--deadline", "5", "--aggregator", "median"],
     "--deadline: .*reducer must be the weighted mean"),
    (["--profiles", "missing.csv"], "--profiles: no such file 'missing.csv'"),
    (["--init-params", "missing.npz"], "--init-params: no such file 'missing.npz'"),
    (["--warm-start-steps", "5"], "--warm-start-steps needs --server-examples"),
    (["--server-examples", "10"], "give --warm-start-steps too"),
    (["--warm-start-steps", "1", "--server-examples", "5000"],
     "--server-examples 5000: .* at most 4278 can be held out"),
    (["--conv-impl", "lax"], "--conv-impl applies to the CNN \\(--model cnn\\); the model is "
                             "'logreg'"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, flags, match):
  code = cli.main(["run", "--rounds", "2", "--output", str(tmp_path / "x"), "--no-progress",
                   *flags])
  assert code == 2
  assert re.search(match, capsys.readouterr().err)
  assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_warm_start_uses_the_client_momentum(tmp_path):
  # The warm start built its optimizer without --client-momentum: always 0.9.
  def warm(*flags):
    code, out = run(tmp_path, "w" + "_".join(flags), "--warm-start-steps", "10",
                    "--server-examples", "60", "--rounds", "1", "--eval-every", "1", *flags)
    assert code == 0
    return json.loads((out / "summary.json").read_text())["warm_start"]["server_train_loss"]

  sgd = warm()
  assert warm("--client-optimizer", "momentum", "--client-momentum", "0") == pytest.approx(
      sgd, rel=1e-6)
  assert warm("--client-optimizer", "momentum", "--client-momentum", "0.5") != pytest.approx(
      sgd, rel=1e-3)


def test_init_params_of_another_model_is_an_error(tmp_path, capsys):
  other = tmp_path / "other.npz"
  warm_start.save_params(other, {"w": np.zeros(3, np.float32)})
  assert cli.main(["run", "--init-params", str(other), "--no-progress",
                   "--output", str(tmp_path / "x")]) == 2
  assert "--init-params: " in capsys.readouterr().err


def test_a_changed_init_params_file_is_another_run(tmp_path, capsys):
  # The folder's identity hashed --init-params' path alone: a new file behind the same
  # path silently replaced the finished run of the old one.
  like = tasks.load_task("synthetic").make_model("logreg", 0).params
  init = tmp_path / "init.npz"
  warm_start.save_params(init, jax.tree_util.tree_map(lambda a: np.full_like(a, 0.01), like))
  flags = ["--init-params", str(init), "--rounds", "1", "--eval-every", "1"]
  assert run(tmp_path, "a", *flags)[0] == 0
  first = (tmp_path / "a" / "summary.json").read_text()
  warm_start.save_params(init, jax.tree_util.tree_map(lambda a: np.full_like(a, -0.02), like))
  capsys.readouterr()
  assert run(tmp_path, "a", *flags)[0] == 2
  assert "input file behind --init-params has changed" in capsys.readouterr().err
  assert (tmp_path / "a" / "summary.json").read_text() == first
  assert run(tmp_path, "a", *flags, "--overwrite")[0] == 0
  # the default folder name follows the file's contents too
  parser = cli.build_parser()
  names = []
  for value in (0.01, -0.02):
    warm_start.save_params(init, jax.tree_util.tree_map(lambda a: np.full_like(a, value), like))
    names.append(cli.run_dir.default_output(parser.parse_args(["run", *flags])))
  assert names[0] != names[1]
