"""`evaluate.prepare`: `fs.run` compiles the evaluation in a thread while the round's
program compiles, and waits for it before the first evaluation."""

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import runner
from conftest import one_example_data as _train, square_loss_fedavg


def _algorithm():
  return square_loss_fedavg(0.1)  # w <- 0.8 w


def test_run_prepares_the_evaluation_in_a_thread_and_waits_for_it():
  events = []

  def evaluate(params):
    events.append(("evaluate", float(params["w"])))
    return {"w": float(params["w"])}

  def prepare(shapes):
    events.append(("prepare", threading.current_thread() is threading.main_thread(),
                   jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)))
    time.sleep(1.0)  # longer than the round's compile: the run must wait for it
    events.append(("prepared",))

  evaluate.prepare = prepare
  algorithm = _algorithm()
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  _, history = fs.run(algorithm, state, _train(), rounds=2, rounds_per_chunk=1,
                      evaluate=evaluate, progress=False)
  assert events[0] == ("prepare", False, {"w": ((), jnp.dtype(jnp.float32))})
  assert [e[0] for e in events] == ["prepare", "prepared", "evaluate", "evaluate"]
  np.testing.assert_allclose([r["w"] for r in history], [0.8, 0.64], rtol=1e-6)


def test_a_failing_prepare_leaves_the_run_as_it_was():
  def evaluate(params):
    return {"w": float(params["w"])}

  def prepare(shapes):
    raise RuntimeError("a preparation that fails")

  evaluate.prepare = prepare
  algorithm = _algorithm()
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  unhandled, hook = [], threading.excepthook
  threading.excepthook = lambda args: unhandled.append(args.exc_type)
  try:
    _, history = fs.run(algorithm, state, _train(), rounds=2, rounds_per_chunk=1,
                        evaluate=evaluate, progress=False)
  finally:
    threading.excepthook = hook
  assert unhandled == []  # no traceback printed from the thread
  np.testing.assert_allclose([r["w"] for r in history], [0.8, 0.64], rtol=1e-6)


def test_a_prepared_evaluator_does_not_compile_when_it_evaluates(count_compiles):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
  apply = lambda p, x: x @ p["w"]
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  client_test = fs.from_clients([x[:30], x[30:]], [y[:30], y[30:]], num_classes=2)
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)

  prepared = fs.make_evaluator(apply, test=(x, y), client_test=client_test, batch_size=16)
  prepared.prepare(shapes)
  before = count_compiles()
  prepared_metrics = prepared(params)
  assert count_compiles() == before

  unprepared = fs.make_evaluator(apply, test=(x, y), client_test=client_test, batch_size=16)
  before = count_compiles()
  assert unprepared(params) == prepared_metrics
  assert count_compiles() >= before + 2  # its central and per-client programs


def test_run_compiles_the_evaluation_once_off_the_main_thread(caplog):
  x = np.ones((4, 1), np.float32)
  evaluate = fs.make_evaluator(lambda p, x: jnp.concatenate([p["w"] * x, -p["w"] * x], 1),
                               test=(x, np.zeros(4, int)))
  algorithm = _algorithm()
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  caplog.clear()
  jax.config.update("jax_log_compiles", True)  # for every thread: the context is per thread
  try:
    with caplog.at_level(logging.WARNING):
      fs.run(algorithm, state, _train(), rounds=2, rounds_per_chunk=1, evaluate=evaluate,
             progress=False)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiled = [r for r in caplog.records if "Compiling" in r.getMessage()]
  central = [r.threadName != "MainThread" for r in compiled if "central" in r.getMessage()]
  assert central == [True]
  # The round's program compiled ahead of its first call, which found it compiled.
  assert len([r for r in compiled if "jit(chunk)" in r.getMessage()]) == 1


def test_a_run_that_stops_before_evaluating_waits_for_the_preparation():
  finished = []

  def evaluate(params):
    return {}

  def prepare(shapes):
    time.sleep(1.0)
    finished.append(True)

  evaluate.prepare = prepare
  algorithm = square_loss_fedavg(10.0)  # diverged in the first chunk, before evaluating
  state = algorithm.init({"w": jnp.ones(())}, jax.random.key(0))
  with pytest.raises(runner.Diverged):
    fs.run(algorithm, state, _train(), rounds=4, rounds_per_chunk=4, evaluate=evaluate,
           progress=False)
  assert finished == [True]


def test_make_evaluator_refuses_a_bad_batch_size_and_a_test_set_without_targets():
  apply = lambda p, x: x
  x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
  for bad in (0, -2, 2.5):  # 0 was a ZeroDivisionError, -2 numpy's negative dimensions
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad}"):
      fs.make_evaluator(apply, test=(x, y), batch_size=bad)
  # Per-token labels all IGNORE_LABEL: the loss and accuracy were 0 / 0, NaN.
  tokens = np.full((4, 5), fs.IGNORE_LABEL, np.int32)
  with pytest.raises(ValueError, match="the test set has no labels to score"):
    fs.make_evaluator(apply, test=(np.zeros((4, 5), np.int32), tokens))
  tokens[2, 3] = 1
  fs.make_evaluator(apply, test=(np.zeros((4, 5), np.int32), tokens))  # one target is enough
