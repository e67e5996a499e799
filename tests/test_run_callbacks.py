"""`fs.run(callbacks=...)`: host observers called between compiled chunks with the new
rows, and once at the end with the summary, also when the run stops early."""

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
