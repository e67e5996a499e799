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

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
               "secure_mean")
ATTACKS = ("none", "label_flip", "sign_flip", "scaling", "backdoor")


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
  g.add_argument("--trim-fraction", type=float, default=0.1, help="trimmed_mean: beta")
  registry.add_flags(g, "aggregator")  # --clip, --noise-multiplier, --norm-bound
  g.add_argument("--adaptive-clip", action="store_true",
                 help="DP-FedAvg: track the median update norm (Andrew et al. 2021)")
  g.add_argument("--target-epsilon", type=float, default=None,
                 help="with --noise-multiplier: stop when epsilon would exceed it; "
                      "without: calibrate the noise multiplier to reach it after --rounds")
  g.add_argument("--delta", type=float, default=None, help="DP delta (default 0.1 / clients)")
  g.add_argument("--accountant", default="rdp", choices=privacy.ACCOUNTANTS)
  g.add_argument("--quantize-bits", type=int, default=None,
                 help="stochastic uniform quantization of each update to this many bits")
  g.add_argument("--rotate", action="store_true",
                 help="random Hadamard rotation before quantization")
  g.add_argument("--top-k-fraction", type=float, default=None,
                 help="send only this fraction of coordinates (top-k, error feedback)")
  g.add_argument("--secagg-dropout", type=float, default=0.0,
                 help="secure_mean: probability that a client drops out")
  g.add_argument("--attack", default="none", choices=ATTACKS)
  g.add_argument("--malicious-fraction", type=float, default=0.0,
                 help="fraction of all clients that are malicious (a fixed set)")
  g.add_argument("--attack-scale", type=float, default=10.0,
                 help="scaling: the factor; sign_flip: -scale")


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

  if args.attack != "none":
    if not 0.0 < args.malicious_fraction < 1.0:
      raise ValueError(f"--attack {args.attack} needs --malicious-fraction in (0, 1), got "
                       f"{args.malicious_fraction}")
    malicious = attacks.choose_malicious(num_clients, args.malicious_fraction, seed=args.seed)
    if args.attack == "label_flip":
      data_transform = attacks.label_flip(malicious, num_classes)
    elif args.attack == "sign_flip":
      stages.append(attacks.sign_flip(malicious, args.attack_scale))
    elif args.attack == "scaling":
      stages.append(attacks.scaling(malicious, args.attack_scale))
    else:
      # A corner trigger at the data's largest value, labelled class 0.
      backdoor = attacks.Backdoor(features=(0, 1, 2, 3), value=float(np.max(train_x)), target=0)
      data_transform = attacks.backdoor_data(malicious, backdoor)
      # Algorithms without a server learning rate (FedDyn, q-FFL) step by 1.
      server_lr = 1.0 if getattr(args, "server_lr", None) is None else args.server_lr
      stages.append(attacks.model_replacement(malicious, server_lr))
    notes.append(f"{int(malicious.sum())} of {num_clients} clients are malicious ({args.attack})")
  elif args.malicious_fraction:
    raise ValueError("--malicious-fraction needs an --attack")

  if args.norm_bound is not None:
    stages.append(robust.norm_bound(args.norm_bound))
  if args.top_k_fraction is not None:
    stages.append(compression.top_k(fraction=args.top_k_fraction))
  if args.quantize_bits is not None:
    stages.append(compression.quantize(args.quantize_bits, rotation=args.rotate))
  elif args.rotate:
    raise ValueError("--rotate applies to --quantize-bits")

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
          delta=delta, accountant=args.accountant)
      notes.append(f"noise multiplier {z:.4f} reaches epsilon {args.target_epsilon} at delta "
                   f"{delta:g} after {rounds} rounds")
    # A traced noise multiplier (inside a sweep's program) has no host-side accountant:
    # the sweep accounts for each row's concrete value.
    if engine.is_concrete(z):
      accountant = privacy.DPAccountant(z, m, num_clients, delta, args.accountant)
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
    stages.append(privacy.dp_mean(args.clip, z, adaptive=adaptive))
  else:
    if args.clip is not None or args.adaptive_clip:
      raise ValueError("--clip/--adaptive-clip are DP-FedAvg's: give --noise-multiplier or "
                       "--target-epsilon (for clipping alone use --norm-bound)")
    stages.append(_reducer(args, m))

  if args.aggregator != "secure_mean" and args.secagg_dropout:
    raise ValueError("--secagg-dropout applies to --aggregator secure_mean")
  only_mean = len(stages) == 1 and args.aggregator == "mean" and not _dp_requested(args)
  aggregator = None if only_mean else aggregators.chain(*stages)
  return Setup(aggregator, data_transform, accountant, rounds, z, backdoor, notes)


def with_backdoor(evaluate: Callable, apply: Callable, test, backdoor: attacks.Backdoor | None
                  ) -> Callable:
  """`evaluate` plus backdoor accuracy on the central test set, when there is a backdoor."""
  if backdoor is None or test is None:
    return evaluate
  measure = attacks.backdoor_evaluator(apply, test[0], test[1], backdoor)
  return lambda params: {**evaluate(params), **measure(params)}


def _reducer(args, clients_per_round: int) -> aggregators.Aggregator:
  name = args.aggregator
  # Krum's f: the malicious clients expected in a round, rounded up.
  f = math.ceil(args.malicious_fraction * clients_per_round)
  if name == "mean":
    return aggregators.mean()
  if name == "median":
    return robust.coordinate_median()
  if name == "trimmed_mean":
    return robust.trimmed_mean(args.trim_fraction)
  if name == "krum":
    return robust.krum(f)
  if name == "multi_krum":
    return robust.multi_krum(f)
  if name == "geometric_median":
    return robust.geometric_median()
  return secure_aggregation.secure_mean(dropout=args.secagg_dropout)
