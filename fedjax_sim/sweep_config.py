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
- `algorithm`: any synchronous algorithm of `fedjax-sim run` (`fedavg`, the default,
  `fedprox`, `scaffold`, `fednova`, `feddyn`, `mimelite`, `ditto`, `qffl`, `fedexp`,
  `fedrep`), or a server
  optimizer's name as a shorthand for FedAvg with it (`fedavgm`, `fedadagrad`,
  `fedadam`, `fedyogi`). FedBuff, asynchronous, is refused.
- `settings`: fixed values. Their names, kinds and defaults are those of
  `fedjax-sim run`'s flags (generated from its parser, so every flag of the run is a
  setting): `rounds` (default 50 here), `clients_per_round`, `epochs` or `steps`,
  `batch_size`, `client_optimizer`, `server_optimizer`, `weighting`,
  `client_chunk_size`, `eval_every`, `model`, the hyperparameters of the table
  `algorithms.registry.HPARAMS` (`client_lr`, `server_lr`, `client_momentum`, `mu`,
  `feddyn_alpha`, `mime_momentum`, `ditto_lambda`, `q`, `fedexp_eps`), the aggregator chain's
  (`aggregator`, `clip`, `noise_multiplier`, `target_epsilon`, `norm_bound`,
  `quantize_bits`, `attack`...), the systems simulation's (`deadline`, `dropout`,
  `straggler_fraction`, `over_selection`, `stragglers`, `profiles_seed`...),
  `mixed_precision`, `conv_impl`, task options; plus `init_seed`: the seed of the task,
  of the initial model and of the malicious clients' draw, which every row shares
  (default 0). Not the run's `seed`, `output`, FedBuff's or the warm start's flags.
- `grid`: traced hyperparameters, name -> list of numbers: any entry of
  `HPARAMS` the algorithm uses, algorithm (client and server learning rates, mu,
  FedDyn's alpha, q, Ditto's lambda, MimeLite's and the client optimizer's momentum),
  aggregator (`clip`, `noise_multiplier`, `norm_bound`) or systems (`deadline`,
  `dropout`, `straggler_fraction`). Their product times `seeds` is one vmapped program.
- `seeds`: the seeds of each configuration's `jax.random.key(seed)` (client sampling and
  shuffling); default [0].
- `static`: optional settings, name -> list of values, one compilation per combination:
  those that change shapes or structure (`clients_per_round`, `batch_size`, `epochs`,
  `steps`, `client_chunk_size`, `client_optimizer`, `server_optimizer`,
  `over_selection`, `aggregator`, `quantize_bits`...), or any hyperparameter. Not
  `rounds`, `eval_every`, `init_seed` or the model settings, which every row shares.
- `output`: the output directory (default `runs/sweep-<config file name>`).
- `plot`: a metric to plot per round for every row (`test_accuracy`, `train_loss`...),
  or false (the default).

Every mistake (an unknown key, task or algorithm, an empty grid, a value that is not a
number, a hyperparameter the algorithm does not use or whose check it fails...) is
reported naming the file and the key before the task loads; combinations of settings
are built with concrete values and checked (with `fedjax-sim run`'s checks and
messages) before anything compiles.

With DP (`noise_multiplier`, or `target_epsilon` alone, which calibrates it), each row
gets `final_epsilon` from the accountant. `target_epsilon` with a noise multiplier
(which stops a run early) is refused: every row runs `rounds` rounds.

The row with seed s equals `fedjax-sim run` with the same settings and `--seed s` when
s is `init_seed` (tested): `run` seeds the initial model with its `--seed`, a sweep
shares one initial model across seeds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import functools
import io
import itertools
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedjax_sim import aggregation_options, checkpoint, optimizers, run_options, tasks
from fedjax_sim.algorithms import registry
from fedjax_sim.algorithms.registry import build_algorithm

TOP_KEYS = ("task", "algorithm", "settings", "grid", "seeds", "static", "output", "plot")
# A server optimizer's name as the algorithm: FedAvg with that server optimizer.
SERVER_ALIASES = tuple(o for o in optimizers.SERVER_OPTIMIZERS if o != "fedavg")
# `fedjax-sim run`'s flags that are not settings of a sweep.
_NOT_SETTINGS = ("help", "task", "algorithm", "output", "no_progress", "seed", "concurrency",
                 "staleness", "warm_start_steps", "server_examples", "warm_start_lr",
                 "init_params", "save_params", "tensorboard", "wandb", "wandb_mode")
# Settings every row shares (the model and its initial parameters, the run's length).
NOT_STATIC = ("rounds", "eval_every", "init_seed", "model", "mixed_precision", "conv_impl",
              "profiles")
# Settings always written to config.json (the rest when not at their default).
_CORE = ("rounds", "clients_per_round", "epochs", "steps", "batch_size", "client_optimizer",
         "server_optimizer", "weighting", "client_chunk_size", "eval_every", "model",
         "init_seed")
_SWEEP_DEFAULTS = {"rounds": 50}


@functools.cache
def settings_spec() -> dict[str, tuple[Any, Any]]:
  """name -> (kind, default) of every setting, generated from `fedjax-sim run`'s parser;
  kinds: int, number, bool, str, chunk, or a tuple of choices. The hyperparameters of
  `registry.HPARAMS` default to None here (their table default when the algorithm uses
  them: see `parse_config`)."""
  parser = argparse.ArgumentParser(add_help=False)
  run_options.add_run_flags(parser)
  spec: dict[str, tuple[Any, Any]] = {}
  for action in parser._actions:  # pylint: disable=protected-access
    name = action.dest
    if name in _NOT_SETTINGS or name in run_options.TASK_OPTIONS:
      continue
    if action.nargs == 0:
      kind = "bool"
    elif action.choices:
      kind = tuple(action.choices)
    elif action.type is int:
      kind = "int"
    elif action.type is float:
      kind = "number"
    elif action.type is run_options.chunk_size_arg:
      kind = "chunk"
    else:
      kind = "str"
    spec[name] = (kind, _SWEEP_DEFAULTS.get(name, action.default))
  spec["init_seed"] = ("int", 0)
  return spec


@functools.cache
def _run_defaults() -> dict[str, Any]:
  parser = argparse.ArgumentParser(add_help=False)
  run_options.add_run_flags(parser)
  return vars(parser.parse_args([]))


class ConfigError(ValueError):
  """A sweep config that cannot run; the message names the file and the key."""


@dataclasses.dataclass
class SweepConfig:
  """A checked sweep config (see the module docstring for the keys)."""

  task: str
  algorithm: str                      # a synchronous algorithm of registry.ALGORITHMS
  settings: dict[str, Any]            # every setting, defaults filled in
  task_options: dict[str, Any]        # passed to tasks.load_task
  grid: dict[str, list[float]]
  seeds: list[int]
  static: dict[str, list[Any]]
  output: str | None
  plot: str | None
  source: str = "config"
  label: str = ""                     # the algorithm as the config named it (e.g. 'fedadam')

  def to_json(self) -> dict[str, Any]:
    """The config with its defaults filled in, in the file's own format: the core
    settings and the algorithm's hyperparameters always, the rest when not default."""
    spec = settings_spec()
    used = {h.key for h in registry.hparams_of(self.algorithm, "algorithm")}
    settings = {}
    for k, v in {**self.settings, **self.task_options}.items():
      if v is None or k in self.grid or k in self.static:
        continue
      if k in _CORE or k in used or k not in spec or v != spec[k][1]:
        settings[k] = v
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
    if value not in ("auto", "all") and (not isinstance(value, int) or isinstance(value, bool)
                                         or value <= 0):
      raise ConfigError(f"{where} must be a positive integer, \"auto\" or \"all\", "
                        f"got {value!r}")
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


def _applies(h: registry.Hparam, settings: Mapping[str, Any],
             static: Mapping[str, list] | None = None) -> bool:
  """Whether `h`'s `needs` can hold: in the settings, or in some static combination."""
  if h.needs is None:
    return True
  name, value = h.needs
  return settings.get(name) == value or value in (static or {}).get(name, [])


def parse_config(raw: Any, source: str = "config") -> SweepConfig:
  """Checks a raw config mapping and fills in defaults.

  Raises:
    ConfigError: naming `source` and the key at fault.
  """
  spec = settings_spec()
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
  elif algorithm in registry.ASYNC:
    raise ConfigError(f"{source}: algorithm {algorithm!r} is asynchronous (its own event "
                      "clock and buffer, no synchronous rounds to vmap); a sweep runs the "
                      f"synchronous algorithms: {', '.join(registry.ALGORITHMS)}")
  elif algorithm not in registry.ALGORITHMS:
    raise ConfigError(f"{source}: unknown algorithm {algorithm!r}; choose from "
                      f"{', '.join([*registry.ALGORITHMS, *SERVER_ALIASES])}")

  def check_hparam(where: str, name: str, value) -> float:
    h = registry.HPARAM[name]
    if algorithm not in h.used_by:
      raise ConfigError(f"{where}: {algorithm} does not use {name} (it applies to "
                        f"{', '.join(h.used_by)})")
    if not _is_number(value):
      raise ConfigError(f"{where} must hold finite numbers, got {value!r}")
    try:
      registry.check_value(name, h, value)
    except ValueError as e:
      raise ConfigError(f"{where}: {e}") from None
    return float(value)

  settings_raw = _mapping(f"{source}: settings", raw.get("settings", {}))
  allowed_settings = (*spec, *task_option_names)
  settings = {name: default for name, (_, default) in spec.items()}
  task_options: dict[str, Any] = {}
  for name, value in settings_raw.items():
    if name == "seed":
      raise ConfigError(f"{source}: settings: 'seed' is not a setting: list the seeds under "
                        "'seeds', and the seed of the task and initial model is 'init_seed'")
    if name not in allowed_settings:
      raise _unknown(f"{source}: settings (task {task!r})", name, allowed_settings)
    if name in registry.HPARAM:
      settings[name] = check_hparam(f"{source}: settings.{name}", name, value)
    elif name in spec:
      settings[name] = _check_value(f"{source}: settings.{name}", spec[name][0], value)
      if name == "init_seed" and not 0 <= settings[name] < 2 ** 32:  # not --seed's error
        raise ConfigError(f"{source}: settings.init_seed must be an integer in [0, 2^32), "
                          f"got {value!r}")
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

  static_raw = _mapping(f"{source}: static", raw.get("static", {}))
  static: dict[str, list[Any]] = {}
  for name, values in static_raw.items():
    if name in NOT_STATIC:
      raise ConfigError(f"{source}: static.{name}: every row of a sweep shares it (one model, "
                        "initial parameters and schedule of rounds): set it in settings")
    if name not in spec:
      raise _unknown(f"{source}: static", name, [n for n in spec if n not in NOT_STATIC])
    if name in settings_raw:
      raise ConfigError(f"{source}: {name} is both in static and in settings")
    if name == "server_optimizer" and alias_server is not None:
      raise ConfigError(f"{source}: algorithm {alias_server!r} fixes the server optimizer; "
                        "use algorithm 'fedavg' to list server optimizers under static")
    if not isinstance(values, list) or not values:
      raise ConfigError(f"{source}: static.{name} must be a non-empty list, got {values!r}")
    if name in registry.HPARAM:
      static[name] = [check_hparam(f"{source}: static.{name}", name, v) for v in values]
    else:
      static[name] = [_check_value(f"{source}: static.{name}", spec[name][0], v)
                      for v in values]
    if any(v in static[name][:i] for i, v in enumerate(static[name])):
      # as for the grid: a repeat compiled the same program twice and repeated its rows
      raise ConfigError(f"{source}: static.{name} repeats a value: {values!r}")

  traceable = [h.key for h in registry.HPARAMS
               if algorithm in h.used_by and _applies(h, settings, static)]
  if "grid" not in raw:
    raise ConfigError(f"{source}: no 'grid': give the traced hyperparameters to sweep, e.g. "
                      '"grid": {"client_lr": [0.01, 0.1]}')
  grid_raw = _mapping(f"{source}: grid", raw["grid"])
  if not grid_raw:
    raise ConfigError(f"{source}: grid is empty: give at least one of "
                      f"{', '.join(traceable)} with a list of values")
  grid: dict[str, list[float]] = {}
  for name, values in grid_raw.items():
    if name not in registry.HPARAM:
      if name in spec or name in task_option_names:
        raise ConfigError(f"{source}: grid.{name}: not a traced hyperparameter; it changes "
                          "shapes or structure (shape-changing settings go under 'static'); "
                          f"traced for {algorithm}: {', '.join(traceable)}")
      raise _unknown(f"{source}: grid ({algorithm})", name, traceable)
    if name in settings_raw:
      raise ConfigError(f"{source}: {name} is both in settings and in grid")
    if name in static:
      raise ConfigError(f"{source}: {name} is both in static and in grid")
    if not isinstance(values, list):
      raise ConfigError(f"{source}: grid.{name} must be a list of numbers, got {values!r}")
    if not values:
      raise ConfigError(f"{source}: grid.{name} is empty: give at least one value")
    grid[name] = [check_hparam(f"{source}: grid.{name}", name, v) for v in values]
    if len(set(values)) != len(values):
      raise ConfigError(f"{source}: grid.{name} repeats a value: {values!r}")

  # The algorithm's hyperparameters: its table defaults, where they apply.
  for h in registry.hparams_of(algorithm):
    if not _applies(h, settings, static):
      if settings.get(h.key) is not None or h.key in grid:
        raise ConfigError(f"{source}: {h.key} applies with {h.needs[0]} {h.needs[1]!r}")
    elif h.key in grid:
      others = [v for v in static.get(h.needs[0], []) if v != h.needs[1]] if h.needs else []
      if others:  # its rows there would be one run under several labels
        raise ConfigError(f"{source}: grid.{h.key} applies with {h.needs[0]} {h.needs[1]!r} "
                          f"alone, but static.{h.needs[0]} also lists {others!r}: sweep those "
                          f"in a config of their own")
    elif settings[h.key] is None and h.default is not None:
      if h.default_by is not None and h.default_by[0] in static:
        continue  # its default depends on the static combination: build_algorithm's
      settings[h.key] = h.default_for(settings)
  if "server_lr" in grid and settings["attack"] == "backdoor":
    raise ConfigError(f"{source}: grid.server_lr: the backdoor attack's model replacement "
                      "checks the server learning rate in Python (attacks.model_replacement), "
                      "so it cannot be traced with it; list server_lr under 'static'")
  dp_noise = settings["noise_multiplier"] is not None or any(
      k == "noise_multiplier" for k in [*grid, *static])
  if settings["target_epsilon"] is not None and dp_noise:
    raise ConfigError(f"{source}: target_epsilon with a noise multiplier stops a run where its "
                      "budget ends, but every row of a sweep runs `rounds` rounds: give "
                      "target_epsilon alone (it calibrates the noise multiplier) or "
                      "noise_multiplier")

  seeds = raw.get("seeds", [0])
  if (not isinstance(seeds, list) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 32
                 for s in seeds)):
    raise ConfigError(f"{source}: seeds must be a non-empty list of integers in [0, 2^32) "
                      f"(jax's keys take 32 bits), got {seeds!r}")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"{source}: seeds repeats a seed: {seeds!r}")

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


def _product(values: Mapping[str, list]) -> list[dict[str, Any]]:
  names = list(values)
  return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


class Builder:
  """Builds a sweep's algorithms, as `fedjax-sim run` builds its one, from the config's
  settings and a configuration's values (grid values traced inside the program).

  Args:
    config: the checked SweepConfig.
    apply: the model's apply function.
    task: the loaded task (its training data, number of classes).
  """

  def __init__(self, config: SweepConfig, apply: Callable, task: tasks.Task):
    self.config, self.apply, self.task = config, apply, task
    self._calibrated: dict[tuple, float] = {}

  def values(self, configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with a configuration's grid and static values."""
    return {**self.config.settings,
            **{k: v for k, v in configuration.items() if k in self.config.settings}}

  def namespace(self, configuration: Mapping[str, Any], *, calibrate: bool = True,
                keep_unused: bool = False) -> argparse.Namespace:
    """The parsed `fedjax-sim run` flags these values mean (`--seed` is `init_seed`). A
    target epsilon is replaced by the noise multiplier it calibrates (once per static
    combination), unless `calibrate` is False. A setting that has no effect in this
    combination (`run_options.unused_flags`; `check` refuses one that has none in any) is
    left out, unless `keep_unused`."""
    config = self.config
    args = argparse.Namespace(**_run_defaults())
    args.task, args.algorithm = config.task, config.algorithm
    values = self.values(configuration)
    for name, value in {**values, **config.task_options}.items():
      setattr(args, name, value)
    args.seed = values["init_seed"]
    if args.client_chunk_size == "all":
      args.client_chunk_size = None
    for h in registry.HPARAMS:  # not those whose setting is not this combination's
      if h.needs is not None and getattr(args, h.needs[0]) != h.needs[1]:
        setattr(args, h.key, None)
    if not keep_unused:
      for flag, _ in run_options.unused_flags(args):
        setattr(args, flag[2:].replace("-", "_"), None if flag != "--rotate" else False)
    if calibrate and args.target_epsilon is not None and args.noise_multiplier is None:
      key = tuple(sorted((k, configuration[k]) for k in config.static if k in configuration))
      if key not in self._calibrated:
        self._calibrated[key] = self._setup(args).noise_multiplier
      args.noise_multiplier, args.target_epsilon = self._calibrated[key], None
    return args

  def _setup(self, args: argparse.Namespace) -> aggregation_options.Setup:
    train = self.task.train
    return aggregation_options.build(args, num_clients=train.num_clients,
                                     num_classes=self.task.num_classes, train_x=train.x,
                                     rounds=args.rounds)

  def build(self, configuration: Mapping[str, Any]):
    """(FederatedAlgorithm, aggregation_options.Setup) of one configuration; its
    numeric values may be traced."""
    import jax
    args = self.namespace(configuration)
    num_clients = self.task.train.num_clients
    # Called inside the sweep's traced init and round: what depends on concrete values
    # alone (the profiles' draw, the backdoor trigger from the data's range) is computed
    # now, as in `fedjax-sim run`, not staged into the trace (where jax 0.12 makes even a
    # constant's jnp ops tracers, and the host-side checks of their values fail).
    with jax.ensure_compile_time_eval():
      setup = self._setup(args)
      profiles = run_options.build_profiles(args, num_clients)
    systems_config = run_options.build_systems(args, profiles, setup.aggregator)
    algorithm = build_algorithm(
        args.algorithm, self.apply, client_optimizer=args.client_optimizer,
        server_optimizer=args.server_optimizer, clients_per_round=args.clients_per_round,
        batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
        weighting=args.weighting, client_chunk_size=args.client_chunk_size,
        aggregator=setup.aggregator, client_data_transform=setup.client_data_transform,
        systems=systems_config, **registry.algorithm_hparams(args))
    return algorithm, setup

  def factory(self) -> Callable:
    """`hparams -> FederatedAlgorithm` for `fs.sweep`."""
    return lambda hparams: self.build(hparams)[0]

  def check(self, params: Any) -> list[str]:
    """Builds every grid value and static combination with concrete numbers, with
    `fedjax-sim run`'s checks and messages, and validates one state per static
    combination on the data, before anything compiles. Returns the notes of the
    first build (malicious clients, a calibrated noise multiplier) and the warnings of
    every other (DP noise that dwarfs the signal), naming the configuration.

    Raises:
      ConfigError: naming the file and the values refused.
    """
    import jax

    config, train = self.config, self.task.train
    first = {name: values[0] for name, values in config.grid.items()}
    probes = [first] + [{**first, name: v} for name, values in config.grid.items()
                        for v in values[1:]]
    notes: list[str] = []
    # A setting that has no effect in any static combination is a mistake.
    unused: dict[str, str] | None = None
    for static in _product(config.static) or [{}]:
      args = self.namespace({**first, **static}, calibrate=False, keep_unused=True)
      found = dict(run_options.unused_flags(args))
      unused = found if unused is None else {f: n for f, n in unused.items() if f in found}
    for flag, needs in (unused or {}).items():
      name = flag[2:].replace("-", "_")
      where = "static" if name in config.static else "settings"
      raise ConfigError(f"{config.source}: {where}.{name} has no effect: it applies with "
                        f"{needs}")
    for static in _product(config.static) or [{}]:
      for hp in probes:
        configuration = {**hp, **static}
        where = ", ".join(f"{k}={val}" for k, val in {**static, **hp}.items())
        try:
          args = self.namespace(configuration, calibrate=False)
          run_options.check_flags(args)
          run_options.check_with_data(args, train.num_clients)
          algorithm, setup = self.build(configuration)
        except (ValueError, FileNotFoundError) as e:
          raise ConfigError(f"{config.source}: {where}: {e}") from None
        notes = notes or list(setup.notes)
        for note in setup.notes:  # every configuration's warnings (DP noise...), named
          if note.startswith("warning: ") and note not in notes:
            notes.append(f"warning: {where}: {note[len('warning: '):]}")
      try:
        algorithm.validate(algorithm.init(params, jax.random.key(0), train.num_clients), train)
      except ValueError as e:
        raise ConfigError(f"{config.source}: {where}: {e}") from None
    return notes

  def epsilon(self, row: Mapping[str, Any]) -> float | None:
    """The privacy spent by a row's `rounds` rounds (None without DP)."""
    args = self.namespace(row)
    if args.noise_multiplier is None:
      return None
    return self._setup(args).accountant.epsilon(args.rounds)


def make_algorithm_factory(config: SweepConfig, apply: Callable, task: tasks.Task) -> Callable:
  """`hparams -> FederatedAlgorithm` for `fs.sweep`, with the grid's values traced (see
  `Builder`): `build_algorithm` keeps every hyperparameter in `state.hp`, and the
  aggregator's and systems' numeric settings are traced where they are used."""
  return Builder(config, apply, task).factory()


def check_algorithms(config: SweepConfig, apply: Callable, params: Any, task: tasks.Task
                     ) -> list[str]:
  """`Builder(config, apply, task).check(params)`."""
  return Builder(config, apply, task).check(params)


def write_results(result, config: SweepConfig, output: str, extra: dict[str, Any]) -> dict:
  """Writes curves.npz, summary.json and results.csv (one row per configuration and
  seed), each atomically and results.csv last: a folder with results.csv has them all."""
  os.makedirs(output, exist_ok=True)
  names = list(dict.fromkeys(k for row in result.rows for k in row))
  tmp = os.path.join(output, f"curves.tmp{os.getpid()}.npz")
  np.savez(tmp, eval_rounds=result.eval_rounds,
           **{f"round_{k}": v for k, v in result.curves.items()},
           **{f"eval_{k}": v for k, v in result.eval_curves.items()})
  os.replace(tmp, os.path.join(output, "curves.npz"))
  summary = {"configurations": len(result.rows), "rounds": config.settings["rounds"],
             "seconds_per_compilation": [round(s, 3) for s in result.seconds],
             "eval_rounds": [int(r) for r in result.eval_rounds], **extra}
  metric = "final_test_accuracy" if "final_test_accuracy" in names else "final_train_loss"
  values = result.column(metric)
  # A diverged row is never the best.
  values = np.where([bool(r.get("diverged")) for r in result.rows], np.nan, values)
  if np.isfinite(values).any():
    best = int(np.nanargmax(values) if "accuracy" in metric else np.nanargmin(values))
    summary["best"] = {"by": metric, **result.rows[best]}
  checkpoint.write_json_atomic(os.path.join(output, "summary.json"), summary)
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=names)
  writer.writeheader()
  writer.writerows(result.rows)
  checkpoint.write_text_atomic(os.path.join(output, "results.csv"), table.getvalue())
  return summary
