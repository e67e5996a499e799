"""The CLI's privacy, compression, robustness and attack flags, turned into an aggregator
chain, a client data hook and a privacy accountant.

`add_flags(parser)` adds the flags; `build(args, task, rounds)` returns a `Setup`.
The chain runs, in order: the attack on updates, norm bounding, top-k, quantization,
then the reducer (the DP mean when a noise multiplier or a target epsilon is given,
else `--aggregator`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedjax_sim import aggregators, attacks, compression, privacy, robust
from fedjax_sim import secure_aggregation
from fedjax_sim.algorithms import engine, registry

# The defaults of the flags whose parsed default is None (see `value`).
DEFAULTS = {"trim_fraction": 0.1, "secagg_dropout": 0.0, "malicious_fraction": 0.0,
            "attack_scale": 10.0, "accountant": "rdp"}
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
               "secure_mean")
ATTACKS = ("none", "label_flip", "sign_flip", "scaling", "backdoor")
KRUMS = ("krum", "multi_krum")  # sized by --malicious-fraction, with or without an attack


class Setup(NamedTuple):
  aggregator: aggregators.Aggregator | None       # None: fedavg's fused mean
  client_data_transform: Callable | None
  accountant: privacy.DPAccountant | None          # the runner's round_metrics
  rounds: int                                      # after a target epsilon's stop
  noise_multiplier: float | None                   # as given or calibrated
  backdoor: attacks.Backdoor | None                # to measure backdoor accuracy
  notes: list[str]                                 # what was decided, for the user


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the flags of privacy, compression, robust aggregation and attacks."""
  g = parser.add_argument_group("privacy, compression, robustness and attacks")
  g.add_argument("--aggregator", default="mean", choices=AGGREGATORS,
                 help="how the server combines the client updates")
  g.add_argument("--trim-fraction", type=float, default=None,
                 help=f"--aggregator trimmed_mean: the fraction beta trimmed at each end "
                      f"(default {DEFAULTS['trim_fraction']:g})")
  registry.add_flags(g, "aggregator")  # --clip, --noise-multiplier, --norm-bound
  g.add_argument("--adaptive-clip", action="store_true",
                 help="DP-FedAvg: track the median update norm (Andrew et al. 2021)")
  g.add_argument("--target-epsilon", type=float, default=None,
                 help="with --noise-multiplier: stop when epsilon would exceed it; "
                      "without: calibrate the noise multiplier to reach it after --rounds")
  g.add_argument("--delta", type=float, default=None,
                 help="DP delta (default 0.1 / number of clients)")
  g.add_argument("--accountant", default=None, choices=privacy.ACCOUNTANTS,
                 help=f"DP accountant (default {DEFAULTS['accountant']})")
  g.add_argument("--quantize-bits", type=int, default=None,
                 help="stochastic uniform quantization of each update to this many bits")
  g.add_argument("--rotate", action="store_true",
                 help="random Hadamard rotation before quantization")
  g.add_argument("--top-k-fraction", type=float, default=None,
                 help="send only this fraction of coordinates (top-k, error feedback)")
  g.add_argument("--secagg-dropout", type=float, default=None,
                 help="--aggregator secure_mean: probability that a client drops out "
                      f"(default {DEFAULTS['secagg_dropout']:g})")
  g.add_argument("--attack", default="none", choices=ATTACKS,
                 help="an attack by a fixed set of malicious clients")
  g.add_argument("--malicious-fraction", type=float, default=None,
                 help="with --attack: fraction of all clients that are malicious (a fixed "
                      "set); with --aggregator krum or multi_krum also the fraction of a "
                      "round's clients they tolerate (f, rounded up)")
  g.add_argument("--attack-scale", type=float, default=None,
                 help="--attack scaling: the factor; sign_flip: -scale "
                      f"(default {DEFAULTS['attack_scale']:g})")


def value(args, name: str):
  """A flag's value, or its default where it was not given (its parsed default is None,
  so that a flag given where it has no effect can be refused: see `unused_flags`)."""
  given = getattr(args, name, None)
  return DEFAULTS[name] if given is None else given


def unused_flags(args) -> list[tuple[str, str]]:
  """(flag, what it needs) for each flag given that has no effect with the others."""
  unused = []
  if getattr(args, "trim_fraction", None) is not None and args.aggregator != "trimmed_mean":
    unused.append(("--trim-fraction", "--aggregator trimmed_mean"))
  if getattr(args, "secagg_dropout", None) is not None and args.aggregator != "secure_mean":
    unused.append(("--secagg-dropout", "--aggregator secure_mean"))
  if (getattr(args, "malicious_fraction", None) is not None and args.attack == "none"
      and args.aggregator not in KRUMS):
    unused.append(("--malicious-fraction", "an --attack or --aggregator krum/multi_krum"))
  if getattr(args, "attack_scale", None) is not None and args.attack not in ("scaling",
                                                                               "sign_flip"):
    unused.append(("--attack-scale", "--attack scaling or sign_flip"))
  if not _dp_requested(args):
    for name, flag in (("delta", "--delta"), ("accountant", "--accountant")):
      if getattr(args, name, None) is not None:
        unused.append((flag, "DP: --noise-multiplier or --target-epsilon (with --clip)"))
  if args.rotate and args.quantize_bits is None:
    unused.append(("--rotate", "--quantize-bits"))
  return unused


def _dp_requested(args) -> bool:
  return args.noise_multiplier is not None or args.target_epsilon is not None


def build(args: argparse.Namespace, *, num_clients: int, num_classes: int,
          train_x: np.ndarray, rounds: int) -> Setup:
  """The aggregator, data hook and accountant the flags ask for.

  Raises:
    ValueError: flags that contradict each other or that no aggregator can honour.
  """
  notes: list[str] = []
  m = args.clients_per_round
  stages: list = []
  data_transform, backdoor = None, None

  for flag, needs in unused_flags(args):
    raise ValueError(f"{flag} has no effect here: it applies with {needs}")
  malicious_fraction = value(args, "malicious_fraction")
  if args.attack != "none":
    if not 0.0 < malicious_fraction < 1.0:
      raise ValueError(f"--attack {args.attack} needs --malicious-fraction in (0, 1), got "
                       f"{malicious_fraction}")
    malicious = attacks.choose_malicious(num_clients, malicious_fraction, seed=args.seed)
    count = int(np.sum(malicious))  # the fraction rounds: 0.01 of 30 clients is none
    if not 0 < count < num_clients:
      raise ValueError(f"--malicious-fraction {malicious_fraction:g} of {num_clients} clients "
                       f"makes {count} malicious: give a fraction that leaves 1 to "
                       f"{num_clients - 1}")
    if args.attack == "label_flip":
      data_transform = attacks.label_flip(malicious, num_classes)
    elif args.attack in ("sign_flip", "scaling"):
      attack = attacks.sign_flip if args.attack == "sign_flip" else attacks.scaling
      try:
        stages.append(attack(malicious, value(args, "attack_scale")))
      except ValueError as e:  # named by the flag that set it
        raise ValueError(f"--attack-scale: {e}") from None
    else:
      # A corner trigger at the data's largest value, labelled class 0.
      backdoor = backdoor_trigger(train_x)
      data_transform = attacks.backdoor_data(malicious, backdoor)
      # Algorithms without a server learning rate (FedDyn, q-FFL) step by 1.
      server_lr = (registry.HPARAM["server_lr"].default_for(vars(args))
                   if getattr(args, "server_lr", None) is None else args.server_lr)
      stages.append(attacks.model_replacement(malicious, server_lr))
    notes.append(f"{int(malicious.sum())} of {num_clients} clients are malicious ({args.attack})")
  elif args.aggregator in KRUMS:
    if not 0.0 <= malicious_fraction < 1.0:
      raise ValueError(f"--malicious-fraction must be in [0, 1), got {malicious_fraction}")
    if args.malicious_fraction is None:
      notes.append("Krum tolerates no Byzantine client (f = 0): --malicious-fraction sizes f")

  if args.norm_bound is not None:
    stages.append(robust.norm_bound(args.norm_bound))
  if args.top_k_fraction is not None:
    stages.append(compression.top_k(fraction=args.top_k_fraction))
  if args.quantize_bits is not None:
    stages.append(compression.quantize(args.quantize_bits, rotation=args.rotate))

  accountant, z = None, args.noise_multiplier
  if _dp_requested(args):
    if args.clip is None:
      raise ValueError("DP-FedAvg needs a clipping norm: give --clip")
    if args.aggregator != "mean":
      raise ValueError(f"DP noise is calibrated to the mean; --aggregator {args.aggregator} "
                       f"cannot be combined with --noise-multiplier/--target-epsilon")
    delta = args.delta if args.delta is not None else 0.1 / num_clients
    if z is None:
      z = privacy.calibrate_noise_multiplier(
          args.target_epsilon, rounds=rounds, clients_per_round=m, num_clients=num_clients,
          delta=delta, accountant=value(args, "accountant"))
      notes.append(f"noise multiplier {z:.4f} reaches epsilon {args.target_epsilon} at delta "
                   f"{delta:g} after {rounds} rounds")
    # A traced noise multiplier (inside a sweep's program) has no host-side accountant:
    # the sweep accounts for each row's concrete value.
    if engine.is_concrete(z):
      accountant = privacy.DPAccountant(z, m, num_clients, delta, value(args, "accountant"))
    if args.target_epsilon is not None and args.noise_multiplier is not None:
      last = accountant.max_rounds(args.target_epsilon, limit=rounds)
      if last == 0:
        raise ValueError(f"one round already spends more than epsilon {args.target_epsilon} "
                         f"(epsilon {accountant.epsilon(1):.3g}); raise --noise-multiplier")
      if last < rounds:
        notes.append(f"epsilon {args.target_epsilon} at delta {delta:g} is spent after {last} "
                     f"rounds: stopping there")
      rounds = last
    adaptive = privacy.AdaptiveClipping() if args.adaptive_clip else None
    message = privacy.noise_warning(z, m, num_clients, adaptive)
    if message is not None:
      if args.noise_multiplier is None:  # calibrated: it grows with m too
        message += (" The noise multiplier was calibrated to --target-epsilon: more clients "
                    "per round raise it too (about in proportion, where sampling amplifies "
                    "privacy), so more clients in all, fewer rounds or a larger epsilon are "
                    "what lower z/m.")
      notes.append(f"warning: {message}")
    stages.append(privacy.dp_mean(args.clip, z, adaptive=adaptive))
  else:
    if args.clip is not None or args.adaptive_clip:
      raise ValueError("--clip/--adaptive-clip are DP-FedAvg's: give --noise-multiplier or "
                       "--target-epsilon (for clipping alone use --norm-bound)")
    stages.append(_reducer(args, m))

  only_mean = len(stages) == 1 and args.aggregator == "mean" and not _dp_requested(args)
  aggregator = None if only_mean else aggregators.chain(*stages)
  return Setup(aggregator, data_transform, accountant, rounds, z, backdoor, notes)


def backdoor_trigger(train_x) -> attacks.Backdoor:
  """The CLI's backdoor: the first four features set to the data's largest value, label 0."""
  return attacks.Backdoor(features=(0, 1, 2, 3), value=float(np.max(train_x)), target=0)


def with_backdoor(evaluate: Callable, apply: Callable, test, backdoor: attacks.Backdoor | None
                  ) -> Callable:
  """`evaluate` plus backdoor accuracy on the central test set, when there is a backdoor."""
  if backdoor is None or test is None:
    return evaluate
  measure = attacks.backdoor_evaluator(apply, test[0], test[1], backdoor)

  def both(params):
    return {**evaluate(params), **measure(params)}

  both.check = getattr(evaluate, "check", None)  # the test data's checks (runner.run)
  both.prepare = getattr(evaluate, "prepare", None)  # compiled while the round compiles
  return both


def _reducer(args, clients_per_round: int) -> aggregators.Aggregator:
  name = args.aggregator
  # Krum's f: the malicious clients expected in a round, rounded up (after rounding off
  # float error: 0.14 * 50 is 7.000000000000001).
  f = math.ceil(round(value(args, "malicious_fraction") * clients_per_round, 9))
  if name == "mean":
    return aggregators.mean()
  if name == "median":
    return robust.coordinate_median()
  if name == "trimmed_mean":
    return robust.trimmed_mean(value(args, "trim_fraction"))
  if name == "krum":
    return robust.krum(f)
  if name == "multi_krum":
    if f == 0:  # it averages every client: the plain mean, reported as a defence
      if args.malicious_fraction is None:
        raise ValueError("--aggregator multi_krum needs --malicious-fraction, the fraction of "
                         "a round's clients it tolerates: with none it averages all of them")
      raise ValueError(f"--aggregator multi_krum tolerating f = 0 clients (--malicious-fraction "
                       f"{args.malicious_fraction:g} of {clients_per_round}) averages all of "
                       f"them: give a fraction that leaves f >= 1")
    return robust.multi_krum(f)
  if name == "geometric_median":
    return robust.geometric_median()
  return secure_aggregation.secure_mean(dropout=value(args, "secagg_dropout"))
