"""`fs.run(callbacks=...)`: host observers called between compiled chunks with the new
rows, and once at the end with the summary, also when the run stops early."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import runner
from fedjax_sim.algorithms import fedavg
from conftest import one_example_data, square_loss_fedavg, tiny_mlp, under_xla_defaults


class Recorder:
  def __init__(self):
    self.chunks, self.summaries = [], []

  def on_rounds(self, rows):
    self.chunks.append([r["round"] for r in rows])

  def on_end(self, summary):
    self.summaries.append(summary)


@pytest.fixture(scope="module")
def train():
  return one_example_data()


def test_callbacks_see_every_chunk_and_the_summary(train):
  algorithm = square_loss_fedavg(0.1)
  recorder, end_only = Recorder(), type("EndOnly", (), {"on_end": lambda self, s: None})()
  fs.run(algorithm, algorithm.init({"w": jnp.ones(())}, jax.random.key(0)), train, rounds=5,
         rounds_per_chunk=2, progress=False, callbacks=[recorder, end_only])
  assert recorder.chunks == [[1, 2], [3, 4], [5]]
  [summary] = recorder.summaries
  assert summary["status"] == "completed" and summary["rounds"] == 5


def test_callbacks_get_the_summary_of_a_run_that_stops(train):
  algorithm = square_loss_fedavg(10.0)
  recorder = Recorder()
  with pytest.raises(runner.Diverged):
    fs.run(algorithm, algorithm.init({"w": jnp.ones(())}, jax.random.key(0)), train, rounds=6,
           rounds_per_chunk=2, progress=False, callbacks=[recorder])
  # round 3 diverged with a finite loss: metrics.jsonl keeps it, and so do the callbacks
  assert recorder.chunks == [[1, 2], [3]]
  assert recorder.summaries[0]["status"] == "diverged at round 3"


def _mlp_run(ragged, rounds, rounds_per_chunk):
  apply, params = tiny_mlp()
  _, _, data = ragged
  algorithm = fedavg(apply, client_optimizer=optax.sgd(0.2), clients_per_round=3,
                     batch_size=4, epochs=1)
  calls = []
  real = runner.make_chunk

  def spy(alg, length):
    calls.append(length)
    return real(alg, length)

  state = algorithm.init(params, jax.random.key(3))
  evaluate = lambda p: {"test_w2_sum": float(jnp.sum(p["w2"]))}
  with pytest.MonkeyPatch.context() as m:
    m.setattr(runner, "make_chunk", spy)
    final, history = fs.run(algorithm, state, data, rounds=rounds,
                            rounds_per_chunk=rounds_per_chunk, evaluate=evaluate,
                            progress=False)
  return final, history, calls


@under_xla_defaults
def test_a_shorter_final_chunk_reuses_the_one_program(ragged):
  """7 rounds in chunks of 3: one program of gcd(3, 7) = 1 round called 3 + 3 + 1 times
  (no second program for the final chunk of 1); evaluations still after rounds 3, 6, 7,
  and every round equal to the bit to a run of 1-round chunks (and to chunks of 7)."""
  final, history, calls = _mlp_run(ragged, 7, 3)
  assert calls == [1]
  assert [r["round"] for r in history if "test_w2_sum" in r] == [3, 6, 7]
  one, one_history, _ = _mlp_run(ragged, 7, 1)
  whole, whole_history, whole_calls = _mlp_run(ragged, 7, 7)
  assert whole_calls == [7]
  for other, other_history in ((one, one_history), (whole, whole_history)):
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in other_history]
    for a, b in zip(jax.tree_util.tree_leaves(final.params),
                    jax.tree_util.tree_leaves(other.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunks_that_divide_the_rounds_are_one_call_each(ragged):
  _, history, calls = _mlp_run(ragged, 6, 3)
  assert calls == [3]
  assert [r["round"] for r in history if "test_w2_sum" in r] == [3, 6]


def _fedavg_run(ragged, tmp_path, **kw):
  apply, params = tiny_mlp()
  algorithm = fedavg(apply, client_optimizer=optax.sgd(0.2), clients_per_round=3,
                     batch_size=4, epochs=1)
  state = algorithm.init(params, jax.random.key(3))
  return fs.run(algorithm, state, ragged[2], rounds=2, rounds_per_chunk=2, progress=False,
                metrics_path=tmp_path / "metrics.jsonl", summary_path=tmp_path / "summary.json",
                **kw)


def _written(tmp_path):
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  return rows, json.loads((tmp_path / "summary.json").read_text())


def test_added_metrics_may_be_numpy_or_jax_values(ragged, tmp_path):
  # A float32 (np.mean of float32) or a jax scalar was no JSON: the run stopped after
  # its first chunk, with half of it written and the summary left at "running".
  _, history = _fedavg_run(
      ragged, tmp_path,
      evaluate=lambda p: {"np_metric": np.float32(1.5), "jax_metric": jnp.sum(p["w2"]),
                          "per_class": np.arange(3)},
      round_metrics=lambda r: types.MappingProxyType({"twice": jnp.int32(2 * r)}))
  rows, summary = _written(tmp_path)
  assert [r["round"] for r in rows] == [1, 2] and summary["status"] == "completed"
  assert [r["twice"] for r in rows] == [2, 4] and rows[1]["np_metric"] == 1.5
  assert rows[1]["jax_metric"] == pytest.approx(float(history[1]["jax_metric"]))
  # Arrays stay in the history, as per-client metrics do, and out of the file.
  assert "per_class" not in rows[1] and list(history[1]["per_class"]) == [0, 1, 2]


def test_an_added_metric_with_a_rounds_own_name_is_refused_and_the_rounds_kept(ragged,
                                                                               tmp_path):
  with pytest.raises(ValueError, match="'train_loss', a name the round's own metrics use"):
    _fedavg_run(ragged, tmp_path, evaluate=lambda p: {"train_loss": 0.0})
  rows, summary = _written(tmp_path)
  assert [r["round"] for r in rows] == [1, 2] and rows[1]["train_loss"] != 0.0
  assert summary["status"].startswith("failed: ValueError")
  with pytest.raises(TypeError, match="round_metrics returned 'when' = "):
    _fedavg_run(ragged, tmp_path, round_metrics=lambda r: {"when": object()})
  assert [r["round"] for r in _written(tmp_path)[0]] == [1, 2]


def test_a_run_that_fails_before_its_first_round_leaves_the_metrics_file(ragged, tmp_path,
                                                                         monkeypatch):
  (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')

  def no_program(algorithm, length):
    def call(state, data):
      raise RuntimeError("no program")
    return call

  monkeypatch.setattr(runner, "make_chunk", no_program)
  with pytest.raises(RuntimeError, match="no program"):
    _fedavg_run(ragged, tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'
