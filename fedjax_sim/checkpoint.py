"""Checkpoints of a whole simulation, with orbax-checkpoint, for exact resume.

A checkpoint holds the whole `ServerState` (parameters, optimizer, per-client and
aggregator states, hyperparameters, keys, the round, the simulated time) and, beside
it, a JSON record of the run: every metrics line written so far (so the metrics file,
the summary and the history are rebuilt exactly; the DP accountant's epsilon is a
function of the round, so it continues by itself), the round the run started from and
ends at, the rounds per compiled chunk, and a SHA-256 of the state's bytes.

Layout: `DIR/<round>/{state,meta}`, written by `orbax.checkpoint.CheckpointManager`
(each step goes to a temporary folder, renamed into place once complete, so a SIGKILL
during a save leaves no step that looks finished), keeping the last `max_to_keep`.

Typed PRNG keys (`jax.random.key`) are stored as their `jax.random.key_data` (uint32)
and rewrapped with the template's implementation on restore.

A step whose files cannot be read, or whose bytes do not hash to the recorded digest
(a truncated or altered file), is skipped with a message on stderr, and the previous
one is used.

orbax-checkpoint is a core dependency (flax, which fedjax_sim needs, already depends on
it, so it installs nothing more) but it is imported here lazily: importing it takes
about 0.7 s (measured on a 2-core CPU), which `import fedjax_sim` should not pay for
runs that never checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1


class CheckpointError(ValueError):
  """No usable checkpoint, or one that does not fit the run it should continue."""


def _ocp():
  import orbax.checkpoint as ocp  # lazy: see the module docstring
  return ocp


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_saveable(state: Any) -> tuple[dict[str, jax.Array], list[int], str]:
  """(flat dict of arrays, indices of the typed-key leaves, the tree structure)."""
  leaves, treedef = jax.tree_util.tree_flatten(state)
  flat, keys = {}, []
  for i, leaf in enumerate(leaves):
    if _is_key(leaf):
      keys.append(i)
      leaf = jax.random.key_data(leaf)
    flat[f"{i:05d}"] = jnp.asarray(leaf)
  return flat, keys, str(treedef)


def _digest(flat: dict[str, Any]) -> str | None:
  """SHA-256 over the names, dtypes, shapes and bytes of every array (None when some
  array is not fully addressable: under jax.distributed each process holds a part)."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = flat[name]
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return None
    a = np.asarray(jax.device_get(a))
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class Checkpoints:
  """The checkpoints of one run in `directory` (created on the first save).

  Args:
    directory: the folder of steps (e.g. RUN_DIR/checkpoints).
    max_to_keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, *,
               read_only: bool = False):
    if not isinstance(max_to_keep, int) or max_to_keep <= 0:
      raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.max_to_keep = max_to_keep
    self.read_only = read_only  # a reader: never deletes, not even unfinished saves
    self._manager = None
    self._continued_from = None  # the round last restored or saved

  def _open(self):
    if self._manager is None:
      ocp = _ocp()
      # Synchronous saves: the next compiled chunk donates the state's buffers, so the
      # save must have read them before it starts (a small state saves in ~50 ms). Only
      # the writer removes unfinished saves: a reader's manager removed the one a live
      # run was writing, which then failed.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.max_to_keep, enable_async_checkpointing=False,
          create=not self.read_only, cleanup_tmp_directories=not self.read_only)
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def steps(self) -> list[int]:
    """The rounds of the finished checkpoints, oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(self._open().all_steps())

  def save(self, state: Any, record: dict[str, Any], step: int | None = None) -> None:
    """Saves `state` (any pytree of arrays) at `step` (default `int(state.round)`) with
    the JSON-able `record`, deleting the checkpoints of rounds from `step` on and, after
    a restore, those newer than the round restored: the run continued replaces them."""
    ocp = _ocp()
    flat, keys, treedef = _to_saveable(state)
    step = int(jax.device_get(state.round)) if step is None else int(step)
    meta = {**record, "format": FORMAT, "round": step, "key_leaves": keys, "treedef": treedef,
            "sha256": _digest(flat), "arrays": _array_specs(flat)}
    manager = self._open()
    # A rerun of this round, or a run continued from a checkpoint older than others (the
    # newer ones corrupt, or an older round asked for): the newer ones belong to the run
    # being replaced, and orbax writes no step below its newest (save returns False).
    since = step - 1 if self._continued_from is None else min(self._continued_from, step - 1)
    for stale in [s for s in manager.all_steps() if s > since]:
      manager.delete(stale)
    saved = manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                       meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    self._continued_from = step
    if not saved:
      raise CheckpointError(f"{self.directory}: orbax did not save round {step} (its steps: "
                            f"{sorted(manager.all_steps())})")

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, record) of checkpoint `step`, or of the newest good one.

    `template` is a state of the same structure (e.g. `algorithm.init(...)`): its
    shapes, dtypes, shardings and key implementations are restored into. A checkpoint
    that cannot be read or fails its digest is skipped, with a message on stderr, for
    the one before it.

    Raises:
      CheckpointError: no (good) checkpoint, or one of another structure.
    """
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"{self.directory}: no checkpoint of round {step} (have "
                              f"{steps or 'none'})")
      return self._restore_step(template, step)
    if not steps:
      raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
    errors = []
    for s in reversed(steps):
      try:
        result = self._restore_step(template, s)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001  (any unreadable file means: try the one before)
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". See full")[0][:160]
        errors.append(s)
        older = [t for t in steps if t < s]
        then = f"using the previous one (round {older[-1]})" if older else "none is left"
        print(f"fedjax-sim: checkpoint {os.path.join(self.directory, str(s))} is corrupt or "
              f"partial ({reason}); {then}", file=sys.stderr)
        continue
      return result
    raise CheckpointError(f"{self.directory}: every checkpoint is corrupt or partial "
                          f"(rounds {errors})")

  def _restore_step(self, template: Any, step: int) -> tuple[Any, dict[str, Any]]:
    ocp = _ocp()
    manager = self._open()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise ValueError(f"unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    flat_template, keys, treedef = _to_saveable(template)
    if meta["treedef"] != treedef or meta["key_leaves"] != keys:
      raise CheckpointError(
          f"{os.path.join(self.directory, str(step))} holds a state of another structure "
          f"than this run's (another algorithm, model or option?): saved {meta['treedef']}, "
          f"expected {treedef}")

    # Orbax casts to the template's dtype (and refuses another shape as an error that
    # reads like corruption): compare with what was saved first, naming the array.
    wanted, saved = _array_specs(flat_template), meta.get("arrays", {})
    for name in sorted(set(wanted) & set(saved)):
      if wanted[name] != saved[name]:
        path = jax.tree_util.keystr(
            jax.tree_util.tree_flatten_with_path(template)[0][int(name)][0])
        raise CheckpointError(
            f"{os.path.join(self.directory, str(step))}: the state's {path} was saved with "
            f"shape {tuple(saved[name][0])} and dtype {saved[name][1]}, this run's has "
            f"{tuple(wanted[name][0])} {wanted[name][1]} (another model, precision or option?)")

    def abstract(a):
      sharding = a.sharding if isinstance(a, jax.Array) else None
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    target = {name: abstract(a) for name, a in flat_template.items()}
    flat = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    if set(flat) != set(target):
      raise ValueError("the saved arrays do not match the state's leaves")
    for name, a in flat.items():
      if a.shape != target[name].shape or a.dtype != target[name].dtype:
        raise CheckpointError(f"{os.path.join(self.directory, str(step))}: array {name} has "
                              f"shape {a.shape} {a.dtype}, this run's state "
                              f"{target[name].shape} {target[name].dtype}")
    digest = meta.get("sha256")
    if digest is not None and _digest(flat) != digest:
      raise ValueError("its arrays do not match their recorded SHA-256")
    leaves, treedef_obj = jax.tree_util.tree_flatten(template)
    restored = []
    for i, leaf in enumerate(leaves):
      a = flat[f"{i:05d}"]
      if i in keys:
        a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
      restored.append(a)
    self._continued_from = step  # a save after this replaces the newer checkpoints
    return jax.tree_util.tree_unflatten(treedef_obj, restored), meta

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None


def _array_specs(flat: dict[str, Any]) -> dict[str, list]:
  """name -> [shape, dtype name] of saved arrays (JSON-able, compared on restore)."""
  return {name: [list(np.shape(a)), np.dtype(a.dtype).name] for name, a in flat.items()}


def restore(directory: str | os.PathLike, template: Any, step: int | None = None
            ) -> tuple[Any, dict[str, Any]]:
  """Loads a checkpoint that `fs.run(..., checkpoint_dir=directory)` wrote.

  Args:
    directory: the run's checkpoint folder (`RUN_DIR/checkpoints` for the CLI's runs).
    template: a ServerState of the same structure, e.g. `algorithm.init(params, key,
      num_clients)`; its shapes, dtypes, shardings and key types are restored into.
    step: the round to load; default the newest good checkpoint (a corrupt or partial
      one is skipped, with a message, for the one before).

  Returns:
    (state, record): `record["round"]` is the round, `record["lines"]` the metrics lines
    written up to it.
  """
  checkpoints = Checkpoints(directory, read_only=True)
  try:
    return checkpoints.restore(template, step)
  finally:
    checkpoints.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON to `path` through a temporary file and `os.replace`, so a
  reader (or a crash) never sees a half-written file."""
  write_text_atomic(path, json.dumps(obj, indent=2))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (temporary file in the same folder, fsync,
  os.replace)."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
