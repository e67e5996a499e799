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


class Recorder:
  def __init__(self):
    self.chunks, self.summaries = [], []

  def on_rounds(self, rows):
    self.chunks.append([r["round"] for r in rows])

  def on_end(self, summary):
    self.summaries.append(summary)


def _algorithm(lr):
  # loss w^2, one SGD step per round: w <- w (1 - 2 lr); lr 10 diverges at round 3.
  return fedavg(lambda p, x: p["w"] * x[:, 0], loss=lambda p, x, y: p["w"] ** 2 + 0.0 * jnp.sum(x),
                client_optimizer=optax.sgd(lr), clients_per_round=1, batch_size=1, steps=1)


@pytest.fixture(scope="module")
def train():
  return fs.from_clients([np.ones((1, 1), np.float32)], [np.zeros(1, int)])


def test_callbacks_see_every_chunk_and_the_summary(train):
  algorithm = _algorithm(0.1)
  recorder, end_only = Recorder(), type("EndOnly", (), {"on_end": lambda self, s: None})()
  fs.run(algorithm, algorithm.init({"w": jnp.ones(())}, jax.random.key(0)), train, rounds=5,
         rounds_per_chunk=2, progress=False, callbacks=[recorder, end_only])
  assert recorder.chunks == [[1, 2], [3, 4], [5]]
  [summary] = recorder.summaries
  assert summary["status"] == "completed" and summary["rounds"] == 5


def test_callbacks_get_the_summary_of_a_run_that_stops(train):
  algorithm = _algorithm(10.0)
  recorder = Recorder()
  with pytest.raises(runner.Diverged):
    fs.run(algorithm, algorithm.init({"w": jnp.ones(())}, jax.random.key(0)), train, rounds=6,
           rounds_per_chunk=2, progress=False, callbacks=[recorder])
  assert recorder.chunks == [[1, 2]]
  assert recorder.summaries[0]["status"] == "diverged at round 3"
