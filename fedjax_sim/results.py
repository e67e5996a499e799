"""Reading what runs and sweeps leave on disk, for plots and tables of results.

A run folder (`fedjax-sim run`) holds config.json (the flags and a few derived values,
flat), metrics.jsonl (one row per round) and summary.json (its status: "completed",
"failed: ...", "diverged at round r", ... once the run has stopped; "running" while it
runs, which a killed run leaves: read as NO_SUMMARY, as a folder without one).

A sweep folder (`fedjax-sim sweep`) holds config.json (the sweep's config),
results.csv (one row per configuration and seed), curves.npz (per-round training
metrics `round_<name>` [rows, rounds]; evaluation metrics `eval_<name>` [rows,
evaluations] at `eval_rounds`) and summary.json. Each of its rows reads as one `Run`.

`load(path)` reads either kind; `find(folder)` every run and sweep under a folder;
`differences(runs)` the configuration keys whose values differ between runs, which
label them in plots and tables.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedjax_sim import sweep_config
from fedjax_sim.run_dir import is_sweep

NO_SUMMARY = "running or killed"  # summary.json missing, or as fs.run left it: "running"
# Configuration keys that never tell runs apart: where the output goes, how it is shown
# and logged, checkpointed or resumed, where the final parameters are saved, the seed
# (runs differing only by seed are drawn as one mean and band), the device.
IGNORED_KEYS = frozenset({"output", "no_progress", "seed", "command", "plot", "tensorboard",
                          "wandb", "wandb_mode", "resume", "checkpoint_every",
                          "keep_checkpoints", "overwrite", "no_compile_cache", "argv",
                          "config_hash", "profiles_summary", "wandb_id",
                          "device", "save_params", "cwd"})
# Per-round metrics that are amounts per round: an x axis sums them over the rounds.
PER_ROUND_AMOUNTS = ("uplink_bytes", "downlink_bytes")


@dataclasses.dataclass
class Run:
  """One run: a run folder, or one row of a sweep.

  Attributes:
    path: the folder (a sweep row: the sweep's folder).
    name: the folder's name; a sweep row's adds `[row]`.
    kind: "run" or "sweep".
    config: flat configuration, name -> value (a sweep row: the sweep's settings with
      the row's static and grid values).
    seed: the seed of `jax.random.key` (None if unknown).
    status: "completed", "failed: ...", "diverged at round r", NO_SUMMARY...
    seconds: wall time (a sweep row: the whole sweep's).
    series: metric -> (rounds, values), each a 1-D array; rounds counted from 1.
  """

  path: str
  name: str
  kind: str
  config: dict[str, Any]
  seed: int | None
  status: str
  seconds: float | None
  series: dict[str, tuple[np.ndarray, np.ndarray]]

  @property
  def rounds(self) -> int:
    """The last round with metrics (0 before the first)."""
    return max((int(r[-1]) for r, _ in self.series.values() if len(r)), default=0)

  def final(self, metric: str) -> float | None:
    """The metric's value at its last round (None if the run never had it)."""
    if metric not in self.series or not len(self.series[metric][1]):
      return None
    return float(self.series[metric][1][-1])

  def best(self, metric: str) -> float | None:
    """The metric's best value: the largest for accuracies, the smallest otherwise."""
    if metric not in self.series or not len(self.series[metric][1]):
      return None
    values = self.series[metric][1]
    values = values[np.isfinite(values)]
    if not len(values):
      return float("nan")
    return float(values.max() if "accuracy" in metric else values.min())

  def curve(self, metric: str, x: str = "round") -> tuple[np.ndarray, np.ndarray]:
    """(x values, metric values) at the rounds that have the metric.

    `x` is "round" or a per-round metric: a cumulative one (`sim_time_s`) as it is, an
    amount per round (`uplink_bytes`, `downlink_bytes`) summed over the rounds so far.

    Raises:
      KeyError: the run has no such metric or x.
    """
    if metric not in self.series:
      raise KeyError(f"{self.name} has no metric {metric!r}; it has "
                     f"{', '.join(sorted(self.series))}")
    rounds, values = self.series[metric]
    if x == "round":
      return rounds.astype(float), values
    if x not in self.series:
      hint = (" (the simulated clock: run with a systems flag such as --deadline or "
              "--profiles-seed)" if x == "sim_time_s" else "")
      raise KeyError(f"{self.name} has no per-round {x!r}{hint}")
    x_rounds, x_values = self.series[x]
    if x in PER_ROUND_AMOUNTS:
      x_values = np.cumsum(x_values)
    lookup = dict(zip(x_rounds.tolist(), x_values.tolist()))
    keep = np.array([r in lookup for r in rounds.tolist()], bool)
    return np.array([lookup[r] for r in rounds[keep].tolist()], float), values[keep]


def _number(value: str) -> Any:
  """A CSV cell as the value it was: int, float, bool, None or the string."""
  if value in ("", "None"):
    return None
  if value in ("True", "False"):
    return value == "True"
  for kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      pass
  return value


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def is_run(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "metrics.jsonl")) or (
      os.path.isfile(os.path.join(path, "config.json")) and not is_sweep(path)
      and "grid" not in _read_json(os.path.join(path, "config.json")))


def load_run(path: str) -> Run:
  """Reads a run folder; a round written twice (a resumed run) keeps its last row."""
  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  config = _read_json(config_path) if os.path.isfile(config_path) else {}
  rows: dict[int, dict] = {}
  metrics_path = os.path.join(path, "metrics.jsonl")
  if os.path.isfile(metrics_path):
    with open(metrics_path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          rows[int(row["round"])] = row
  ordered = [rows[r] for r in sorted(rows)]
  names = list(dict.fromkeys(k for row in ordered for k in row if k != "round"))
  series = {}
  for name in names:
    have = [r for r in ordered if isinstance(r.get(name), (int, float))
            and not isinstance(r.get(name), bool)]
    if have:
      series[name] = (np.array([r["round"] for r in have]), np.array([r[name] for r in have],
                                                                     float))
  summary_path = os.path.join(path, "summary.json")
  summary = _read_json(summary_path) if os.path.isfile(summary_path) else {}
  status, seconds = summary.get("status", NO_SUMMARY), summary.get("seconds")
  if status == "running":  # fs.run's, until it stops: a run in progress or a killed one
    status, seconds = NO_SUMMARY, None
  return Run(path=path, name=os.path.basename(os.path.normpath(path)), kind="run",
             config={k: v for k, v in config.items() if k != "seed"},
             seed=config.get("seed"), status=status, seconds=seconds, series=series)


def _sweep_settings(raw: dict) -> dict[str, Any]:
  """The sweep's settings with defaults filled in (as `fedjax-sim run`'s config.json
  has every flag), so its rows compare with runs; the raw ones if it no longer parses."""
  try:
    config = sweep_config.parse_config(raw)
    return {"task": config.task, "algorithm": config.algorithm, **config.settings,
            **config.task_options}
  except (sweep_config.ConfigError, ValueError, TypeError, KeyError):
    return {"task": raw.get("task"), "algorithm": raw.get("algorithm"),
            **raw.get("settings", {})}


def load_sweep(path: str) -> list[Run]:
  """Reads a sweep folder: one Run per row of results.csv."""
  path = os.fspath(path)
  raw = _read_json(os.path.join(path, "config.json"))
  settings = {k: v for k, v in _sweep_settings(raw).items()
              if k not in raw.get("grid", {}) and k not in raw.get("static", {})}
  summary_path = os.path.join(path, "summary.json")
  summary = _read_json(summary_path) if os.path.isfile(summary_path) else {}
  if settings.get("model") is None and summary.get("model"):
    settings["model"] = summary["model"]  # the task's default, as a run's config.json has it
  with open(os.path.join(path, "results.csv"), newline="") as f:
    rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
  curves = dict(np.load(os.path.join(path, "curves.npz")))
  eval_rounds = np.asarray(curves.pop("eval_rounds", []), int)
  keys = [*raw.get("static", {}), *raw.get("grid", {})]
  runs = []
  for i, row in enumerate(rows):
    series = {}
    for name, values in curves.items():
      if name.startswith("round_"):
        series[name[len("round_"):]] = (np.arange(1, values.shape[1] + 1), values[i].astype(float))
      elif name.startswith("eval_") and len(eval_rounds):
        series[name[len("eval_"):]] = (eval_rounds, values[i].astype(float))
    if row.get("diverged"):
      status = f"diverged at round {row.get('diverged_round')}"
    else:
      status = "completed" if summary else NO_SUMMARY
    runs.append(Run(path=path, name=f"{os.path.basename(os.path.normpath(path))}[{i}]",
                    kind="sweep", config={**settings, **{k: row.get(k) for k in keys}},
                    seed=row.get("seed"), status=status, seconds=summary.get("seconds"),
                    series=series))
  return runs


def is_unfinished_sweep(path: str) -> bool:
  """A sweep folder before its results: config.json (with a grid) and nothing else yet."""
  config = os.path.join(path, "config.json")
  return not is_sweep(path) and os.path.isfile(config) and "grid" in _read_json(config)


def load(path: str | os.PathLike) -> list[Run]:
  """The runs of a run folder (one) or of a sweep folder (one per row; one row with no
  metrics for a sweep still running, or killed, before its results).

  Raises:
    FileNotFoundError: the folder is neither.
  """
  path = os.fspath(path)
  if is_sweep(path):
    return load_sweep(path)
  if os.path.isdir(path) and is_unfinished_sweep(path):
    raw = _read_json(os.path.join(path, "config.json"))
    # The task's default model is known only from the summary a finished sweep writes:
    # unknown is left out (a difference only where runs that have it differ), not None.
    config = {k: v for k, v in _sweep_settings(raw).items() if k != "model" or v is not None}
    return [Run(path=path, name=f"{os.path.basename(os.path.normpath(path))}[*]", kind="sweep",
                config=config, seed=None, status=NO_SUMMARY, seconds=None, series={})]
  if os.path.isdir(path) and is_run(path):
    return [load_run(path)]
  raise FileNotFoundError(f"{path}: not a run folder (config.json, metrics.jsonl) or a sweep "
                          "folder (results.csv, curves.npz)")


def find(folder: str | os.PathLike) -> list[Run]:
  """Every run and sweep row under `folder` (itself included), in path order; the
  folders inside a run (tensorboard/, wandb/, checkpoints/) are not searched."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder")
  runs: list[Run] = []
  for root, dirs, _ in os.walk(folder):
    dirs.sort()
    if is_sweep(root) or is_run(root) or is_unfinished_sweep(root):
      runs.extend(load(root))
      dirs.clear()
  return runs


def _hashable(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return "nan"
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return value


def differences(runs: Sequence[Run]) -> list[str]:
  """The configuration keys whose values differ between `runs`, in first-seen order.

  Keys in IGNORED_KEYS never count; a key that some runs lack (an older version's
  config, a sweep's against a run's) counts only if the runs that have it differ.
  """
  keys = list(dict.fromkeys(k for run in runs for k in run.config))
  out = []
  for key in keys:
    if key in IGNORED_KEYS:
      continue
    values = {_hashable(run.config[key]) for run in runs if key in run.config}
    if len(values) > 1:
      out.append(key)
  return out


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def label(run: Run, keys: Iterable[str]) -> str:
  """`key=value, ...` of `keys` in the run's configuration."""
  return ", ".join(f"{k}={format_value(run.config.get(k))}" for k in keys)
