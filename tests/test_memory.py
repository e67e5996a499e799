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
  # No clients: a ValueError, not a MemoryError saying a round that fits does not.
  for bad in (0, -4):
    with pytest.raises(ValueError, match="clients_per_round must be a positive integer"):
      memory.plan_client_chunk(measured, bad, measured.total_bytes(CLIENTS))


def test_plan_explains_when_one_client_does_not_fit(setup):
  _, _, measured = setup
  with pytest.raises(MemoryError, match="one client needs .*batch_size.*max_examples"):
    memory.plan_client_chunk(measured, CLIENTS, measured.total_bytes(1) - 1)
  with pytest.raises(MemoryError, match="fixed part alone"):
    memory.plan_client_chunk(measured, CLIENTS, measured.fixed_bytes // 2)


def test_a_sharded_plan_keeps_to_chunks_of_whole_devices_and_says_per_device():
  # 4 devices, 12 clients: chunk 6 (predicted as 8, measured 7.5% above) fit the budget
  # by the line but not compiled; only multiples of 4 are predicted exactly.
  mb = memory.MB
  sharded = memory.RoundMemory(fixed_bytes=10 * mb, per_client_bytes=mb, model_bytes=mb // 2,
                               data_bytes=mb // 4, argument_bytes=5 * mb, devices=4)
  assert memory.plan_client_chunk(sharded, 12, sharded.total_bytes(8)) == 4
  assert memory.plan_client_chunk(sharded, 12, sharded.total_bytes(12)) == 12
  # Chunks below a device are the only ones left: they are still tried.
  assert memory.plan_client_chunk(sharded, 2, sharded.total_bytes(2)) == 2
  # One client more on each device costs each device 4 x 1 MB: the message said 1 MB.
  with pytest.raises(MemoryError, match="one client per device \\(4 at a time\\) needs "
                                        "14.0 MB per device.*one client per device needs "
                                        "4.0 MB.*more devices"):
    memory.plan_client_chunk(sharded, 12, 12 * mb)


def test_device_budget_on_cpu_is_none_or_positive():
  budget = memory.device_budget()
  assert budget is None or budget > 0
  if budget is None:  # the documented plan_client_chunk(..., device_budget()) on CPU
    with pytest.raises(ValueError, match="needs a budget in bytes: this device reports no"):
      memory.plan_client_chunk(memory.RoundMemory(100, 10, 1, 1, 1), 4, budget)
