"""Memory planning: bytes per client of a round, and the client chunk size that fits.

A round holds every client of a chunk at once (its model copy, gradients, optimizer
state, activations of a minibatch, its padded data), so its memory grows linearly
with `client_chunk_size`, on top of a fixed part (the training data on the device,
the server state, the metrics). Rather than model XLA's buffer assignment by hand,
`measure_round` asks the compiler: it compiles the round (not run) at two chunk sizes
that divide clients_per_round and reads `compiled.memory_analysis()`, so activations,
fusion and rematerialization are counted as they really are. The line through the two
points is the plan:

    memory = fs.memory.measure_round(
        lambda chunk: fs.fedavg(..., clients_per_round=1000, client_chunk_size=chunk),
        params, train, clients_per_round=1000)
    chunk = fs.memory.plan_client_chunk(memory, 1000, fs.memory.device_budget())

With the clients sharded over D devices (`client_sharding=`) the analysis is of one
device, which holds ceil(chunk / D) clients of a chunk: the line is measured at chunks
that are multiples of D, and a chunk below a multiple is planned as the multiple (GSPMD
pads it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.data import FederatedData

MB = 2**20


@dataclasses.dataclass(frozen=True)
class RoundMemory:
  """Compiled memory of one round as `fixed_bytes + chunk * per_client_bytes`.

  Attributes:
    fixed_bytes: arguments (the data on the device, the state), outputs and the
      temporaries that do not grow with the chunk.
    per_client_bytes: temporaries per client trained at once.
    model_bytes: one copy of the parameters (a part of per_client_bytes).
    data_bytes: one client's padded data (gathered per client; also a part).
    argument_bytes: the round's inputs, of which the training data.
    devices: devices the clients are sharded over (bytes are of one of them).
  """

  fixed_bytes: int
  per_client_bytes: int
  model_bytes: int
  data_bytes: int
  argument_bytes: int
  devices: int = 1

  def total_bytes(self, chunk: int) -> int:
    """Predicted bytes (per device) of a round training `chunk` clients at a time."""
    per_device = math.ceil(chunk / self.devices)  # GSPMD pads a chunk to a multiple
    return self.fixed_bytes + per_device * self.devices * self.per_client_bytes


def _tree_bytes(tree: Any) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def compiled_round_bytes(algorithm: FederatedAlgorithm, state: Any,
                         data: FederatedData) -> tuple[int, int]:
  """(total, argument) bytes of one compiled round, from XLA's memory analysis.

  Compiles without running. Total counts arguments, outputs and temporaries,
  less outputs that alias (donated) arguments.
  """
  return _analysis_bytes(jax.jit(algorithm.round).lower(state, data).compile())


def _analysis_bytes(compiled) -> tuple[int, int]:
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise NotImplementedError(f"the {jax.default_backend()} backend reports no memory analysis")
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return int(total), int(analysis.argument_size_in_bytes)


def _line_chunks(clients_per_round: int, devices: int = 1) -> tuple[int, int]:
  """The two chunk sizes the line is measured at: the two smallest divisors of
  clients_per_round above 1 where it has two, else 1 and clients_per_round; over several
  devices the two smallest divisors that are multiples of `devices` (a smaller chunk
  holds as many clients per device, padded).

  Both vmapped where possible: a chunk of 1 runs without vmap (`tree.vmap_clients`),
  a different program whose buffers need not lie on the chunks' line (for the test's
  small MLP, a line through 1 and 2 put the round of 8 2.2% over XLA's analysis, one
  through 2 and 4 1.5%; with an extra model-sized temporary in the round, 45% and 4%).
  """
  if devices > 1:
    multiples = [d for d in range(devices, clients_per_round + 1, devices)
                 if clients_per_round % d == 0]
    if len(multiples) < 2:
      raise ValueError(
          f"measure_round over {devices} devices needs clients_per_round with two divisors "
          f"that are multiples of {devices}, to measure the memory of a client per device; "
          f"{clients_per_round} has {multiples or 'none'}")
    return multiples[0], multiples[1]
  divisors = [d for d in range(2, clients_per_round + 1) if clients_per_round % d == 0]
  return (divisors[0], divisors[1]) if len(divisors) > 1 else (1, divisors[0])


def measure_round(make_algorithm: Callable[[int], FederatedAlgorithm], params: Any,
                  data: FederatedData, *, clients_per_round: int,
                  num_clients: int | None = None) -> RoundMemory:
  """Measures the memory of a round as a line in the client chunk size.

  Args:
    make_algorithm: `client_chunk_size -> FederatedAlgorithm` (everything else fixed).
    params: the model parameters.
    data: the training data the round will see.
    clients_per_round: clients per round of the algorithm.
    num_clients: passed to `init` for algorithms with per-client state.

  Returns:
    A RoundMemory. Two compilations, at the chunk sizes `_line_chunks` picks (one
    when clients_per_round is 1).
  """
  key = jax.random.key(0)
  init_args = () if num_clients is None else (num_clients,)

  def measure(chunk):
    """(total, argument) bytes of one device, and the number of devices."""
    algorithm = make_algorithm(chunk)
    state = jax.eval_shape(lambda: algorithm.init(params, key, *init_args))
    compiled = jax.jit(algorithm.round).lower(state, data).compile()
    devices = {d for s in jax.tree_util.tree_leaves(compiled.input_shardings)
               for d in s.device_set}
    return _analysis_bytes(compiled), max(1, len(devices))

  devices = 1
  if clients_per_round > 1:
    small, large = _line_chunks(clients_per_round)
    (at_small, arguments), devices = measure(small)
    if devices > 1:  # the clients are sharded: measure at multiples of the devices
      first = small
      small, large = _line_chunks(clients_per_round, devices)
      if small != first:  # (2 and 4 on 2 devices are already)
        (at_small, arguments), _ = measure(small)
    per_client = max(0, (measure(large)[0][0] - at_small) // (large - small))
  else:
    small, ((at_small, arguments), _) = 1, measure(1)
    per_client = at_small - arguments  # all temporaries and outputs: an upper bound
  data_bytes = (data.x[0].size * data.x.dtype.itemsize + data.y[0].size * data.y.dtype.itemsize)
  return RoundMemory(fixed_bytes=at_small - small * per_client, per_client_bytes=per_client,
                     model_bytes=_tree_bytes(params), data_bytes=int(data_bytes),
                     argument_bytes=arguments, devices=devices)


def device_budget(device: jax.Device | None = None, fraction: float = 0.9) -> int | None:
  """`fraction` of the device's memory limit, or None where it reports none (CPU)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"] * fraction)


def plan_client_chunk(memory: RoundMemory, clients_per_round: int, budget_bytes: int) -> int:
  """The largest divisor of clients_per_round whose round fits `budget_bytes`.

  Args:
    memory: from `measure_round`.
    clients_per_round: clients per round.
    budget_bytes: device memory available to the round.

  Returns:
    The client chunk size to pass as `client_chunk_size`.

  Raises:
    ValueError: no budget (`device_budget()` is None where the device reports no limit,
      as on CPU): pass one.
    MemoryError: when even one client at a time does not fit, saying what would help.
  """
  if budget_bytes is None:
    raise ValueError("plan_client_chunk needs a budget in bytes: this device reports no memory "
                     "limit (device_budget() is None, as on CPU); pass the bytes to plan for")
  if (not isinstance(clients_per_round, (int, np.integer)) or isinstance(clients_per_round, bool)
      or clients_per_round <= 0):  # else no chunk fits, and the MemoryError below misleads
    raise ValueError(f"plan_client_chunk: clients_per_round must be a positive integer, got "
                     f"{clients_per_round!r}")
  fitting = [c for c in range(1, clients_per_round + 1)
             if clients_per_round % c == 0 and memory.total_bytes(c) <= budget_bytes]
  # Sharded, only chunks of whole devices are predicted exactly (measure_round measures
  # at multiples of them): a chunk of 6 on 4 devices compiled 7.5% above its prediction.
  whole = [c for c in fitting if c % memory.devices == 0]
  if whole or fitting:
    return max(whole or fitting)
  per_device = memory.devices > 1
  need = memory.total_bytes(1)
  if memory.fixed_bytes > budget_bytes:
    what = (f"the fixed part alone, {memory.fixed_bytes / MB:.1f} MB (of which the round's "
            f"inputs, the training data on the device and the server state, "
            f"{memory.argument_bytes / MB:.1f} MB), exceeds the budget")
  else:
    # Sharded, per_client_bytes is a client's share of a device's bytes: a client on
    # each device costs every device `devices` times it.
    one = "one client per device needs" if per_device else "one client needs"
    what = (f"{one} {memory.per_client_bytes * memory.devices / MB:.1f} MB (model copy "
            f"{memory.model_bytes / MB:.1f} MB, padded data {memory.data_bytes / MB:.1f} MB, the rest "
            f"gradients, optimizer state and activations) beside the fixed "
            f"{memory.fixed_bytes / MB:.1f} MB")
  at_once = (f"one client per device ({memory.devices} at a time)" if per_device
             else "one client at a time")
  raise MemoryError(
      f"a round with {at_once} needs {need / MB:.1f} MB per device but the budget is "
      f"{budget_bytes / MB:.1f} MB: {what}. What would help: a smaller batch_size "
      f"(activations grow with it), a cap on padded examples (from_clients(max_examples=...)), "
      f"a smaller model or bfloat16 parameters, "
      f"{'more devices' if per_device else 'sharding the clients over several devices'}, "
      f"or a device with more memory.")
