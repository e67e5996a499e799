"""`fedjax-sim sweep --config FILE`: a grid of hyperparameters x seeds from a small file.

A config (JSON, or TOML for a `.toml` file) names a task and an algorithm as
`fedjax-sim run` does, fixed settings, a grid of traced hyperparameters and seeds:

    {
      "task": "synthetic",
      "algorithm": "fedadam",
      "settings": {"rounds": 50, "clients_per_round": 10, "batch_size": 10, "epochs": 1,
                   "eval_every": 10},
      "grid": {"client_lr": [0.01, 0.03, 0.1], "server_lr": [0.003, 0.01, 0.03]},
      "seeds": [0, 1, 2],
      "plot": "test_accuracy"
    }

Keys:

- `task`: a task of `fedjax-sim run` (default `synthetic`); its options (`partition`,
  `alpha`, `num_clients`...) go in `settings`.
- `algorithm`: `fedavg` (default) or `fedprox`, or a server optimizer's name as a
  shorthand for FedAvg with it (`fedavgm`, `fedadagrad`, `fedadam`, `fedyogi`).
  The other algorithms check their hyperparameters in Python when built, so their
  hyperparameters cannot be traced, and are refused.
- `settings`: fixed values, with the names and defaults of `fedjax-sim run`'s flags
  (`rounds`, `clients_per_round`, `epochs` or `steps`, `batch_size`, `client_optimizer`,
  `client_lr`, `server_optimizer`, `server_lr`, `mu`, `weighting`, `client_chunk_size`,
  `eval_every`, `model`, task options) plus `init_seed`: the seed of the task and of the
  initial model, which every row shares (default 0).
- `grid`: traced hyperparameters, name -> list of numbers: `client_lr`, `server_lr`
  (and `mu` for fedprox). Their product times `seeds` is one vmapped program.
- `seeds`: the seeds of each configuration's `jax.random.key(seed)` (client sampling and
  shuffling); default [0].
- `static`: optional shape- or structure-changing settings, name -> list of values, one
  compilation per combination: `clients_per_round`, `batch_size`, `epochs`, `steps`,
  `client_chunk_size`, `client_optimizer`, `server_optimizer`.
- `output`: the output directory (default `runs/sweep-<config file name>`).
- `plot`: a metric to plot per round for every row (`test_accuracy`, `train_loss`...),
  or false (the default).

Every mistake (an unknown key, task or algorithm, an empty grid, a value that is not a
number, a learning rate the optimizer refuses...) is reported naming the file and the
key before the task loads or anything compiles.

The row with seed s equals `fedjax-sim run` with the same settings and `--seed s` when
s is `init_seed` (tested): `run` seeds the initial model with its `--seed`, a sweep
shares one initial model across seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from fedjax_sim import optimizers, tasks
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedprox import proximal_term
from fedjax_sim.algorithms.registry import build_algorithm

TOP_KEYS = ("task", "algorithm", "settings", "grid", "seeds", "static", "output", "plot")
# Algorithms a sweep can build from traced hyperparameters, and those hyperparameters.
TRACED = {"fedavg": ("client_lr", "server_lr"), "fedprox": ("client_lr", "server_lr", "mu")}
# A server optimizer's name as the algorithm: FedAvg with that server optimizer.
SERVER_ALIASES = tuple(o for o in optimizers.SERVER_OPTIMIZERS if o != "fedavg")
STATIC_KEYS = ("clients_per_round", "batch_size", "epochs", "steps", "client_chunk_size",
               "client_optimizer", "server_optimizer")
# settings: name -> (kind, default); kinds: int, number, bool, str, or a tuple of choices.
SETTINGS: dict[str, tuple[Any, Any]] = {
    "rounds": ("int", 50),
    "clients_per_round": ("int", 10),
    "epochs": ("int", None),
    "steps": ("int", None),
    "batch_size": ("int", 10),
    "client_optimizer": (optimizers.CLIENT_OPTIMIZERS, "sgd"),
    "client_lr": ("number", 0.05),
    "server_optimizer": (optimizers.SERVER_OPTIMIZERS, "fedavg"),
    "server_lr": ("number", 1.0),
    "mu": ("number", 0.01),
    "weighting": (("examples", "uniform"), "examples"),
    "client_chunk_size": ("chunk", "auto"),
    "eval_every": ("int", 10),
    "model": ("str", None),
    "init_seed": ("int", 0),
}


class ConfigError(ValueError):
  """A sweep config that cannot run; the message names the file and the key."""


@dataclasses.dataclass
class SweepConfig:
  """A checked sweep config (see the module docstring for the keys)."""

  task: str
  algorithm: str                      # 'fedavg' or 'fedprox'
  settings: dict[str, Any]            # every SETTINGS name, defaults filled in
  task_options: dict[str, Any]        # passed to tasks.load_task
  grid: dict[str, list[float]]
  seeds: list[int]
  static: dict[str, list[Any]]
  output: str | None
  plot: str | None
  source: str = "config"
  label: str = ""                     # the algorithm as the config named it (e.g. 'fedadam')

  def to_json(self) -> dict[str, Any]:
    """The config with every default filled in, in the file's own format."""
    settings = {k: v for k, v in {**self.settings, **self.task_options}.items()
                if v is not None and k not in self.grid and k not in self.static
                and not (k == "mu" and self.algorithm != "fedprox")}
    out = {"task": self.task, "algorithm": self.label or self.algorithm, "settings": settings,
           "grid": self.grid, "seeds": self.seeds}
    if self.static:
      out["static"] = self.static
    return {**out, "plot": self.plot or False}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The raw mapping in a JSON file, or a TOML file (by its `.toml` suffix)."""
  path = os.fspath(path)
  try:
    if path.endswith(".toml"):
      with open(path, "rb") as f:
        return tomllib.load(f)
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
    raise ConfigError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: "
                      f"{e}") from None


def _unknown(where: str, name: str, allowed) -> ConfigError:
  close = difflib.get_close_matches(name, list(allowed), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"{where}: unknown key {name!r}{hint}; allowed: {', '.join(allowed)}")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(where: str, kind, value) -> Any:
  if kind == "int":
    if not isinstance(value, int) or isinstance(value, bool):
      raise ConfigError(f"{where} must be an integer, got {value!r}")
  elif kind == "chunk":
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
      raise ConfigError(f"{where} must be a positive integer or \"auto\", got {value!r}")
  elif kind == "number":
    if not _is_number(value):
      raise ConfigError(f"{where} must be a finite number, got {value!r}")
    value = float(value)
  elif kind == "bool":
    if not isinstance(value, bool):
      raise ConfigError(f"{where} must be true or false, got {value!r}")
  elif kind == "str":
    if not isinstance(value, str):
      raise ConfigError(f"{where} must be a string, got {value!r}")
  elif value not in kind:
    raise ConfigError(f"{where} must be one of {', '.join(kind)}, got {value!r}")
  return value


def _task_option_kind(task: str, name: str):
  """The kind of a task option, from its builder's default (None: not known)."""
  import inspect
  builder = getattr(tasks, "_TASKS", {}).get(task)
  if builder is None:
    return None
  default = inspect.signature(builder).parameters[name].default
  if isinstance(default, bool):
    return "bool"
  if isinstance(default, int):
    return "int"
  if isinstance(default, float):
    return "number"
  if isinstance(default, str):
    return "str"
  return None


def _mapping(where: str, value) -> dict:
  if not isinstance(value, Mapping):
    raise ConfigError(f"{where} must be a mapping (a JSON object or TOML table), "
                      f"got {value!r}")
  return dict(value)


def parse_config(raw: Any, source: str = "config") -> SweepConfig:
  """Checks a raw config mapping and fills in defaults.

  Raises:
    ConfigError: naming `source` and the key at fault.
  """
  raw = _mapping(source, raw)
  for key in raw:
    if key not in TOP_KEYS:
      raise _unknown(source, key, TOP_KEYS)

  task = raw.get("task", "synthetic")
  if task not in tasks.task_names():
    raise ConfigError(f"{source}: unknown task {task!r}; choose from "
                      f"{', '.join(tasks.task_names())}")
  task_option_names = tasks.task_options(task)

  algorithm = raw.get("algorithm", "fedavg")
  alias_server = None
  if algorithm in SERVER_ALIASES:
    algorithm, alias_server = "fedavg", algorithm
  elif algorithm not in TRACED:
    from fedjax_sim.algorithms import ALGORITHMS  # the full list, for the message
    if algorithm in ALGORITHMS:
      raise ConfigError(
          f"{source}: algorithm {algorithm!r} cannot be swept: its factory checks its "
          "hyperparameters in Python, so they cannot be traced; a sweep supports "
          f"{', '.join([*TRACED, *SERVER_ALIASES])}")
    raise ConfigError(f"{source}: unknown algorithm {algorithm!r}; a sweep supports "
                      f"{', '.join([*TRACED, *SERVER_ALIASES])}")

  settings_raw = _mapping(f"{source}: settings", raw.get("settings", {}))
  allowed_settings = (*SETTINGS, *task_option_names)
  settings = {name: default for name, (_, default) in SETTINGS.items()}
  task_options: dict[str, Any] = {}
  for name, value in settings_raw.items():
    if name == "seed":
      raise ConfigError(f"{source}: settings: 'seed' is not a setting: list the seeds under "
                        "'seeds', and the seed of the task and initial model is 'init_seed'")
    if name not in allowed_settings:
      raise _unknown(f"{source}: settings (task {task!r})", name, allowed_settings)
    if name in SETTINGS:
      settings[name] = _check_value(f"{source}: settings.{name}", SETTINGS[name][0], value)
    else:
      kind = _task_option_kind(task, name)
      task_options[name] = value if kind is None else _check_value(
          f"{source}: settings.{name} (an option of task {task!r})", kind, value)
  if alias_server is not None:
    if "server_optimizer" in settings_raw and settings_raw["server_optimizer"] != alias_server:
      raise ConfigError(f"{source}: algorithm {alias_server!r} is FedAvg with server optimizer "
                        f"{alias_server!r}, but settings.server_optimizer is "
                        f"{settings_raw['server_optimizer']!r}")
    settings["server_optimizer"] = alias_server

  if "grid" not in raw:
    raise ConfigError(f"{source}: no 'grid': give the traced hyperparameters to sweep, e.g. "
                      '"grid": {"client_lr": [0.01, 0.1]}')
  grid_raw = _mapping(f"{source}: grid", raw["grid"])
  if not grid_raw:
    raise ConfigError(f"{source}: grid is empty: give at least one of "
                      f"{', '.join(TRACED[algorithm])} with a list of values")
  grid: dict[str, list[float]] = {}
  for name, values in grid_raw.items():
    if name not in TRACED[algorithm]:
      extra = (" (shape-changing settings go under 'static')" if name in STATIC_KEYS else "")
      if name in SETTINGS or name in task_option_names:
        raise ConfigError(f"{source}: grid.{name}: not a traced hyperparameter of {algorithm}; "
                          f"traced: {', '.join(TRACED[algorithm])}{extra}")
      raise _unknown(f"{source}: grid ({algorithm})", name, TRACED[algorithm])
    if name in settings_raw:
      raise ConfigError(f"{source}: {name} is both in settings and in grid")
    if not isinstance(values, list):
      raise ConfigError(f"{source}: grid.{name} must be a list of numbers, got {values!r}")
    if not values:
      raise ConfigError(f"{source}: grid.{name} is empty: give at least one value")
    for v in values:
      if not _is_number(v):
        raise ConfigError(f"{source}: grid.{name} must hold finite numbers, got {v!r}")
    if len(set(values)) != len(values):
      raise ConfigError(f"{source}: grid.{name} repeats a value: {values!r}")
    grid[name] = [float(v) for v in values]

  seeds = raw.get("seeds", [0])
  if (not isinstance(seeds, list) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
    raise ConfigError(f"{source}: seeds must be a non-empty list of integers >= 0, "
                      f"got {seeds!r}")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"{source}: seeds repeats a seed: {seeds!r}")

  static_raw = _mapping(f"{source}: static", raw.get("static", {}))
  static: dict[str, list[Any]] = {}
  for name, values in static_raw.items():
    if name not in STATIC_KEYS:
      raise _unknown(f"{source}: static", name, STATIC_KEYS)
    if name in settings_raw or name in grid:
      raise ConfigError(f"{source}: {name} is both in static and in "
                        f"{'settings' if name in settings_raw else 'grid'}")
    if name == "server_optimizer" and alias_server is not None:
      raise ConfigError(f"{source}: algorithm {alias_server!r} fixes the server optimizer; "
                        "use algorithm 'fedavg' to list server optimizers under static")
    if not isinstance(values, list) or not values:
      raise ConfigError(f"{source}: static.{name} must be a non-empty list, got {values!r}")
    static[name] = [_check_value(f"{source}: static.{name}", SETTINGS[name][0], v)
                    for v in values]

  schedule = [n for n in ("epochs", "steps") if settings[n] is not None or n in static]
  if len(schedule) == 2:
    raise ConfigError(f"{source}: give local epochs or steps, not both")
  if not schedule:
    settings["epochs"] = 1  # `fedjax-sim run`'s default
  for name in ("rounds", "eval_every", "clients_per_round", "batch_size"):
    if settings[name] <= 0:
      raise ConfigError(f"{source}: settings.{name} must be positive, got {settings[name]}")

  output = raw.get("output")
  if output is not None and not isinstance(output, str):
    raise ConfigError(f"{source}: output must be a directory name, got {output!r}")
  plot = raw.get("plot", False)
  if plot is True:
    plot = "test_accuracy"
  if plot is not False and plot is not None and not isinstance(plot, str):
    raise ConfigError(f"{source}: plot must be a metric name or false, got {plot!r}")
  return SweepConfig(task=task, algorithm=algorithm, settings=settings,
                     task_options=task_options, grid=grid, seeds=list(seeds), static=static,
                     output=output, plot=plot or None, source=source,
                     label=alias_server or algorithm)


def load_config(path: str | os.PathLike) -> SweepConfig:
  """Reads and checks the config file at `path`."""
  return parse_config(read_config(path), source=os.fspath(path))


def _values(config: SweepConfig, hparams: Mapping[str, Any]) -> dict[str, Any]:
  return {**config.settings, **{k: v for k, v in hparams.items() if k != "seed"}}


def make_algorithm_factory(config: SweepConfig, apply: Callable) -> Callable:
  """`hparams -> FederatedAlgorithm` for `fs.sweep`, with the grid's names traced.

  A traced learning rate scales the package's own optimizer at learning rate 1
  (`chain(client_optimizer(name, 1), scale(lr))`): the same updates as
  `client_optimizer(name, lr)`, whose Python check refuses tracers. FedProx's mu goes
  into its proximal term directly.
  """

  def optimizer(build, name: str, lr, swept: bool) -> optax.GradientTransformation:
    if not swept:
      return build(name, lr)
    return optax.chain(build(name, 1.0), optax.scale(lr))

  def make(hparams):
    v = _values(config, hparams)
    regularizer = proximal_term(v["mu"]) if config.algorithm == "fedprox" else None
    return fedavg(
        apply, client_optimizer=optimizer(optimizers.client_optimizer, v["client_optimizer"],
                                          v["client_lr"], "client_lr" in config.grid),
        server_optimizer=optimizer(optimizers.server_optimizer, v["server_optimizer"],
                                   v["server_lr"], "server_lr" in config.grid),
        clients_per_round=v["clients_per_round"], batch_size=v["batch_size"],
        epochs=v["epochs"], steps=v["steps"], weighting=v["weighting"],
        client_chunk_size=v["client_chunk_size"], regularizer=regularizer)

  return make


def _product(values: Mapping[str, list]) -> list[dict[str, Any]]:
  names = list(values)
  return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


def check_algorithms(config: SweepConfig, apply: Callable, params: Any, train) -> None:
  """Builds every grid value and static combination with concrete numbers through
  `build_algorithm` (its checks, its messages) and validates one state per static
  combination on the data, before anything compiles.

  Raises:
    ConfigError: naming the file and the values refused.
  """
  import jax

  first = {name: values[0] for name, values in config.grid.items()}
  probes = [first] + [{**first, name: v} for name, values in config.grid.items()
                      for v in values[1:]]
  for static in _product(config.static) or [{}]:
    for hp in probes:
      v = _values(config, {**hp, **static})
      where = ", ".join(f"{k}={val}" for k, val in {**static, **hp}.items())
      try:
        algorithm = build_algorithm(
            config.algorithm, apply, clients_per_round=v["clients_per_round"],
            batch_size=v["batch_size"], epochs=v["epochs"], steps=v["steps"],
            client_optimizer=v["client_optimizer"], client_lr=v["client_lr"],
            server_optimizer=v["server_optimizer"], server_lr=v["server_lr"],
            weighting=v["weighting"], client_chunk_size=v["client_chunk_size"], mu=v["mu"])
      except ValueError as e:
        raise ConfigError(f"{config.source}: {where}: {e}") from None
    try:
      algorithm.validate(algorithm.init(params, jax.random.key(0)), train)
    except ValueError as e:
      raise ConfigError(f"{config.source}: {where}: {e}") from None


def write_results(result, config: SweepConfig, output: str, extra: dict[str, Any]) -> dict:
  """Writes results.csv (one row per configuration and seed), curves.npz, summary.json."""
  os.makedirs(output, exist_ok=True)
  names = list(dict.fromkeys(k for row in result.rows for k in row))
  with open(os.path.join(output, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    writer.writerows(result.rows)
  np.savez(os.path.join(output, "curves.npz"), eval_rounds=result.eval_rounds,
           **{f"round_{k}": v for k, v in result.curves.items()},
           **{f"eval_{k}": v for k, v in result.eval_curves.items()})
  summary = {"configurations": len(result.rows), "rounds": config.settings["rounds"],
             "seconds_per_compilation": [round(s, 3) for s in result.seconds],
             "eval_rounds": [int(r) for r in result.eval_rounds], **extra}
  metric = "final_test_accuracy" if "final_test_accuracy" in names else "final_train_loss"
  values = result.column(metric)
  if np.isfinite(values).any():
    best = int(np.nanargmax(values) if "accuracy" in metric else np.nanargmin(values))
    summary["best"] = {"by": metric, **result.rows[best]}
  with open(os.path.join(output, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
