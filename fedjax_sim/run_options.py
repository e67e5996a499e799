"""The CLI's flags for client systems, FedBuff, the server warm start and model compute,
checked before anything compiles.

`add_flags(parser)` adds them; `check_flags(args)` rejects bad values and combinations
that need no data; the other functions build what the flags ask for once the task is
loaded (and check what needs its number of clients):

- System heterogeneity (`fedjax_sim.systems`): `--profiles FILE` (a device trace) or
  profiles drawn by `systems.sample_profiles(num_clients, seed=--profiles-seed)` with
  a lognormal speed (`--speed-median`, `--speed-sigma`); `--deadline`,
  `--over-selection`, `--stragglers`, `--dropout`, `--straggler-fraction` make the
  `systems.SystemsConfig` that every synchronous algorithm takes as `systems=`. Any of
  these flags turns the simulated clock on (round_time_s, sim_time_s per round). The
  numeric ones (`--deadline`, `--dropout`, `--straggler-fraction`) are entries of the
  hyperparameter table (`algorithms.registry.HPARAMS`), which adds and checks them.
- FedBuff: `--concurrency`, `--staleness`, with the same profiles flags.
- Server warm start: `--server-examples M` examples are held out of the clients'
  training data (see `hold_out_server_examples`), and `--warm-start-steps N` steps of
  centralized training on them run before round 1 (`warm_start.pretrain`);
  `--init-params FILE` starts from saved params, `--save-params FILE` saves the final
  ones.
- `--mixed-precision` (bfloat16 compute, `models.mixed_precision`) and `--conv-impl`
  (the CNN's convolution, `fedjax_sim.conv`).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os

import jax
import numpy as np

from fedjax_sim import aggregation_options, conv, models, optimizers, partition, systems, tasks
from fedjax_sim import data as data_lib
from fedjax_sim.algorithms import registry

WITH_PROFILES = registry.ALGORITHMS + registry.ASYNC  # every one simulates client systems
PROFILE_FIELDS = ("examples_per_s", "downlink_bytes_per_s", "uplink_bytes_per_s", "latency_s",
                  "availability")
REQUIRED_FIELDS = PROFILE_FIELDS[:3]  # latency_s defaults to 0, availability to 1

# attribute -> flag, in the order messages list them
_SYSTEMS_FLAGS = {"deadline": "--deadline", "over_selection": "--over-selection",
                  "stragglers": "--stragglers", "dropout": "--dropout",
                  "straggler_fraction": "--straggler-fraction"}
_PROFILE_FLAGS = {"profiles": "--profiles", "profiles_seed": "--profiles-seed",
                  "speed_median": "--speed-median", "speed_sigma": "--speed-sigma"}
_FEDBUFF_FLAGS = {"concurrency": "--concurrency", "staleness": "--staleness"}


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the systems, FedBuff, warm start and model compute flags."""
  s = parser.add_argument_group(
      "system heterogeneity",
      "every synchronous algorithm; the profiles flags also fedbuff. Any of them turns on "
      "the simulated clock (round_time_s, sim_time_s in the metrics); without --profiles "
      "the profiles are drawn by systems.sample_profiles")
  s.add_argument("--profiles", default=None, metavar="FILE",
                 help="device trace, .csv (header row) or .npz, one row per client: "
                      + ", ".join(PROFILE_FIELDS) + " (the last two optional: 0 and 1)")
  s.add_argument("--profiles-seed", type=int, default=None,
                 help="seed of the drawn profiles (default 0)")
  s.add_argument("--speed-median", type=float, default=None,
                 help=f"drawn profiles: median examples/s (default {systems.DEFAULT_SPEED[1]:g})")
  s.add_argument("--speed-sigma", type=float, default=None,
                 help="drawn profiles: lognormal sigma of the speed "
                      f"(default {systems.DEFAULT_SPEED[2]:g})")
  s.add_argument("--over-selection", type=int, default=None, metavar="N",
                 help="sample N more clients and keep the first --clients-per-round to report")
  s.add_argument("--stragglers", default=None, choices=systems.STRAGGLER_POLICIES,
                 help="a straggler's update is dropped, or its partial work kept (default drop)")
  registry.add_flags(s, "systems")  # --deadline, --dropout, --straggler-fraction
  b = parser.add_argument_group("fedbuff", "--algorithm fedbuff: one round is one server "
                                "update, its buffer size is --clients-per-round")
  b.add_argument("--concurrency", type=int, default=None,
                 help="clients in flight (default --clients-per-round)")
  b.add_argument("--staleness", default=None, choices=("polynomial", "constant"),
                 help="staleness weight: 1/sqrt(1 + tau) or 1 (default polynomial)")
  w = parser.add_argument_group("server warm start and checkpoints")
  w.add_argument("--warm-start-steps", type=int, default=None, metavar="N",
                 help="centralized training steps on the server's examples before round 1 "
                      "(client optimizer, --batch-size)")
  w.add_argument("--server-examples", type=int, default=None, metavar="M",
                 help="hold M training examples out of the clients for the warm start: a "
                      "seeded (--data-seed) draw from the pooled training examples, each "
                      "client keeping at least one")
  w.add_argument("--warm-start-lr", type=float, default=None,
                 help="warm start learning rate (default --client-lr)")
  w.add_argument("--init-params", default=None, metavar="FILE",
                 help="start from params saved by --save-params (or warm_start.save_params)")
  w.add_argument("--save-params", default=None, metavar="FILE",
                 help="save the final global params to this .npz (atomically)")
  m = parser.add_argument_group("model compute")
  m.add_argument("--mixed-precision", action="store_true",
                 help="compute in bfloat16, keep float32 params and optimizer state")
  m.add_argument("--conv-impl", default=None, choices=conv.IMPLS,
                 help="the CNN's convolution (default auto: sequential on CPU, patches "
                      "elsewhere)")


def _given(args, flags: dict[str, str]) -> list[str]:
  return [flag for name, flag in flags.items() if getattr(args, name) is not None]


def uses_systems(args) -> bool:
  """Whether the flags ask for a SystemsConfig (synchronous algorithms)."""
  return args.algorithm in registry.ALGORITHMS and bool(
      _given(args, _SYSTEMS_FLAGS) or _given(args, _PROFILE_FLAGS))


def _finite(value) -> bool:
  return value is not None and math.isfinite(value)


def unused_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
  """(flag, what it needs) for each flag given that has no effect with the others: the
  aggregator chain's (`aggregation_options.unused_flags`) and the systems simulation's."""
  unused = aggregation_options.unused_flags(args)
  if getattr(args, "wandb_mode", None) is not None and getattr(args, "wandb", None) is None:
    unused.append(("--wandb-mode", "--wandb PROJECT"))
  if getattr(args, "task", None) == "synthetic" and getattr(args, "alpha", None) is not None:
    # Synthetic's alpha shifts every class's logit alike: not one label changes
    # (fedjax_sim.synthetic), so two runs that differ by it alone are the same run.
    unused.append(("--alpha", "--partition dirichlet on a partitioned task (Synthetic's "
                   "alpha changes no label: it shifts every class's logit alike)"))
  if (args.stragglers is not None and args.deadline is None
      and args.straggler_fraction is None):
    unused.append(("--stragglers", "--deadline or --straggler-fraction (without them no "
                   "client is a straggler)"))
  return unused


def check_flags(args: argparse.Namespace) -> None:
  """Raises ValueError / FileNotFoundError naming the flag of a bad value or combination
  (what can be checked without the task's data), a flag that has no effect included."""
  algorithm = args.algorithm
  for flag in ("rounds", "eval_every"):  # before an --overwrite clears the folder
    value = getattr(args, flag, None)
    if value is not None and value <= 0:
      raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
  seed = getattr(args, "seed", None)
  if seed is not None and not 0 <= seed < 2 ** 32:  # jax's keys take 32 bits of it
    raise ValueError(f"--seed must be an integer in [0, 2^32), got {seed}")
  systems_flags, profile_flags = _given(args, _SYSTEMS_FLAGS), _given(args, _PROFILE_FLAGS)
  if systems_flags and algorithm not in registry.ALGORITHMS:
    raise ValueError(f"{', '.join(systems_flags)}: synchronous rounds with stragglers work with "
                     f"every synchronous algorithm; {algorithm} is asynchronous and takes only "
                     f"--profiles, --profiles-seed, --speed-median and --speed-sigma (its "
                     f"clients always report)")
  registry.check_args(args)  # the hyperparameter flags, against their table
  for flag, needs in unused_flags(args):
    raise ValueError(f"{flag} has no effect here: it applies with {needs}")
  if args.profiles is not None:
    drawn = [f for f in profile_flags if f != "--profiles"]
    if drawn:
      raise ValueError(f"--profiles gives every client's profile from a file: drop "
                       f"{', '.join(drawn)} (they set drawn profiles)")
    if not os.path.isfile(args.profiles):
      raise FileNotFoundError(f"--profiles: no such file {args.profiles!r}")
    if os.path.splitext(args.profiles)[1].lower() not in (".csv", ".npz"):
      raise ValueError(f"--profiles: {args.profiles!r} must be a .csv or .npz file")
  for flag in ("profiles_seed", "data_seed"):  # numpy's own error named none
    value = getattr(args, flag, None)
    if value is not None and value < 0:
      raise ValueError(f"--{flag.replace('_', '-')} must be an integer >= 0, got {value}")
  if args.speed_median is not None and not (_finite(args.speed_median) and args.speed_median > 0):
    raise ValueError(f"--speed-median must be a positive number of examples/s, got "
                     f"{args.speed_median}")
  if args.speed_sigma is not None and not (_finite(args.speed_sigma) and args.speed_sigma >= 0):
    raise ValueError(f"--speed-sigma must be a number >= 0, got {args.speed_sigma}")
  if args.over_selection is not None and args.over_selection < 0:
    raise ValueError(f"--over-selection must be an integer >= 0, got {args.over_selection}")
  sampled = args.clients_per_round + (args.over_selection or 0)
  if (args.over_selection and isinstance(args.client_chunk_size, int)
      and sampled % args.client_chunk_size):
    raise ValueError(f"--client-chunk-size {args.client_chunk_size} must divide "
                     f"--clients-per-round + --over-selection = {sampled}")

  fedbuff_flags = _given(args, _FEDBUFF_FLAGS)
  if fedbuff_flags and algorithm != "fedbuff":
    raise ValueError(f"{', '.join(fedbuff_flags)}: applies to --algorithm fedbuff, not "
                     f"{algorithm}")
  if args.concurrency is not None and args.concurrency < args.clients_per_round:
    raise ValueError(f"--concurrency {args.concurrency} must be at least --clients-per-round "
                     f"{args.clients_per_round} (fedbuff's buffer size): the server would wait "
                     f"for more arrivals than there are clients in flight")

  if args.warm_start_steps is not None:
    if args.warm_start_steps <= 0:
      raise ValueError(f"--warm-start-steps must be a positive integer, got "
                       f"{args.warm_start_steps}")
    if args.server_examples is None:
      raise ValueError("--warm-start-steps needs --server-examples M (the server's own "
                       "examples, held out of the clients' training data)")
  elif args.server_examples is not None:
    raise ValueError("--server-examples holds examples out for the warm start: give "
                     "--warm-start-steps too")
  elif args.warm_start_lr is not None:
    raise ValueError("--warm-start-lr applies to --warm-start-steps")
  if args.server_examples is not None and args.server_examples <= 0:
    raise ValueError(f"--server-examples must be a positive integer, got {args.server_examples}")
  if args.warm_start_lr is not None and not (_finite(args.warm_start_lr)
                                             and args.warm_start_lr > 0):
    raise ValueError(f"--warm-start-lr must be a positive number, got {args.warm_start_lr}")
  if args.init_params is not None and not os.path.isfile(args.init_params):
    raise FileNotFoundError(f"--init-params: no such file {args.init_params!r}")
  if args.save_params is not None:
    path = args.save_params
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
      raise ValueError(f"--save-params: {path!r} is a directory; give a file name")
    existing = parent
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
      raise ValueError(f"--save-params: cannot write {path!r} ({existing!r} is not a "
                       f"writable directory)")


def check_with_data(args: argparse.Namespace, num_clients: int) -> None:
  """The checks that need the task's number of clients."""
  if args.over_selection:
    sampled = args.clients_per_round + args.over_selection
    if sampled > num_clients:
      raise ValueError(f"--over-selection {args.over_selection}: --clients-per-round + "
                       f"--over-selection = {args.clients_per_round} + {args.over_selection} "
                       f"= {sampled} but the data has only {num_clients} clients")
  if args.algorithm == "fedbuff":
    concurrency = args.clients_per_round if args.concurrency is None else args.concurrency
    if concurrency > num_clients:
      raise ValueError(f"--concurrency {concurrency} but the data has only {num_clients} "
                       f"clients, and no client can be in flight twice")


# --- Profiles and the SystemsConfig. ---


def load_profiles(path: str, num_clients: int) -> systems.ClientProfiles:
  """Client profiles from a .csv (header row) or .npz device trace with one row per client
  and columns `PROFILE_FIELDS` (latency_s and availability optional)."""
  where = f"--profiles {path}"
  columns: dict[str, np.ndarray] = {}
  if path.lower().endswith(".npz"):
    try:
      with np.load(path) as f:
        columns = {name: np.asarray(f[name]) for name in f.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"{where}: cannot read it as .npz: {e}") from None
  else:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames:
        raise ValueError(f"{where}: empty file; expected a header row with "
                         f"{', '.join(PROFILE_FIELDS)}")
      names = [n.strip() for n in reader.fieldnames]
      rows = list(csv.reader(f))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    for line, row in enumerate(rows, start=2):
      if len(row) != len(names):
        raise ValueError(f"{where}: line {line} has {len(row)} values, the header {len(names)}")
    for j, name in enumerate(names):
      values = []
      for line, row in enumerate(rows, start=2):
        try:
          values.append(float(row[j]))
        except ValueError:
          raise ValueError(f"{where}: line {line}, column {name}: {row[j]!r} is not a "
                           f"number") from None
      columns[name] = np.asarray(values, float)
  unknown = sorted(set(columns) - set(PROFILE_FIELDS))
  missing = [f for f in REQUIRED_FIELDS if f not in columns]
  if unknown or missing:
    raise ValueError(f"{where}: columns must be {', '.join(PROFILE_FIELDS)} (the last two "
                     f"optional); missing {missing}, unknown {unknown}")
  for name, value in columns.items():
    if value.shape != (num_clients,):
      raise ValueError(f"{where}: {name} has shape {value.shape}, expected one value per "
                       f"client: ({num_clients},)")
    if not np.issubdtype(value.dtype, np.number):
      raise ValueError(f"{where}: {name} must hold numbers, got {value.dtype}")
  try:
    return systems.make_profiles(num_clients, **columns)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def build_profiles(args: argparse.Namespace, num_clients: int) -> systems.ClientProfiles | None:
  """The profiles the flags ask for; None when no systems or profiles flag is given
  (fedbuff then draws the default ones, seed 0)."""
  if args.algorithm not in WITH_PROFILES:
    return None
  if args.profiles is not None:
    return load_profiles(args.profiles, num_clients)
  if not (_given(args, _SYSTEMS_FLAGS) or _given(args, _PROFILE_FLAGS)) and \
      args.algorithm != "fedbuff":
    return None
  _, median, sigma = systems.DEFAULT_SPEED
  median = median if args.speed_median is None else args.speed_median
  sigma = sigma if args.speed_sigma is None else args.speed_sigma
  return systems.sample_profiles(num_clients, seed=args.profiles_seed or 0,
                                 examples_per_s=("lognormal", median, sigma))


def build_systems(args: argparse.Namespace, profiles: systems.ClientProfiles | None,
                  aggregator) -> systems.SystemsConfig | None:
  """The SystemsConfig the flags ask for, or None; checks the aggregator is a mean. The
  numeric settings may be traced (a sweep builds this inside its program)."""
  if not uses_systems(args):
    return None
  flags = ", ".join(_given(args, _SYSTEMS_FLAGS) + _given(args, _PROFILE_FLAGS))
  try:
    systems.check_aggregator(aggregator)
  except ValueError:
    raise ValueError(f"{flags}: clients that drop out or miss the deadline enter the mean with "
                     f"weight 0, so the server's reducer must be the weighted mean: use "
                     f"--aggregator mean without DP (--noise-multiplier, --target-epsilon) "
                     f"(got --aggregator {args.aggregator})") from None
  if args.top_k_fraction is not None:
    raise ValueError(f"{flags}: --top-k-fraction keeps per-client error feedback, which the "
                     f"clients a round does not aggregate would update too")
  return systems.SystemsConfig(
      profiles=profiles, deadline_s=args.deadline, over_selection=args.over_selection or 0,
      stragglers=args.stragglers or "drop",
      dropout=0.0 if args.dropout is None else args.dropout,
      straggler_fraction=0.0 if args.straggler_fraction is None else args.straggler_fraction)


# --- Server warm start. ---


def hold_out_server_examples(data: data_lib.FederatedData, num: int, seed: int
                             ) -> tuple[data_lib.FederatedData, np.ndarray, np.ndarray]:
  """Removes `num` training examples from the clients for the server.

  The rule: pool every client's real examples except its first (so that every client
  keeps at least one), draw `num` of them without replacement with
  `np.random.default_rng(seed)`, and remove them from their clients (the rest keep
  their order). The clients' test splits and the central test set are untouched, so
  the server never sees an example that any evaluation uses.

  Returns:
    (the clients' remaining data, server x, server y).
  """
  counts = np.asarray(data.counts).astype(np.int64)
  pool = int(np.sum(np.maximum(counts - 1, 0)))
  if num > pool:
    raise ValueError(f"--server-examples {num}: the clients hold {int(counts.sum())} training "
                     f"examples and each keeps at least one, so at most {pool} can be held out")
  x, y = np.asarray(data.x), np.asarray(data.y)
  owner = np.repeat(np.arange(len(counts)), np.maximum(counts - 1, 0))
  position = np.concatenate([np.arange(1, n) for n in counts if n > 1] or [np.zeros(0, int)])
  chosen = np.sort(np.random.default_rng(seed).permutation(pool)[:num])
  server_x, server_y = x[owner[chosen], position[chosen]], y[owner[chosen], position[chosen]]
  keep = np.zeros(x.shape[:2], bool)
  for i, n in enumerate(counts):
    keep[i, :n] = True
  keep[owner[chosen], position[chosen]] = False
  xs = [x[i][keep[i]] for i in range(len(counts))]
  ys = [y[i][keep[i]] for i in range(len(counts))]
  return data_lib.from_clients(xs, ys, x_dtype=x.dtype), server_x, server_y


def warm_start_key(seed: int) -> jax.Array:
  """The warm start's shuffling key: derived from --seed, apart from the rounds' keys."""
  return jax.random.fold_in(jax.random.key(seed), 0x5E4E5)


# --- The model. ---


def make_model(task, args: argparse.Namespace) -> models.Model:
  """The task's model named by --model, with --conv-impl and --mixed-precision."""
  name = args.model or task.default_model
  if args.conv_impl is None:
    model = task.make_model(name, args.seed)
  elif name != "cnn":
    raise ValueError(f"--conv-impl applies to the CNN (--model cnn); the model is {name!r}")
  elif "conv_impl" in inspect.signature(task.make_model).parameters:  # image tasks
    model = task.make_model(name, args.seed, conv_impl=args.conv_impl)
  else:
    task.make_model(name, args.seed)  # the task's own error, if it offers no CNN
    raise ValueError("--conv-impl: this task's models take no conv_impl")
  return models.mixed_precision(model) if args.mixed_precision else model


# --- `fedjax-sim run`'s flags (also the settings of a sweep config). ---

TASK_OPTIONS = ("partition", "alpha", "num_clients", "shards_per_client", "sigma", "max_examples",
                "data_dir", "data_seed")


def chunk_size_arg(value: str) -> int | str | None:
  """--client-chunk-size: a positive integer, 'auto' or 'all' (None: every client at once)."""
  if value in ("auto", "all"):
    return None if value == "all" else value
  try:
    size = int(value)
  except ValueError:
    size = 0
  if size <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, 'auto' or 'all', got {value!r}")
  return size


def add_run_flags(run: argparse.ArgumentParser) -> None:
  """Adds `fedjax-sim run`'s flags (also the settings of a sweep config: see
  `sweep_config.settings_spec`)."""
  run.add_argument("--task", default="synthetic", choices=tasks.task_names(),
                   help="the federated data set and its models")
  run.add_argument("--model", default=None, help="model name (default: the task's)")
  data = run.add_argument_group("task options", "passed to the task only when given")
  data.add_argument("--partition", default=None, choices=partition.PARTITIONERS,
                    help="how to split the data into clients (digits, mnist5k, TFDS tasks; "
                         "default iid)")
  data.add_argument("--alpha", type=float, default=None,
                    help="the Dirichlet concentration under --partition dirichlet (default "
                         "0.5; not for task synthetic, whose alpha changes no label)")
  data.add_argument("--num-clients", type=int, default=None,
                    help="number of clients (default: the task's)")
  data.add_argument("--shards-per-client", type=int, default=None,
                    help="--partition shards: shards (so labels) per client (default 2)")
  data.add_argument("--sigma", type=float, default=None,
                    help="--partition quantity: lognormal sigma of the client sizes (default 1)")
  data.add_argument("--max-examples", type=int, default=None,
                    help="cap on training examples per client (drops the rest)")
  data.add_argument("--data-dir", default=None,
                    help="LEAF data folder, or TFDS data folder (default ~/tensorflow_datasets)")
  data.add_argument("--data-seed", type=int, default=None,
                    help="seed of the data split (default 0)")
  run.add_argument("--algorithm", default="fedavg", choices=registry.ALGORITHMS + registry.ASYNC,
                   help="the federated algorithm")
  hyper = run.add_argument_group(
      "algorithm hyperparameters",
      "each applies to the algorithms named in its help, an error otherwise "
      "(the table: fedjax_sim.algorithms.registry.HPARAMS)")
  registry.add_flags(hyper, "algorithm")
  run.add_argument("--rounds", type=int, default=200, help="rounds to run")
  run.add_argument("--clients-per-round", type=int, default=10,
                   help="clients sampled per round (fedbuff: its buffer size)")
  schedule = run.add_mutually_exclusive_group()
  schedule.add_argument("--epochs", type=int, default=None, help="local epochs (default 1)")
  schedule.add_argument("--steps", type=int, default=None, help="local steps instead of epochs")
  run.add_argument("--batch-size", type=int, default=10, help="local batch size")
  run.add_argument("--client-optimizer", default="sgd", choices=optimizers.CLIENT_OPTIMIZERS,
                   help="the clients' local optimizer")
  run.add_argument("--server-optimizer", default="fedavg", choices=optimizers.SERVER_OPTIMIZERS,
                   help="the server's optimizer on the averaged update (FedOpt)")
  run.add_argument("--weighting", default="examples", choices=("examples", "uniform"),
                   help="each client's weight in the mean: its number of examples, or 1")
  run.add_argument("--client-chunk-size", type=chunk_size_arg, default="auto",
                   help="train this many clients at a time to bound memory; 'all' trains "
                        "them all at once; 'auto': all at once on accelerators, "
                        "a few at a time on a CPU, where that is faster")
  run.add_argument("--eval-every", type=int, default=10,
                   help="rounds per compiled chunk; evaluation runs after each")
  run.add_argument("--seed", type=int, default=0,
                   help="seed of client sampling, shuffling and the initial model")
  run.add_argument("--output", default=None,
                   help="output directory (default runs/<task>-<name>-seed<seed>-<hash>: "
                        "the algorithm, for fedavg the server optimizer; the hash of the "
                        "flags)")
  run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  aggregation_options.add_flags(run)
  add_flags(run)
  logs = run.add_argument_group("metric writers", "every round's metrics, the configuration "
                                "and the summary (fedjax_sim.writers)")
  logs.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                    help="write TensorBoard event files to DIR (default RUN_DIR/tensorboard); "
                         "pip install 'fedjax_sim[tensorboard]'")
  logs.add_argument("--wandb", default=None, metavar="PROJECT",
                    help="log to this Weights & Biases project (under RUN_DIR/wandb); "
                         "pip install 'fedjax_sim[wandb]'")
  logs.add_argument("--wandb-mode", default=None, choices=("online", "offline"),
                    help="offline needs no network ('wandb sync' uploads later); default "
                         "WANDB_MODE, else online")
