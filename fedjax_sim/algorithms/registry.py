"""Algorithms by name, built from flat hyperparameters (for the CLI and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedjax_sim import optimizers
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.mimelite import mimelite
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.scaffold import scaffold

if TYPE_CHECKING:
  from fedjax_sim.aggregators import Aggregator

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "mimelite", "ditto", "qffl")
# Algorithms whose local step is their own SGD rule (client optimizer 'sgd' only;
# FedNova also takes 'momentum') and those with their own server rule.
_OWN_LOCAL_STEP = ("scaffold", "fednova", "mimelite", "qffl")
_OWN_SERVER_STEP = ("feddyn", "mimelite", "qffl")
STATEFUL = ("scaffold", "feddyn", "ditto")  # init needs num_clients
# Asynchronous algorithms simulate client systems, so building one needs the clients'
# profiles (or their number, to draw them). Not in ALGORITHMS, whose rounds are
# synchronous ones; the CLI offers ALGORITHMS + ASYNC.
ASYNC = ("fedbuff",)
# Synchronous algorithms that take `systems=` (a systems.SystemsConfig).
WITH_SYSTEMS = ("fedavg", "fedprox")


def build_algorithm(
    name: str,
    apply: Callable,
    *,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    client_optimizer: str = "sgd",
    client_lr: float = 0.05,
    server_optimizer: str = "fedavg",
    server_lr: float = 1.0,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    mu: float = 0.01,
    feddyn_alpha: float = 0.01,
    mime_momentum: float = 0.9,
    ditto_lambda: float = 0.1,
    q: float = 1.0,
    aggregator: Aggregator | None = None,
    client_data_transform: Callable | None = None,
    concurrency: int | None = None,
    staleness: str = "polynomial",
    profiles: systems_lib.ClientProfiles | None = None,
    num_clients: int | None = None,
    profile_seed: int = 0,
    systems: systems_lib.SystemsConfig | None = None,
) -> FederatedAlgorithm:
  """Builds algorithm `name` (one of ALGORITHMS or ASYNC) from optimizer names and numbers.

  Args:
    name: the algorithm.
    apply: the model's pure apply function.
    clients_per_round, batch_size, epochs / steps, weighting, client_chunk_size:
      as in `fedavg`.
    client_optimizer, client_lr: see `optimizers.client_optimizer`; SCAFFOLD,
      MimeLite and q-FFL take 'sgd' only, FedNova 'sgd' or 'momentum'.
    server_optimizer, server_lr: see `optimizers.server_optimizer`; FedDyn and
      q-FFL have their own server rule (take 'fedavg' at lr 1), MimeLite takes
      'fedavg' with server_lr as its eta_g.
    mu: FedProx's proximal coefficient.
    feddyn_alpha: FedDyn's alpha.
    mime_momentum: MimeLite's beta.
    ditto_lambda: Ditto's lambda.
    q: q-FFL's exponent.
    aggregator: see `fedavg`; FedAvg, FedProx and Ditto (its global model) take one.
    client_data_transform: see `fedavg`; FedAvg and FedProx take one.
    concurrency, staleness: FedBuff's (see `fedbuff`); its buffer size is
      `clients_per_round` and `concurrency` defaults to it.
    profiles: FedBuff's client profiles; if None, drawn by
      `systems.sample_profiles(num_clients, seed=profile_seed)`.
    systems: fedavg's and fedprox's `systems=` (stragglers, deadline,
      over-selection, dropout; see `systems.SystemsConfig`).

  Returns:
    The FederatedAlgorithm; algorithms in STATEFUL need `init(params, key, num_clients)`.
  """
  if name not in ALGORITHMS + ASYNC:
    raise ValueError(f"unknown algorithm {name!r}; choose from {ALGORITHMS + ASYNC}")
  allowed = ("sgd", "momentum") if name == "fednova" else ("sgd",)
  if name in _OWN_LOCAL_STEP and client_optimizer not in allowed:
    raise ValueError(f"{name} defines its own local step: client optimizer must be one of "
                     f"{allowed}, got {client_optimizer!r}")
  if name in _OWN_SERVER_STEP and (server_optimizer != "fedavg"
                                   or (name != "mimelite" and server_lr != 1.0)):
    raise ValueError(f"{name} has its own server update: use server optimizer 'fedavg'"
                     + ("" if name == "mimelite" else " with server lr 1"))
  if aggregator is not None and name not in ("fedavg", "fedprox", "ditto"):
    raise ValueError(f"{name} aggregates in its own way and takes no aggregator; "
                     "aggregators work with fedavg, fedprox and ditto")
  if client_data_transform is not None and name not in ("fedavg", "fedprox"):
    raise ValueError(f"{name} takes no client data transform (data poisoning); "
                     "use fedavg or fedprox")
  if systems is not None and name not in WITH_SYSTEMS:
    raise ValueError(f"{name} takes no systems configuration (stragglers, deadline, "
                     f"over-selection, dropout); use one of {WITH_SYSTEMS}")
  hooks = dict(aggregator=aggregator, client_data_transform=client_data_transform)
  if systems is not None:
    hooks["systems"] = systems
  common = dict(clients_per_round=clients_per_round, batch_size=batch_size, epochs=epochs,
                steps=steps, weighting=weighting, client_chunk_size=client_chunk_size)
  client_opt = optimizers.client_optimizer(client_optimizer, client_lr)
  server_opt = optimizers.server_optimizer(server_optimizer, server_lr)
  if name == "fedbuff":
    if profiles is None:
      if num_clients is None:
        raise ValueError("fedbuff simulates client systems: give profiles= or num_clients= "
                         "(to draw them with systems.sample_profiles)")
      profiles = systems_lib.sample_profiles(num_clients, seed=profile_seed)
    return fedbuff(apply, client_optimizer=client_opt, server_optimizer=server_opt,
                   profiles=profiles, buffer_size=clients_per_round,
                   concurrency=clients_per_round if concurrency is None else concurrency,
                   staleness=staleness, batch_size=batch_size, epochs=epochs, steps=steps,
                   weighting=weighting, client_chunk_size=client_chunk_size)
  if name == "fedavg":
    return fedavg(apply, client_optimizer=client_opt, server_optimizer=server_opt, **common,
                  **hooks)
  if name == "fedprox":
    return fedprox(apply, mu=mu, client_optimizer=client_opt, server_optimizer=server_opt,
                   **common, **hooks)
  if name == "scaffold":
    return scaffold(apply, client_learning_rate=client_lr, server_optimizer=server_opt, **common)
  if name == "fednova":
    momentum = 0.9 if client_optimizer == "momentum" else 0.0  # client_optimizer's default
    return fednova(apply, client_learning_rate=client_lr, momentum=momentum,
                   server_optimizer=server_opt, **common)
  if name == "feddyn":
    return feddyn(apply, alpha=feddyn_alpha, client_optimizer=client_opt, **common)
  if name == "mimelite":
    return mimelite(apply, client_learning_rate=client_lr, momentum=mime_momentum,
                    server_learning_rate=server_lr, **common)
  if name == "ditto":
    return ditto(apply, lam=ditto_lambda, client_optimizer=client_opt,
                 server_optimizer=server_opt, aggregator=aggregator, **common)
  return qffl(apply, q=q, client_learning_rate=client_lr, **common)
