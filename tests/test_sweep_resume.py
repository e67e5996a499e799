"""Sweeps checkpoint each static group's vmapped states at chunk boundaries: a sweep
stopped by SIGINT and resumed equals the uninterrupted sweep (rows, curves, evaluations,
final parameters bit for bit), from Python and from `fedjax-sim sweep --resume`."""

import importlib
import json
import os
import signal

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli
sweep_lib = importlib.import_module("fedjax_sim.sweep")  # the package's `sweep` is the function


def stop_on_call(monkeypatch, n):
  """SIGINT, as Ctrl-C would, during the n-th compiled sweep chunk."""
  make, calls = sweep_lib.make_sweep_chunk, [0]

  def make_stopping(*args, **kwargs):
    chunk = make(*args, **kwargs)

    def run(*a):
      calls[0] += 1
      if calls[0] == n:
        signal.raise_signal(signal.SIGINT)
      return chunk(*a)
    return run
  monkeypatch.setattr(sweep_lib, "make_sweep_chunk", make_stopping)


def test_python_sweep_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
  task = fs.load_task("synthetic", seed=0)
  model = task.make_model("logreg", 0)
  make = lambda hp: fs.fedavg(model.apply, client_optimizer=optax.sgd(hp["client_lr"]),
                              clients_per_round=hp["clients_per_round"], batch_size=10,
                              steps=2)
  kw = dict(grid={"client_lr": [0.01, 0.1]}, seeds=[0], static={"clients_per_round": [3, 5]},
            rounds=6, rounds_per_chunk=2,
            evaluate=fs.make_evaluator(model.apply, test=task.test))
  full = fs.sweep(make, model.params, task.train, **kw)
  ckpt = tmp_path / "ckpt"
  with monkeypatch.context() as m:
    stop_on_call(m, 5)  # the second group's second chunk: the first group is finished
    with pytest.raises(fs.Interrupted) as info:
      fs.sweep(make, model.params, task.train, checkpoint_dir=ckpt, checkpoint_every=0, **kw)
  assert info.value.round == 4
  assert sorted(os.listdir(ckpt / "group0")) == ["6"] and os.listdir(ckpt / "group1") == ["4"]
  resumed = fs.sweep(make, model.params, task.train, checkpoint_dir=ckpt, resume=True, **kw)
  assert resumed.rows == full.rows
  for name in full.curves:
    np.testing.assert_array_equal(resumed.curves[name], full.curves[name])
  for name in full.eval_curves:
    np.testing.assert_array_equal(resumed.eval_curves[name], full.eval_curves[name])
  np.testing.assert_array_equal(resumed.eval_rounds, full.eval_rounds)
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(full.params)):
    np.testing.assert_array_equal(a, b)
  # Checkpoints of other grid values (or seeds) are refused: their rows were relabelled.
  with pytest.raises(ValueError, match="written by a sweep of other grid values or seeds"):
    fs.sweep(make, model.params, task.train, checkpoint_dir=ckpt, resume=True,
             **{**kw, "grid": {"client_lr": [0.01, 0.2]}})


def test_cli_sweep_resume(tmp_path, monkeypatch, capsys):
  config = tmp_path / "sweep.json"
  config.write_text(json.dumps({
      "task": "synthetic", "settings": {"rounds": 4, "eval_every": 2, "clients_per_round": 3,
                                        "steps": 2, "batch_size": 10},
      "grid": {"client_lr": [0.02, 0.05]}, "seeds": [0], "plot": False}))
  full, cut = tmp_path / "full", tmp_path / "cut"
  assert cli.main(["sweep", "--config", str(config), "--output", str(full)]) == 0
  with monkeypatch.context() as m:
    stop_on_call(m, 2)
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(config), "--output", str(cut)]) == 130
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "--resume" in err, err
  # Without --resume, the unfinished sweep is not silently started over.
  assert cli.main(["sweep", "--config", str(config), "--output", str(cut)]) == 2
  assert "unfinished sweep" in capsys.readouterr().err
  # a plot is not part of the results: --plot may differ on resume
  assert cli.main(["sweep", "--config", str(config), "--output", str(cut), "--resume",
                   "--plot", "test_accuracy"]) == 0
  assert (cut / "test_accuracy.png").exists()
  with np.load(full / "curves.npz") as a, np.load(cut / "curves.npz") as b:
    assert a.files == b.files
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name])
  assert (full / "results.csv").read_text() == (cut / "results.csv").read_text()
  assert not (cut / "checkpoints").exists()  # removed once the results are written
