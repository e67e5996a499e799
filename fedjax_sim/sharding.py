"""Many devices: a mesh over the clients (or the sweep's configurations).

One round on several devices is the same program with its client axis split:
`fedavg(..., client_sharding=client_sharding(mesh))` constrains the sampled clients'
ids and results to the mesh axis, so each device trains its share of the clients
and the weighted mean over clients compiles to a cross-device all-reduce. State and
data are replicated on the mesh (`replicate`); results equal the one-device ones up
to the order of floating-point additions. `fs.sweep(..., mesh=mesh)` splits the
configuration axis instead (configurations never talk to each other).

Multi-host runs use the same code after `jax.distributed.initialize()`: `jax.devices()`
then lists every process's devices, `client_mesh()` spans them all, and every process
runs the same program (see the README's multi-device section). There `replicate` and
`shard_leading` place, from each process, the slices its own devices hold: every
process must pass the same values (as SPMD code does when it builds them the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def client_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "clients") -> Mesh:
  """A one-axis mesh over `devices` (default: all of them)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (axis,))


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh's first axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def _put(tree: Any, target: NamedSharding) -> Any:
  """`jax.device_put(tree, target)`, also where `target` spans other processes' devices.

  There `jax.device_put` refuses arrays already placed on a device (it accepts host
  values, checking with a collective per array that every process passed the same):
  each process instead builds its devices' slices and the global array is assembled
  from them, with no communication.
  """
  if target.is_fully_addressable:
    return jax.device_put(tree, target)

  def put(x):
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
      return jax.device_put(x, target)
    slices = target.addressable_devices_indices_map(x.shape)
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [jax.device_put(x[index], device) for device, index in slices.items()])

  return jax.tree_util.tree_map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array of `tree` onto every device of `mesh`."""
  return _put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_leading(tree: Any, mesh: Mesh) -> Any:
  """Splits every array's leading axis over the mesh's first axis."""
  return _put(tree, client_sharding(mesh))
