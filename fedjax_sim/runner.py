"""Runs many rounds as compiled chunks: `lax.scan` over rounds, the host only logs.

Each chunk of `rounds_per_chunk` rounds is one XLA program, compiled once and reused
for every chunk. Where the rounds do not divide into chunks, every chunk is instead a
few calls of a program of gcd(rounds_per_chunk, rounds) rounds, so that the shorter
final chunk does not compile a second program (the calls queue on the device without
waiting for the host; the rounds compute alike). Between chunks the host
evaluates, writes one JSON line per round to the metrics file (flushed as it goes,
so a run that fails keeps every finished round), and updates the progress bar.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm  # the text bar: works in terminals and notebooks alike

from fedjax_sim import checkpoint as checkpoint_lib
from fedjax_sim import checks
from fedjax_sim import compile as compile_lib
from fedjax_sim import tree as tree_lib
from fedjax_sim.data import FederatedData
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState


# Divergence: a round's training loss that is not finite, above DIVERGED_LOSS, or above
# DIVERGED_FACTOR x max(the first round's training loss, 1) means the run diverged.
DIVERGED_LOSS = 1e6
DIVERGED_FACTOR = 1e3
DIVERGENCE_RULE = (f"a training loss that is not finite, above {DIVERGED_LOSS:g}, or above "
                   f"{DIVERGED_FACTOR:g} x max(the first round's, 1)")


class Diverged(FloatingPointError):
  """A run's training loss diverged (see `DIVERGENCE_RULE`); the rounds before it are kept."""


def is_diverged(loss: float, first_loss: float) -> bool:
  """Whether a round's training loss `loss` means divergence, given the first round's."""
  if not math.isfinite(loss):
    return True
  reference = max(first_loss, 1.0) if math.isfinite(first_loss) else 1.0
  return loss > DIVERGED_LOSS or loss > DIVERGED_FACTOR * reference


def trained(num_aggregated=None, num_examples=None) -> bool:
  """Whether a round trained anyone: under `systems` every sampled client may drop
  (`num_aggregated` 0), and clients may have no examples (`num_examples` 0); its
  training loss is then NaN, not a divergence. None: not reported."""
  return all(n is None or n > 0 for n in (num_aggregated, num_examples))


def _row_trained(row: dict) -> bool:
  return trained(row.get("num_aggregated"), row.get("num_examples"))


def diverged_round(losses, num_aggregated=None, num_examples=None) -> int | None:
  """The first round (counted from 1) whose loss in the curve `losses` means divergence;
  rounds whose `num_aggregated` or `num_examples` (curves beside it, if given) is 0
  trained nobody and are skipped. The first round that trained is the reference."""
  losses = [float(v) for v in np.asarray(losses).reshape(-1)]
  curve = lambda c: ([None] * len(losses) if c is None
                     else np.asarray(c).reshape(-1).tolist())
  rounds = list(zip(losses, curve(num_aggregated), curve(num_examples)))
  first = next((loss for loss, *n in rounds if trained(*n)), math.nan)
  for i, (loss, *n) in enumerate(rounds):
    if trained(*n) and is_diverged(loss, first):
      return i + 1
  return None


class History(list):
  """Per-round metric rows (dicts); `history.column("test_accuracy")` gives one series."""

  def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, values) of the rows that have metric `name`."""
    rows = [r for r in self if name in r]
    return np.array([r["round"] for r in rows]), np.array([r[name] for r in rows])


def check_evaluator(evaluate: Callable | None, params: Any) -> None:
  """Runs `evaluate.check(params)` where the evaluator has one (`fs.make_evaluator`'s:
  the model against the test data, a ValueError naming both sides), before compiling."""
  check = getattr(evaluate, "check", None)
  if check is not None:
    check(params)


@functools.lru_cache(maxsize=None)
def make_chunk(algorithm: FederatedAlgorithm, length: int) -> Callable:
  """A jitted `(state, data) -> (state, stacked metrics)` running `length` rounds.

  Cached per (algorithm, length), so runs of the same algorithm share compilations.
  """

  def chunk(state: ServerState, data: FederatedData):
    return jax.lax.scan(lambda s, _: algorithm.round(s, data), state, None, length=length)

  return compile_lib.jit(chunk, donate_argnums=0)


def compile_with_evaluation(call: Callable, state: ServerState, data: FederatedData,
                            evaluate: Callable | None) -> threading.Thread | None:
  """Compiles `call(state, data)` (its first call then finds it compiled) while, in a
  thread, `evaluate.prepare` compiles the evaluation: XLA:CPU keeps only part of the
  cores busy compiling one program, and the evaluation's trace runs while the round's
  compile holds no Python lock. Returns the thread, to join before the first evaluation;
  None (nothing compiled here) for an evaluator without `prepare`. Evaluating stays as
  it was: under configuration contexts of the caller's thread (which the thread does not
  see) the evaluation just compiles again."""
  prepare = getattr(evaluate, "prepare", None)
  if prepare is None:
    return None
  lowered = call.trace(state, data).lower()
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                  state.params)
  thread = threading.Thread(target=_ignoring_errors, args=(prepare, shapes), daemon=True)
  thread.start()
  lowered.compile()
  return thread


def _ignoring_errors(fn: Callable, *args) -> None:
  try:
    fn(*args)
  except Exception:  # the evaluation compiles again on its first call, and raises there
    pass


def _fetch(tree: Any) -> Any:
  """Host copies of a chunk's metrics.

  Under `jax.distributed`, per-client metrics split over a mesh that spans other
  processes' devices are gathered first (a collective: every process runs the same
  program, so every process calls it in the same order); replicated ones are read
  from this process's own copy.
  """
  def gather(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      from jax.experimental import multihost_utils
      return multihost_utils.process_allgather(a, tiled=True)
    return a
  return jax.device_get(jax.tree_util.tree_map(gather, tree))


def _scalar_row(round_index: int, metrics: dict[str, np.ndarray], i: int) -> dict[str, Any]:
  row: dict[str, Any] = {"round": round_index}
  for name, values in metrics.items():
    value = values[i]
    row[name] = value.item() if np.ndim(value) == 0 else value
  return row


def _added_metrics(source: str, values: Any, row: dict[str, Any]) -> dict[str, Any]:
  """`values` (what `evaluate` or `round_metrics` returned) with numpy and jax scalars
  as Python numbers, arrays as numpy (kept in the history, not in metrics.jsonl, as
  per-client metrics are). Raises TypeError or ValueError naming what does not fit a
  row: a name of the round's own metrics, a value neither an array nor JSON's."""
  if not isinstance(values, Mapping):
    raise TypeError(f"{source} must return a dict of metrics, got {type(values).__name__}")
  out = {}
  for name, value in values.items():
    if name in row:
      raise ValueError(f"{source} returned {name!r}, a name the round's own metrics use: "
                       f"rename it")
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
      value = np.asarray(value)
      value = value.item() if value.ndim == 0 else value
    else:
      try:
        json.dumps(value)
      except (TypeError, ValueError):
        raise TypeError(f"{source} returned {name!r} = {value!r}: a metric must be a "
                        f"number, a string, an array or what JSON holds") from None
    out[name] = value
  return out


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in row.items() if not isinstance(v, np.ndarray)}


# The default checkpoint cadence when none is given in rounds: after the first chunk that
# ends at least CHECKPOINT_SECONDS of wall time after the last checkpoint, and not more
# often than every CHECKPOINT_COST_FACTOR x the last save's duration. A preempted run
# loses at most about a minute of work, and saving costs at most about 5% of the run
# (a small state saves in ~50 ms; one of many GiB takes seconds).
CHECKPOINT_SECONDS = 60.0
CHECKPOINT_COST_FACTOR = 20.0


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped a run at a chunk boundary: every finished round is in the
  metrics file and, with `checkpoint_dir`, in a checkpoint to resume from."""

  def __init__(self, signum: int, round_index: int, checkpoint: str | None):
    import signal as signal_lib
    self.signum = signum
    self.round = round_index
    self.checkpoint = checkpoint
    self.exit_code = 128 + signum  # the shell's code for a process ended by this signal
    where = f"; checkpoint at round {round_index} in {checkpoint}" if checkpoint else ""
    super().__init__(f"interrupted by {signal_lib.Signals(signum).name} after round "
                     f"{round_index}{where}")


class DeferredSignals:
  """Defers SIGINT/SIGTERM to the next chunk boundary while installed (main thread only:
  elsewhere Python cannot set handlers, and the signals keep their usual effect). A
  second signal restores the previous handlers' effect at once. A signal the process
  ignores stays ignored."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    import signal as signal_lib
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal_lib.SIGINT, signal_lib.SIGTERM):
        if signal_lib.getsignal(sig) is signal_lib.SIG_IGN:
          continue  # ignored on purpose (a shell's background job ignores SIGINT): stays so
        self._previous[sig] = signal_lib.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    import signal as signal_lib
    if self.signum is not None:  # the second one: stop now
      self.__exit__()
      if signum == signal_lib.SIGINT:
        raise KeyboardInterrupt
      signal_lib.raise_signal(signum)
      return
    self.signum = signum

  def __exit__(self, *exc):
    import signal as signal_lib
    for sig, handler in self._previous.items():
      signal_lib.signal(sig, handler if handler is not None else signal_lib.SIG_DFL)
    self._previous = {}


def _open_metrics(path, lines: list[str] | None):
  """The metrics file, unbuffered for appending. `lines`: a resumed run's lines up to its
  checkpoint, rewritten first (atomically), which drops any row after the checkpoint and
  any partial last line; None: a new file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  checkpoint_lib.write_text_atomic(path, "".join(line + "\n" for line in lines or []))
  return open(path, "ab", buffering=0)


def run(
    algorithm: FederatedAlgorithm,
    state: ServerState,
    data: FederatedData,
    *,
    rounds: int,
    rounds_per_chunk: int = 10,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    metrics_path: str | os.PathLike | None = None,
    summary_path: str | os.PathLike | None = None,
    progress: bool = True,
    round_metrics: Callable[[int], dict[str, float]] | None = None,
    callbacks: Sequence[Any] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
) -> tuple[ServerState, History]:
  """Runs `rounds` rounds of `algorithm` from `state` on `data`.

  Args:
    algorithm: a FederatedAlgorithm, e.g. from `fedavg(...)`.
    state: the starting ServerState (not modified; the run works on a copy). When
      resuming, the template the checkpoint is restored into (same structure).
    data: the training FederatedData.
    rounds: number of rounds to run (from `state`'s round; a resumed run ends where
      the run it continues would have ended).
    rounds_per_chunk: rounds per compiled call; evaluation happens after each.
    evaluate: `params -> dict` of held-out metrics, added to each chunk's last round.
    metrics_path: JSON-lines file, one line per round, written as rounds finish (one
      write per line, fsynced at each checkpoint, so a kill never leaves half a line).
    summary_path: JSON file with the final metrics and timings (written atomically).
    progress: show a tqdm progress bar.
    round_metrics: host-side `round -> dict` added to every round's row (the round
      counted from 1; e.g. `privacy.DPAccountant`'s epsilon spent so far); its
      `check(data, algorithm)`, if it has one, runs before anything compiles.
    callbacks: host-side observers (metric writers), called between compiled chunks, so
      the round program never waits on them: each may define `on_rounds(rows)` (the
      chunk's new rows, after they are written to the metrics file) and `on_end(summary)`
      (the summary dict, also when the run fails or is interrupted). Any method left out
      is skipped.
    checkpoint_dir: save the whole simulation here (orbax; see `fedjax_sim.checkpoint`)
      at chunk boundaries, at the end, and when SIGINT/SIGTERM stops the run.
    checkpoint_every: rounds between checkpoints (rounded up to whole chunks, so a
      resumed run compiles and evaluates the same chunks); None: by wall time, about
      every `CHECKPOINT_SECONDS`; 0: only at the end and on interruption.
    keep_checkpoints: how many of the latest checkpoints to keep.
    resume: continue from the newest good checkpoint in `checkpoint_dir` (if it has
      none, start from `state`). The rounds, metrics rows, evaluations and final
      state are those of the uninterrupted run, bit for bit on the same device.

  Returns:
    (final state, History of per-round metric rows; a resumed run's rows before its
    checkpoint come back from the metrics lines, without per-client arrays).

  Raises:
    ValueError: bad arguments or data, before anything compiles; `checkpoint_dir`
      holding checkpoints while `resume` is False (continue it, or remove it).
    Diverged (a FloatingPointError): the training loss diverged (`DIVERGENCE_RULE`: not
      finite, above 1e6, or above 1e3 x max(the first round's loss, 1)), naming the
      round; the run stops there and the rounds before it stay in the metrics file (a
      finite diverged round too), the summary's status says "diverged at round r".
    Interrupted (a KeyboardInterrupt): SIGINT or SIGTERM arrived; the run stopped at
      the end of the chunk in progress, after writing its rows, a checkpoint (with
      `checkpoint_dir`) and the summary (status "interrupted").
  """
  if not checks.is_count(rounds):
    raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
  if not checks.is_count(rounds_per_chunk):
    raise ValueError(f"rounds_per_chunk must be a positive integer, got {rounds_per_chunk!r}")
  rounds, rounds_per_chunk = int(rounds), int(rounds_per_chunk)
  if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                       or checkpoint_every < 0):
    raise ValueError(f"checkpoint_every must be an integer >= 0 or None, got "
                     f"{checkpoint_every!r}")
  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs the checkpoint_dir to resume from")
  algorithm.validate(state, data)
  check_evaluator(evaluate, state.params)
  if getattr(round_metrics, "check", None) is not None:  # privacy.DPAccountant's
    round_metrics.check(data, algorithm)
  checkpoints = None
  record: dict[str, Any] | None = None
  if checkpoint_dir is not None:
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_dir, max_to_keep=keep_checkpoints)
    if checkpoints.steps() and not resume:
      raise ValueError(f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds checkpoints of "
                       f"an earlier run (rounds {checkpoints.steps()}): pass resume=True to "
                       f"continue it, or remove the folder to start over")
    if resume and checkpoints.steps():
      state, record = checkpoints.restore(state)
      if record["rounds_per_chunk"] != rounds_per_chunk:
        raise ValueError(f"the checkpoint was written with rounds_per_chunk="
                         f"{record['rounds_per_chunk']}, this run has {rounds_per_chunk}: "
                         f"resume with the same chunks (they set the evaluation rounds)")
  # The chunk donates its input state; copy so the caller's arrays stay valid.
  state = tree_lib.copy(state)
  start = time.perf_counter()
  if record is not None:
    lines = list(record["lines"])
    first = record["start_round"]
    first_loss = record["first_loss"]
    seconds_before = record.get("seconds", 0.0)
  else:
    lines, first, first_loss, seconds_before = [], int(state.round), None, 0.0
  history = History(json.loads(line) for line in lines)
  end = first + rounds
  # A resumed run's file is rewritten now (dropping rows past its checkpoint); a new run's
  # at its first row: one that fails before (tracing, compiling) leaves an old file be.
  metrics_file = (_open_metrics(metrics_path, lines)
                  if metrics_path is not None and record is not None else None)
  status = "completed"
  done = int(state.round)
  if summary_path is not None and done < end:
    # Until this session ends: a resumed run killed mid-way left the last session's
    # "interrupted" (or "completed") beside rounds written since.
    write_summary(summary_path, history, "running", seconds_before)
  bar = tqdm(total=end - first, initial=done - first, unit="round", disable=not progress,
             dynamic_ncols=True)
  last_save = {"round": done, "time": time.perf_counter(), "cost": 0.0}

  def save_checkpoint():
    if metrics_file is not None:
      os.fsync(metrics_file.fileno())  # the rows before the checkpoint that records them
    t = time.perf_counter()
    checkpoints.save(state, {"start_round": first, "end_round": end,
                             "rounds_per_chunk": rounds_per_chunk, "first_loss": first_loss,
                             "lines": lines, "seconds": seconds_before + t - start})
    last_save.update(round=done, time=time.perf_counter(), cost=time.perf_counter() - t)

  def checkpoint_due() -> bool:
    if checkpoint_every is None:
      waited = time.perf_counter() - last_save["time"]
      return waited >= max(CHECKPOINT_SECONDS, CHECKPOINT_COST_FACTOR * last_save["cost"])
    return checkpoint_every > 0 and done - last_save["round"] >= checkpoint_every

  def write(row):
    nonlocal metrics_file
    if metrics_path is not None and metrics_file is None:
      metrics_file = _open_metrics(metrics_path, lines)
    history.append(row)
    line = json.dumps(_jsonable(row))
    lines.append(line)
    if metrics_file is not None:
      metrics_file.write((line + "\n").encode())  # one write: never half a line

  def keep(rows):  # rounds that trained, for the metrics file and the callbacks
    for row in rows:
      write(row)
    _notify(callbacks, "on_rounds", rows)

  # One program for every chunk, the shorter final one included (see the module doc).
  call_rounds = math.gcd(rounds_per_chunk, end - first)
  call = make_chunk(algorithm, call_rounds)
  preparing = None
  try:
    with DeferredSignals() as signals:
      preparing = compile_with_evaluation(call, state, data, evaluate) if done < end else None
      while done < end:
        length = min(rounds_per_chunk, end - done)
        metrics = []
        for _ in range(length // call_rounds):
          state, part = call(state, data)
          metrics.append(part)
        metrics = _fetch(metrics)
        metrics = jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *metrics)
        rows = [_scalar_row(done + i + 1, metrics, i) for i in range(length)]
        if round_metrics is not None:
          try:
            added = [_added_metrics("round_metrics", round_metrics(r["round"]), r) for r in rows]
          except BaseException:  # the chunk's rounds trained: keep them, without these
            keep(rows)
            raise
          for row, more in zip(rows, added):
            row.update(more)
        if first_loss is None:
          first_loss = next((r["train_loss"] for r in rows if _row_trained(r)), None)
        reference = math.nan if first_loss is None else first_loss
        bad = next((r for r in rows
                    if _row_trained(r) and is_diverged(r["train_loss"], reference)), None)
        if bad is None and evaluate is not None:
          if preparing is not None:
            preparing.join()
            preparing = None
          try:
            rows[-1].update(_added_metrics("evaluate", evaluate(state.params), rows[-1]))
          except BaseException:  # the chunk's rounds trained: keep them, unevaluated
            keep(rows)
            raise
        for i, row in enumerate(rows):
          if row is bad:
            status = f"diverged at round {row['round']}"
            if math.isfinite(row["train_loss"]):
              write(row)
            # the writers (TensorBoard, W&B) get the rounds metrics.jsonl got
            _notify(callbacks, "on_rounds", rows[:i + math.isfinite(row["train_loss"])])
            raise Diverged(
                f"diverged: training loss {row['train_loss']:.4g} at round {row['round']} "
                f"(the first round's: {first_loss:.4g}; the rule: {DIVERGENCE_RULE}); the run "
                f"stopped, rounds before it are kept. Try a smaller learning rate.")
          write(row)
        _notify(callbacks, "on_rounds", rows)
        done += length
        bar.update(length)
        last = history[-1]
        postfix = {"loss": f"{last['train_loss']:.4f}"}
        if "test_accuracy" in last:
          postfix["acc"] = f"{last['test_accuracy']:.4f}"
        bar.set_postfix(postfix)
        if checkpoints is not None and (done >= end or signals.signum or checkpoint_due()):
          save_checkpoint()
        if signals.signum is not None:
          status = "interrupted"
          raise Interrupted(signals.signum, done,
                            checkpoints.directory if checkpoints is not None else None)
  except BaseException as e:
    if status == "completed":
      status = f"failed: {type(e).__name__}: {e}"
    raise
  finally:
    if preparing is not None:  # a run stopped before evaluating: no compile left at exit
      preparing.join()
    bar.close()
    if metrics_file is not None:
      metrics_file.close()
    if checkpoints is not None:
      checkpoints.close()
    summary = write_summary(summary_path, history, status,
                            seconds_before + time.perf_counter() - start)
    _notify(callbacks, "on_end", summary)
  return state, history


def _notify(callbacks: Sequence[Any], method: str, *args) -> None:
  for callback in callbacks:
    hook = getattr(callback, method, None)
    if hook is not None:
      hook(*args)


def write_summary(path, history: History, status: str, seconds: float) -> dict:
  """Returns the final and best metrics of a run, written as JSON to `path` unless None."""
  rows = [_jsonable(r) for r in history]
  summary: dict[str, Any] = {"status": status, "rounds": len(rows), "seconds": round(seconds, 3)}
  if rows:
    final = {}
    for row in rows:  # latest value of every metric, evaluation ones included
      final.update(row)
    summary["final"] = final
    accs = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    if accs:
      summary["best_test_accuracy"] = max(accs)
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoint_lib.write_json_atomic(path, summary)
  return summary
