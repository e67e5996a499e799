"""Which shared feature each synchronous algorithm takes: the algorithm x feature matrix.

Every synchronous algorithm is `engine.compose(...)` and takes every shared option; a
few combinations are undefined and refused at build time with a ValueError that says
why. This module tries each algorithm with each feature and records the result, so
the README's table (`markdown_table()`) is generated from the code, and
tests/test_conformance.py runs every supported cell and checks what it must do.

- `ALGORITHMS`: name -> `AlgorithmSpec(build, hparams)`, the synchronous algorithms
  built from `apply` and the shared options with tiny hyperparameters. Adding an
  algorithm to the matrix (and to the conformance tests) is one entry here.
- `FEATURES`: the features, each a `Feature` saying how to build an algorithm with it
  (options for the factory, a model transform, or hyperparameters given as tracers).
- `matrix(setup)`: for each algorithm and feature, None (supported) or the refusal.
- `markdown_table(setup)`: that matrix as the README's markdown table.

Regenerate the README block with `python -m fedjax_sim.algorithms.features`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import aggregators, attacks, compression, models, privacy, robust
from fedjax_sim import secure_aggregation, sharding
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fedexp import fedexp
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.fedrep import fedrep
from fedjax_sim.algorithms.mimelite import mimelite
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.data import FederatedData, from_clients

Params = Any
Hparams = Mapping[str, Any]


# --- The algorithms ------------------------------------------------------------------


class AlgorithmSpec(NamedTuple):
  """`build(apply, hp, **options) -> FederatedAlgorithm`, where `hp` maps every name of
  `hparams` to a value (a float, or a tracer inside a sweep); `hparams`: name -> the
  values a sweep tries, the first being the default. The names are exactly the
  algorithm's `state.hp` (`FederatedAlgorithm.hparams`)."""

  build: Callable[..., FederatedAlgorithm]
  hparams: Mapping[str, tuple[float, ...]]

  def defaults(self) -> dict[str, float]:
    return {name: values[0] for name, values in self.hparams.items()}

  def grid(self) -> list[dict[str, float]]:
    """Every combination of the sweep values, in `fs.sweep`'s order (product over the
    names in order, the last varying fastest)."""
    names = list(self.hparams)
    return [dict(zip(names, v)) for v in itertools.product(*self.hparams.values())]


def _sgd(hp: Hparams) -> optax.GradientTransformation:
  """Local SGD whose learning rate is the state's `client_lr` (sweepable, schedulable)."""
  return optax.sgd(hp["client_lr"])


def _lr(hp: Hparams) -> dict:
  """The options that put `client_lr` in the state, for factories taking an optimizer."""
  return dict(client_optimizer=_sgd, extra_hparams={"client_lr": hp["client_lr"]})


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec(lambda a, hp, **o: fedavg(a, **_lr(hp), **o),
                            {"client_lr": (0.1, 0.05)}),
    "fedprox": AlgorithmSpec(lambda a, hp, **o: fedprox(a, mu=hp["mu"], **_lr(hp), **o),
                             {"mu": (0.1, 1.0), "client_lr": (0.1, 0.05)}),
    "scaffold": AlgorithmSpec(
        lambda a, hp, **o: scaffold(a, client_learning_rate=hp["client_lr"], **o),
        {"client_lr": (0.1, 0.05)}),
    "fednova": AlgorithmSpec(
        lambda a, hp, **o: fednova(a, client_learning_rate=hp["client_lr"],
                                   momentum=hp["momentum"], **o),
        {"client_lr": (0.1, 0.05), "momentum": (0.5, 0.0)}),
    "feddyn": AlgorithmSpec(lambda a, hp, **o: feddyn(a, alpha=hp["alpha"], **_lr(hp), **o),
                            {"alpha": (0.1, 0.5), "client_lr": (0.1, 0.05)}),
    "mimelite": AlgorithmSpec(
        lambda a, hp, **o: mimelite(a, client_learning_rate=hp["client_lr"],
                                    momentum=hp["momentum"],
                                    server_learning_rate=hp["server_lr"], **o),
        {"client_lr": (0.1, 0.05), "momentum": (0.5, 0.9), "server_lr": (1.0, 0.5)}),
    "ditto": AlgorithmSpec(lambda a, hp, **o: ditto(a, lam=hp["lam"], **_lr(hp), **o),
                           {"lam": (0.1, 1.0), "client_lr": (0.1, 0.05)}),
    "qffl": AlgorithmSpec(
        lambda a, hp, **o: qffl(a, q=hp["q"], client_learning_rate=hp["client_lr"], **o),
        {"q": (1.0, 0.5), "client_lr": (0.1, 0.05)}),
    "fedexp": AlgorithmSpec(lambda a, hp, **o: fedexp(a, eps=hp["eps"], **_lr(hp), **o),
                            {"eps": (1e-3, 1.0), "client_lr": (0.1, 0.05)}),
    "fedrep": AlgorithmSpec(lambda a, hp, **o: fedrep(a, head="out", **_lr(hp), **o),
                            {"client_lr": (0.1, 0.05)}),
}


# --- The setting: a tiny model and ragged clients -------------------------------------


def tiny_mlp(num_features: int = 5, hidden: int = 8, num_classes: int = 3,
             seed: int = 0) -> models.Model:
  """A 5 -> 8 -> 3 ReLU MLP as a plain pytree: {'hidden': {w, b}, 'out': {w, b}} (the
  head FedRep keeps per client is 'out')."""
  rng = np.random.default_rng(seed)
  params = {
      "hidden": {"w": jnp.asarray(rng.normal(size=(num_features, hidden)) / np.sqrt(num_features),
                                  jnp.float32),
                 "b": jnp.zeros((hidden,), jnp.float32)},
      "out": {"w": jnp.asarray(rng.normal(size=(hidden, num_classes)) / np.sqrt(hidden),
                               jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)},
  }

  def apply(params: Params, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]

  return models.Model(apply, params)


class Setup(NamedTuple):
  """What the matrix is tried on: a model, the clients' data and the shared schedule."""

  model: models.Model
  data: FederatedData
  clients_per_round: int = 8
  batch_size: int = 4
  epochs: int = 1

  @property
  def num_clients(self) -> int:
    return self.data.num_clients

  def common(self) -> dict:
    """The shared options every cell uses."""
    return dict(clients_per_round=self.clients_per_round, batch_size=self.batch_size,
                epochs=self.epochs)


# Ragged clients, one with a single example; the even ones (slow, see `profiles`) take
# 2-3 local steps an epoch, the odd ones 1-2.
SIZES = (8, 1, 8, 4, 12, 4, 6, 5, 10, 3, 7, 2, 9, 5, 11, 6)


def default_setup(sizes: tuple[int, ...] = SIZES, seed: int = 0) -> Setup:
  """The tiny MLP on 16 ragged clients, 8 per round (so that they split over 8 devices),
  one local epoch of batches of 4: what the README's table and the conformance tests use."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in sizes]
  return Setup(tiny_mlp(seed=seed), from_clients(xs, ys, num_classes=3))


# --- The features --------------------------------------------------------------------


# Systems: the even clients are slow (1 s per step of 4 examples; in the default setup
# they hold 6-12 examples, 2-3 steps), the odd ones fast (0.1 s); networks are fast
# enough not to matter. A deadline of 1.5 s then cuts the slow clients to one step
# (partial work) and leaves the fast ones whole; over-selection keeps the first reports.
SLOW_EXAMPLES_PER_S, FAST_EXAMPLES_PER_S = 4.0, 40.0
DEADLINE_S = 1.5


def profiles(num_clients: int) -> systems_lib.ClientProfiles:
  """The clients' systems: even clients slow, odd ones fast (see DEADLINE_S)."""
  speed = np.where(np.arange(num_clients) % 2, FAST_EXAMPLES_PER_S, SLOW_EXAMPLES_PER_S)
  return systems_lib.make_profiles(num_clients, examples_per_s=speed,
                                   downlink_bytes_per_s=1e9, uplink_bytes_per_s=1e9)


DP_CLIP, DP_NOISE = 0.05, 1.0
MALICIOUS = 4  # sign-flipping clients, chosen by `attacks.choose_malicious(seed=0)`


class Feature(NamedTuple):
  """One column of the matrix.

  name: the column's header.
  options: `setup -> dict` of options for the algorithm's factory.
  model: a transform of the model (mixed precision), or None.
  traced: build the algorithm inside a vmap from traced hyperparameters, as `fs.sweep`
    does (a sweep of all its own hyperparameters in one program).
  doc: what the cell runs.
  """

  name: str
  options: Callable[[Setup], dict] = lambda setup: {}
  model: Callable[[models.Model], models.Model] | None = None
  traced: bool = False
  doc: str = ""


FEATURES: tuple[Feature, ...] = (
    Feature("DP mean", lambda s: dict(aggregator=privacy.dp_mean(DP_CLIP, DP_NOISE)),
            doc="privacy.dp_mean: each client's whole upload clipped, Gaussian noise"),
    Feature("median", lambda s: dict(aggregator=robust.coordinate_median()),
            doc="robust.coordinate_median"),
    Feature("4-bit quantization", lambda s: dict(aggregator=aggregators.chain(
        compression.quantize(4), aggregators.mean())), doc="compression.quantize(4)"),
    Feature("secure mean", lambda s: dict(aggregator=secure_aggregation.secure_mean()),
            doc="secure_aggregation.secure_mean"),
    Feature("sign-flip attack", lambda s: dict(aggregator=aggregators.chain(
        attacks.sign_flip(attacks.choose_malicious(s.num_clients, count=MALICIOUS)),
        aggregators.mean())), doc="attacks.sign_flip on 4 of 16 clients"),
    Feature("deadline, partial work", lambda s: dict(systems=systems_lib.SystemsConfig(
        profiles(s.num_clients), deadline_s=DEADLINE_S, stragglers="partial")),
            doc="systems: stragglers send the steps that fit the deadline"),
    Feature("over-selection", lambda s: dict(systems=systems_lib.SystemsConfig(
        profiles(s.num_clients), over_selection=2)), doc="systems: 2 clients more, first 8 kept"),
    Feature("dropout", lambda s: dict(systems=systems_lib.SystemsConfig(
        profiles(s.num_clients), dropout=0.3)), doc="systems: clients fail to respond"),
    Feature("chunks of 1", lambda s: dict(client_chunk_size=1), doc="client_chunk_size=1"),
    Feature("sharded clients", lambda s: dict(
        client_sharding=sharding.client_sharding(sharding.client_mesh())),
            doc="client_sharding over a mesh of every device"),
    Feature("mixed precision", model=models.mixed_precision, doc="models.mixed_precision"),
    Feature("sweep", traced=True, doc="fs.sweep over all its own hyperparameters"),
)


def feature(name: str) -> Feature:
  """The Feature called `name`."""
  for f in FEATURES:
    if f.name == name:
      return f
  raise KeyError(f"no feature {name!r}; features: {[f.name for f in FEATURES]}")


def build(algorithm: str, feat: Feature | None = None, setup: Setup | None = None,
          **options) -> FederatedAlgorithm:
  """`algorithm` with its default hyperparameters and `feat` (None: no feature), on
  `setup`'s schedule; `options` override the feature's and the schedule's."""
  setup = setup or default_setup()
  spec = ALGORITHMS[algorithm]
  model = setup.model if feat is None or feat.model is None else feat.model(setup.model)
  merged = {**setup.common(), **({} if feat is None else feat.options(setup)), **options}
  return spec.build(model.apply, spec.defaults(), **merged)


def try_feature(algorithm: str, feat: Feature, setup: Setup) -> str | None:
  """None if `algorithm` takes `feat` on `setup` (built, initialised and validated;
  nothing is compiled), else the message of the ValueError that refuses it."""
  spec = ALGORITHMS[algorithm]
  key = jax.random.key(0)
  try:
    if feat.traced:
      grid = spec.grid()
      values = {name: jnp.asarray([c[name] for c in grid], jnp.float32) for name in spec.hparams}
      merged = {**setup.common(), **feat.options(setup)}
      jax.eval_shape(jax.vmap(lambda hp: spec.build(setup.model.apply, hp, **merged).init(
          setup.model.params, key, setup.num_clients)), values)
      return None
    alg = build(algorithm, feat, setup)
    state = alg.init(setup.model.params, key, setup.num_clients)
    alg.validate(state, setup.data)
  except ValueError as e:
    return str(e)
  return None


def matrix(setup: Setup | None = None) -> dict[str, dict[str, str | None]]:
  """algorithm -> feature name -> None (supported) or the reason it is refused."""
  setup = setup or default_setup()
  return {name: {f.name: try_feature(name, f, setup) for f in FEATURES} for name in ALGORITHMS}


_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def general_reason(algorithm: str, reason: str) -> str:
  """A refusal's message without the algorithm's name, so that algorithms refused for
  the same reason share a footnote."""
  return reason.replace(f"{algorithm}'s ", "the algorithm's ")


def markdown_table(setup: Setup | None = None) -> str:
  """The matrix as a markdown table (rows: algorithms, columns: features), a cell
  "yes" or "no" with a footnote number per distinct reason, the footnotes below."""
  cells = matrix(setup)
  names = [f.name for f in FEATURES]
  reasons: list[str] = []
  lines = ["| algorithm | " + " | ".join(names) + " |",
           "| --- |" + " :-: |" * len(names)]
  for algorithm, row in cells.items():
    out = []
    for name in names:
      reason = row[name]
      if reason is None:
        out.append("yes")
        continue
      reason = general_reason(algorithm, reason)
      if reason not in reasons:
        reasons.append(reason)
      out.append("no" + str(reasons.index(reason) + 1).translate(_SUPERSCRIPTS))
    lines.append(f"| {algorithm} | " + " | ".join(out) + " |")
  for i, reason in enumerate(reasons):  # one paragraph per footnote
    lines += ["", str(i + 1).translate(_SUPERSCRIPTS) + " " + reason]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(markdown_table(), end="")
