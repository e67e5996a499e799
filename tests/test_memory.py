"""The memory planner: a line fitted to the compiled round, and the chunk that fits."""

import jax
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import memory
from conftest import ragged_clients
from fedjax_sim import data as data_lib

CLIENTS = 8  # the line is measured at chunks 2 and 4, so 8 is a prediction


@pytest.fixture(scope="module")
def setup(small_mlp):
  xs, ys = ragged_clients(sizes=(30,) * 8)
  train = data_lib.from_clients(xs, ys, num_classes=3)

  def make(chunk):
    return fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=CLIENTS,
                     client_chunk_size=chunk, batch_size=10, steps=2)

  return make, train, memory.measure_round(make, small_mlp.params, train,
                                           clients_per_round=CLIENTS)


def test_measured_line_predicts_the_compiled_round(setup, small_mlp):
  make, train, measured = setup
  assert measured.per_client_bytes > measured.model_bytes > 0
  assert measured.fixed_bytes >= measured.argument_bytes > 0
  algorithm = make(CLIENTS)
  actual, _ = memory.compiled_round_bytes(
      algorithm, algorithm.init(small_mlp.params, jax.random.key(0)), train)
  assert measured.total_bytes(CLIENTS) == pytest.approx(actual, rel=0.1)


def test_the_line_is_measured_at_two_vmapped_chunks_where_it_can_be():
  # A chunk of 1 runs without vmap: a different program, off the chunks' line.
  assert memory._line_chunks(8) == (2, 4)
  assert memory._line_chunks(6) == (2, 3)
  assert memory._line_chunks(2) == (1, 2)
  assert memory._line_chunks(7) == (1, 7)


def test_plan_picks_the_largest_fitting_divisor(setup):
  _, _, measured = setup
  assert memory.plan_client_chunk(measured, CLIENTS, measured.total_bytes(CLIENTS)) == CLIENTS
  assert memory.plan_client_chunk(measured, CLIENTS, measured.total_bytes(3)) == 2
  assert memory.plan_client_chunk(measured, CLIENTS, measured.total_bytes(1)) == 1


def test_plan_explains_when_one_client_does_not_fit(setup):
  _, _, measured = setup
  with pytest.raises(MemoryError, match="one client needs .*batch_size.*max_examples"):
    memory.plan_client_chunk(measured, CLIENTS, measured.total_bytes(1) - 1)
  with pytest.raises(MemoryError, match="fixed part alone"):
    memory.plan_client_chunk(measured, CLIENTS, measured.fixed_bytes // 2)


def test_device_budget_on_cpu_is_none_or_positive():
  budget = memory.device_budget()
  assert budget is None or budget > 0
  if budget is None:  # the documented plan_client_chunk(..., device_budget()) on CPU
    with pytest.raises(ValueError, match="needs a budget in bytes: this device reports no"):
      memory.plan_client_chunk(memory.RoundMemory(100, 10, 1, 1, 1), 4, budget)
