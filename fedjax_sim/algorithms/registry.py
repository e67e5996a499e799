"""Algorithms by name, built from flat hyperparameters (for the CLI, sweep files and
benchmarks), and the one table of the hyperparameters that exist.

`HPARAMS` is that table: one `Hparam` per numeric hyperparameter, with its name in
sweep configs (`key`, also the attribute of `fedjax-sim run`'s parsed flags), its
flag, default, help, the algorithms that use it and the check its values must pass.
`fedjax-sim run`'s flags (`add_flags`), their checks (`check_args`), the sweep
config's grid and settings (`fedjax_sim.sweep_config`) and `build_algorithm`'s
keyword arguments are all generated from it, so adding a hyperparameter is one entry
here (plus, for an algorithm's own one, the line of `build_algorithm` that passes it to
the factory).

Every synchronous algorithm takes every shared feature (an aggregator chain, `systems`,
client data transforms and schedules, chunking, sharding): `build_algorithm` passes
them to `engine.compose`, whose refusals (a reducer that ignores weights under a
server rule that divides weighted means, or under `systems`) reach the caller as its
ValueError. The constraints kept here are real: SCAFFOLD, MimeLite and q-FFL define
their own local SGD step (client optimizer 'sgd' only; FedNova 'sgd' or 'momentum'),
and FedDyn, MimeLite and q-FFL their own server rule.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


from fedjax_sim import optimizers
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms import engine
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.algorithms.fedexp import fedexp
from fedjax_sim.algorithms.fedrep import fedrep
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.mimelite import mimelite
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.aggregators import Aggregator

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "mimelite", "ditto", "qffl",
              "fedexp", "fedrep")
STATEFUL = ("scaffold", "feddyn", "ditto", "fedrep")  # init needs num_clients
# Asynchronous algorithms simulate client systems, so building one needs the clients'
# profiles (or their number, to draw them). Not in ALGORITHMS, whose rounds are
# synchronous ones; the CLI offers ALGORITHMS + ASYNC.
ASYNC = ("fedbuff",)

# The real constraints: algorithms whose local step is their own SGD rule take these
# client optimizers; those with their own server rule take server optimizer 'fedavg'
# (MimeLite's server_lr is its eta_g; FedDyn's and q-FFL's rules have no learning rate).
CLIENT_OPTIMIZERS_OF = {"scaffold": ("sgd",), "fednova": ("sgd", "momentum"),
                        "mimelite": ("sgd",), "qffl": ("sgd",)}
OWN_SERVER_RULE = ("feddyn", "mimelite", "qffl")

_FEDBUFF_ARGS = inspect.signature(fedbuff).parameters
# What FedBuff's event driver takes of the shared features (read from its signature).
_ASYNC_AGGREGATOR = ("fedbuff",) if "aggregator" in _FEDBUFF_ARGS else ()

# The optimizer hyperparameters a factory takes as its own arguments (the rest go to
# `extra_hparams`, read by the optimizers `build_algorithm` builds from `state.hp`).
_FACTORY_OWNS = {"scaffold": ("client_lr",), "fednova": ("client_lr", "client_momentum"),
                 "mimelite": ("client_lr", "server_lr"), "qffl": ("client_lr",)}

UNIT = engine.Check(lambda v: 0 <= v <= 1, "lie in [0, 1]")


class Hparam(NamedTuple):
  """A numeric hyperparameter of an algorithm, an aggregator or the systems simulation.

  key: its name in sweep configs and settings, and the attribute of the parsed flags.
  flag: its `fedjax-sim run` flag.
  default: its value when not given; None: off unless given (aggregator, systems).
  help: one line for `--help`.
  used_by: the algorithms that use it.
  part: 'algorithm' (a `build_algorithm` argument, in `state.hp`), 'aggregator'
    (`aggregation_options`) or 'systems' (`run_options`).
  check: the check every value must pass (`engine.Check`).
  state_names: algorithm -> its name in `state.hp`, where that is not `key`.
  needs: (setting, value) without which it does not apply.
  metavar: for `--help`.
  default_by: (setting, {value: default}): a default that depends on a setting (the
    server learning rate on the server optimizer); `default` for other values.
  """

  key: str
  flag: str
  default: float | None
  help: str
  used_by: tuple[str, ...]
  part: str = "algorithm"
  check: engine.Check | None = None
  state_names: Mapping[str, str] = {}
  needs: tuple[str, str] | None = None
  metavar: str | None = None
  default_by: tuple[str, Mapping[str, float]] | None = None

  def state_name(self, algorithm: str) -> str:
    return self.state_names.get(algorithm, self.key)

  def default_for(self, settings: Mapping[str, Any]) -> float | None:
    """The default given the settings (e.g. {"server_optimizer": "fedadam"})."""
    if self.default_by is None:
      return self.default
    setting, defaults = self.default_by
    return defaults.get(settings.get(setting), self.default)


_SYNC = ALGORITHMS
_ALL = ALGORITHMS + ASYNC

HPARAMS: tuple[Hparam, ...] = (
    Hparam("client_lr", "--client-lr", 0.05, "client learning rate (L = 1/lr in q-FFL)", _ALL,
           check=engine.POSITIVE),
    Hparam("server_lr", "--server-lr", 1.0,
           "server learning rate (MimeLite's eta_g); default by --server-optimizer: "
           + ", ".join(f"{k} {v:g}" for k, v in optimizers.SERVER_LR_DEFAULTS.items()),
           ("fedavg", "fedprox", "scaffold", "fednova", "mimelite", "ditto", "fedexp", "fedrep",
            "fedbuff"),
           check=engine.POSITIVE,
           default_by=("server_optimizer", optimizers.SERVER_LR_DEFAULTS)),
    Hparam("client_momentum", "--client-momentum", 0.9,
           "beta of --client-optimizer momentum (FedNova's rho)",
           ("fedavg", "fedprox", "fednova", "feddyn", "ditto", "fedexp", "fedrep", "fedbuff"),
           check=engine.FRACTION, state_names={"fednova": "momentum"},
           needs=("client_optimizer", "momentum")),
    Hparam("mu", "--mu", 0.01, "FedProx proximal coefficient", ("fedprox",),
           check=engine.NONNEGATIVE),
    Hparam("feddyn_alpha", "--feddyn-alpha", 0.01, "FedDyn alpha", ("feddyn",),
           check=engine.POSITIVE, state_names={"feddyn": "alpha"}),
    Hparam("mime_momentum", "--mime-momentum", 0.9, "MimeLite beta", ("mimelite",),
           check=engine.FRACTION, state_names={"mimelite": "momentum"}),
    Hparam("ditto_lambda", "--ditto-lambda", 0.1, "Ditto lambda", ("ditto",),
           check=engine.NONNEGATIVE, state_names={"ditto": "lam"}),
    Hparam("q", "--q", 1.0, "q-FFL exponent", ("qffl",), check=engine.NONNEGATIVE),
    Hparam("fedexp_eps", "--fedexp-eps", 1e-3, "FedExP epsilon, added to ||mean update||^2",
           ("fedexp",), check=engine.POSITIVE, state_names={"fedexp": "eps"}),
    # The aggregator chain's numeric settings (aggregation_options adds their flags).
    Hparam("clip", "--clip", None, "DP-FedAvg: L2 clipping norm of each client's update",
           _SYNC + _ASYNC_AGGREGATOR, "aggregator", engine.POSITIVE),
    Hparam("noise_multiplier", "--noise-multiplier", None,
           "DP-FedAvg: noise std over the clipping norm (needs --clip)",
           _SYNC + _ASYNC_AGGREGATOR, "aggregator", engine.NONNEGATIVE),
    Hparam("norm_bound", "--norm-bound", None,
           "clip every update to this L2 norm before aggregation",
           _SYNC + _ASYNC_AGGREGATOR, "aggregator", engine.POSITIVE),
    # The systems simulation's numeric settings (run_options adds their flags).
    Hparam("deadline", "--deadline", None,
           "simulated seconds after which a round stops waiting for clients", _SYNC, "systems",
           engine.POSITIVE, metavar="SECONDS"),
    Hparam("dropout", "--dropout", None,
           "probability that a sampled client does not respond, in [0, 1)", _SYNC, "systems",
           engine.FRACTION, metavar="P"),
    Hparam("straggler_fraction", "--straggler-fraction", None,
           "FedProx's protocol: this fraction of the sampled clients do a random fraction of "
           "their local work", _SYNC, "systems", UNIT, metavar="S"),
)
HPARAM = {h.key: h for h in HPARAMS}


def hparams_of(algorithm: str, part: str | None = None) -> tuple[Hparam, ...]:
  """The hyperparameters `algorithm` uses (of one part, or all)."""
  return tuple(h for h in HPARAMS if algorithm in h.used_by and part in (None, h.part))


def add_flags(group, part: str) -> None:
  """Adds the flags of `part`'s hyperparameters to an argparse group. Their parsed
  default is None (not given); `check_args` fills in the defaults of those used."""
  for h in HPARAMS:
    if h.part != part:
      continue
    users = "all" if set(h.used_by) >= set(_SYNC) else ", ".join(h.used_by)
    default = "" if h.default is None or h.default_by else f"; default {h.default:g}"
    h_help = f"{h.help} ({users}{default})" if part == "algorithm" else h.help
    group.add_argument(h.flag, type=float, default=None, metavar=h.metavar, help=h_help)


def check_value(where: str, h: Hparam, value: Any) -> None:
  """Raises ValueError `{where} must ...` if a concrete value fails the check."""
  try:
    engine.check_hparams({h.key: value}, {h.key: h.check} if h.check else {})
  except ValueError as e:
    raise ValueError(f"{where}{str(e)[len(h.key):]}") from None


def check_args(args: argparse.Namespace) -> None:
  """Checks the hyperparameter flags of `fedjax-sim run` against the table, naming the
  flag: a value that fails its check, a flag the algorithm does not use or whose
  setting it needs is not given; then fills in the defaults of those it uses."""
  algorithm = args.algorithm
  for h in HPARAMS:
    value = getattr(args, h.key, None)
    if value is None:
      continue
    if algorithm not in h.used_by:
      why = (" (it is asynchronous: no deadline or dropout to simulate per round)"
             if algorithm in ASYNC and h.part == "systems" else "")
      raise ValueError(f"{h.flag}: --algorithm {algorithm} does not use it{why}; it applies "
                       f"to {', '.join(h.used_by)}")
    if h.needs is not None and getattr(args, h.needs[0]) != h.needs[1]:
      raise ValueError(f"{h.flag} applies with --{h.needs[0].replace('_', '-')} {h.needs[1]}")
    check_value(h.flag, h, value)
  check_choices(algorithm, args.client_optimizer, args.server_optimizer, flags=True)
  for h in hparams_of(algorithm, "algorithm"):
    if getattr(args, h.key) is None and (h.needs is None
                                         or getattr(args, h.needs[0]) == h.needs[1]):
      setattr(args, h.key, h.default_for(vars(args)))


def algorithm_hparams(values: Any) -> dict[str, Any]:
  """`build_algorithm`'s hyperparameter arguments from parsed flags (or any object with
  the keys as attributes): those of the algorithm `values.algorithm` uses that are set."""
  return {h.key: getattr(values, h.key) for h in hparams_of(values.algorithm, "algorithm")
          if getattr(values, h.key, None) is not None}


def check_choices(name: str, client_optimizer: str, server_optimizer: str, *,
                  flags: bool = False) -> None:
  """The real constraints on an algorithm's optimizers (ValueError; naming the flag
  with `flags`)."""
  allowed = CLIENT_OPTIMIZERS_OF.get(name)
  if allowed is not None and client_optimizer not in allowed:
    where = f"--client-optimizer {client_optimizer}: " if flags else ""
    raise ValueError(f"{where}{name} defines its own local step: client optimizer must be one "
                     f"of {allowed}, got {client_optimizer!r}")
  if name in OWN_SERVER_RULE and server_optimizer != "fedavg":
    where = f"--server-optimizer {server_optimizer}: " if flags else ""
    raise ValueError(f"{where}{name} has its own server update: use server optimizer 'fedavg'"
                     + ("" if name == "mimelite" else " with server lr 1"))


def build_algorithm(
    name: str,
    apply: Callable,
    *,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    client_optimizer: str = "sgd",
    server_optimizer: str = "fedavg",
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    aggregator: Aggregator | None = None,
    client_data_transform: Callable | None = None,
    client_data_schedule: Callable | None = None,
    client_sharding: Any = None,
    systems: systems_lib.SystemsConfig | None = None,
    hparam_schedule: Callable | None = None,
    concurrency: int | None = None,
    staleness: str | None = None,
    profiles: systems_lib.ClientProfiles | None = None,
    num_clients: int | None = None,
    profile_seed: int | None = None,
    fedrep_head: Any = None,
    **hparams: float,
) -> FederatedAlgorithm:
  """Builds algorithm `name` (one of ALGORITHMS or ASYNC) from optimizer names and numbers.

  Args:
    name: the algorithm.
    apply: the model's pure apply function.
    clients_per_round, batch_size, epochs / steps, weighting, client_chunk_size,
      aggregator, client_data_transform, client_data_schedule, client_sharding,
      systems, hparam_schedule: as in `fedavg` (`engine.compose`); every synchronous
      algorithm takes them all.
    client_optimizer: see `optimizers.client_optimizer`; SCAFFOLD, MimeLite and
      q-FFL take 'sgd' only, FedNova 'sgd' or 'momentum'.
    server_optimizer: see `optimizers.server_optimizer`; FedDyn, MimeLite and
      q-FFL have their own server rule (take 'fedavg').
    concurrency, staleness: FedBuff's (see `fedbuff`); its buffer size is
      `clients_per_round`, `concurrency` defaults to it and `staleness` to 'polynomial'.
    profiles: FedBuff's client profiles; if None, drawn by
      `systems.sample_profiles(num_clients, seed=profile_seed)` (seed 0 by default).
    fedrep_head: FedRep's `head=` (parameter names or a mask function); default "out",
      the output layer of `models.mlp`, `cnn` and `char_rnn`.
    **hparams: the algorithm hyperparameters of `HPARAMS` by key (`client_lr`,
      `server_lr`, `client_momentum`, `mu`, `feddyn_alpha`, `mime_momentum`,
      `ditto_lambda`, `q`, `fedexp_eps`), defaults from the table. One that `name` does not use (or
      `client_momentum` without client optimizer 'momentum') is a ValueError, as are
      FedBuff's and FedRep's own arguments given to another algorithm: nothing given is
      silently ignored. Values may be traced (a sweep builds the algorithm inside its
      program).

  Returns:
    The FederatedAlgorithm, every numeric hyperparameter in `state.hp` (the client and
    server optimizers are built each round from `client_lr`, `server_lr` and
    `client_momentum` there); algorithms in STATEFUL need `init(params, key, num_clients)`.
  """
  if name not in ALGORITHMS + ASYNC:
    raise ValueError(f"unknown algorithm {name!r}; choose from {ALGORITHMS + ASYNC}")
  unknown = sorted(set(hparams) - {h.key for h in HPARAMS if h.part == "algorithm"})
  if unknown:
    raise ValueError(f"unknown hyperparameters {unknown}; choose from "
                     f"{[h.key for h in HPARAMS if h.part == 'algorithm']}")
  chosen = {"client_optimizer": client_optimizer, "server_optimizer": server_optimizer}
  for h in HPARAMS:
    if h.key in hparams and hparams[h.key] is not None and h.part == "algorithm":
      if name not in h.used_by:
        raise ValueError(f"{name} does not use {h.key}; it applies to {', '.join(h.used_by)}")
      if h.needs is not None and chosen[h.needs[0]] != h.needs[1]:
        raise ValueError(f"{h.key} applies with {h.needs[0]}={h.needs[1]!r}, got "
                         f"{chosen[h.needs[0]]!r}")
  hparams = {k: v for k, v in hparams.items() if v is not None}
  own = {"concurrency": concurrency, "staleness": staleness, "profiles": profiles,
         "profile_seed": profile_seed}
  given = [k for k, v in own.items() if v is not None]
  if given and name not in ASYNC:
    raise ValueError(f"{', '.join(given)}: fedbuff's (asynchronous) arguments; {name} does not "
                     f"use them")
  if fedrep_head is not None and name != "fedrep":
    raise ValueError(f"fedrep_head: FedRep's argument; {name} does not use it")
  staleness = "polynomial" if staleness is None else staleness
  fedrep_head = "out" if fedrep_head is None else fedrep_head
  profile_seed = 0 if profile_seed is None else profile_seed
  optimizers.client_optimizer(client_optimizer, 1.0)  # its name check
  optimizers.server_optimizer(server_optimizer, 1.0)
  check_choices(name, client_optimizer, server_optimizer)
  v = {h.key: hparams.get(h.key, h.default_for(chosen)) for h in HPARAMS
       if h.part == "algorithm"}
  if (name not in HPARAM["server_lr"].used_by and name not in ASYNC
      and engine.is_concrete(v["server_lr"]) and float(v["server_lr"]) != 1.0):
    raise ValueError(f"{name} has its own server update: use server optimizer 'fedavg' with "
                     f"server lr 1")
  settings = {"client_optimizer": client_optimizer, "server_optimizer": server_optimizer}
  used = [h for h in hparams_of(name, "algorithm")
          if h.needs is None or settings[h.needs[0]] == h.needs[1]]
  for h in used:
    check_value(h.key, h, v[h.key])
  momentum = v["client_momentum"] if client_optimizer == "momentum" else None

  if name == "fedbuff":
    if profiles is None:
      if num_clients is None:
        raise ValueError("fedbuff simulates client systems: give profiles= or num_clients= "
                         "(to draw them with systems.sample_profiles)")
      profiles = systems_lib.sample_profiles(num_clients, seed=profile_seed)
    extra = {}
    for option, value in (("aggregator", aggregator), ("systems_config", systems),
                          ("client_data_transform", client_data_transform),
                          ("client_data_schedule", client_data_schedule),
                          ("client_sharding", client_sharding),
                          ("hparam_schedule", hparam_schedule)):
      if value is None:
        continue
      if option not in _FEDBUFF_ARGS:
        raise ValueError(f"fedbuff takes no {option}: its asynchronous event driver "
                         f"aggregates in its own way")
      extra[option] = value
    client_opt = optimizers.client_optimizer(client_optimizer, v["client_lr"],
                                             **({} if momentum is None else
                                                {"momentum": momentum}))
    return fedbuff(apply, client_optimizer=client_opt,
                   server_optimizer=optimizers.server_optimizer(server_optimizer, v["server_lr"]),
                   profiles=profiles, buffer_size=clients_per_round,
                   concurrency=clients_per_round if concurrency is None else concurrency,
                   staleness=staleness, batch_size=batch_size, epochs=epochs, steps=steps,
                   weighting=weighting, client_chunk_size=client_chunk_size, **extra)

  # Every hyperparameter in state.hp: optimizers built each round from it.
  def client_opt(hp):
    kwargs = {} if momentum is None else {"momentum": hp["client_momentum"]}
    return optimizers.client_optimizer(client_optimizer, hp["client_lr"], **kwargs)

  def server_opt(hp):
    return optimizers.server_optimizer(server_optimizer, hp["server_lr"])

  extra = [h for h in used if h.key in ("client_lr", "server_lr", "client_momentum")
           and h.key not in _FACTORY_OWNS.get(name, ())]
  extra_hparams = {h.key: v[h.key] for h in extra}
  common = dict(clients_per_round=clients_per_round, batch_size=batch_size, epochs=epochs,
                steps=steps, weighting=weighting, client_chunk_size=client_chunk_size,
                aggregator=aggregator, client_data_transform=client_data_transform,
                client_data_schedule=client_data_schedule, client_sharding=client_sharding,
                systems=systems, hparam_schedule=hparam_schedule, extra_hparams=extra_hparams,
                extra_hparam_checks={h.key: h.check for h in extra if h.check is not None})
  if name == "fedavg":
    return fedavg(apply, client_optimizer=client_opt, server_optimizer=server_opt, **common)
  if name == "fedprox":
    return fedprox(apply, mu=v["mu"], client_optimizer=client_opt, server_optimizer=server_opt,
                   **common)
  if name == "scaffold":
    return scaffold(apply, client_learning_rate=v["client_lr"], server_optimizer=server_opt,
                    **common)
  if name == "fednova":
    return fednova(apply, client_learning_rate=v["client_lr"],
                   momentum=0.0 if momentum is None else momentum, server_optimizer=server_opt,
                   **common)
  if name == "feddyn":
    return feddyn(apply, alpha=v["feddyn_alpha"], client_optimizer=client_opt, **common)
  if name == "mimelite":
    return mimelite(apply, client_learning_rate=v["client_lr"], momentum=v["mime_momentum"],
                    server_learning_rate=v["server_lr"], **common)
  if name == "ditto":
    return ditto(apply, lam=v["ditto_lambda"], client_optimizer=client_opt,
                 server_optimizer=server_opt, **common)
  if name == "fedexp":
    return fedexp(apply, client_optimizer=client_opt, eps=v["fedexp_eps"],
                  server_optimizer=server_opt, **common)
  if name == "fedrep":
    return fedrep(apply, head=fedrep_head, client_optimizer=client_opt,
                  server_optimizer=server_opt, **common)
  return qffl(apply, q=v["q"], client_learning_rate=v["client_lr"], **common)
