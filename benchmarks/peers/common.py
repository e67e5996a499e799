"""What the peer benchmark's workers share: the task, its data and the timing record.

Imported by every worker, each in its own environment (fedjax_sim's, FedJAX's,
Flower's), so it needs only the standard library and numpy.

The data: MNIST-shaped synthetic clients. Client `i` draws its examples from its own
numpy generator seeded with `(seed, i)`, so a Flower ClientApp can make its own
partition alone and every simulator sees exactly the same per-client examples.
Inputs are uniform 28x28 floats; labels come from a fixed random linear "teacher" on
the centred inputs (about balanced over 10 classes), so that the training loss falls
and the final loss is a check that the three simulators did the same work.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import numpy as np

NUM_CLASSES = 10
IMAGE = (28, 28)
# Environment variable carrying the driver's time.time() just before it started the
# worker process, so a worker's end to end includes interpreter start and imports.
LAUNCH_ENV = "PEER_BENCH_LAUNCH_TIME"

# Defaults of the task (the driver passes them explicitly to every worker).
DEFAULTS = dict(num_clients=100, clients_per_round=10, examples_per_client=600,
                batch_size=20, epochs=1, client_lr=0.1, server_lr=1.0, rounds=20, seed=0)


def add_task_args(parser) -> None:
  """The flags every worker accepts (same names, same defaults)."""
  d = DEFAULTS
  parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
  parser.add_argument("--num-clients", type=int, default=d["num_clients"])
  parser.add_argument("--clients-per-round", type=int, default=d["clients_per_round"])
  parser.add_argument("--examples-per-client", type=int, default=d["examples_per_client"])
  parser.add_argument("--batch-size", type=int, default=d["batch_size"])
  parser.add_argument("--epochs", type=int, default=d["epochs"])
  parser.add_argument("--client-lr", type=float, default=d["client_lr"])
  parser.add_argument("--server-lr", type=float, default=d["server_lr"])
  parser.add_argument("--rounds", type=int, default=d["rounds"])
  parser.add_argument("--seed", type=int, default=d["seed"])
  parser.add_argument("--eval-every", type=int, default=0,
                      help="time-to-accuracy runs: evaluate on the held-out set every K "
                           "rounds inside the timed loop (0: only before/after training)")
  parser.add_argument("--target-accuracy", type=float, default=None,
                      help="with --eval-every: stop at the first evaluation reaching it")
  parser.add_argument("--output", required=True, help="JSON file the worker writes")


def task_config(args) -> dict:
  return {k: getattr(args, k) for k in (
      "model", "num_clients", "clients_per_round", "examples_per_client", "batch_size",
      "epochs", "client_lr", "server_lr", "rounds", "seed", "eval_every",
      "target_accuracy") if hasattr(args, k)}


def _teacher(seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 1_000_000])
  return rng.standard_normal((IMAGE[0] * IMAGE[1], NUM_CLASSES)).astype(np.float32)


def client_data(seed: int, client_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Client `client_id`'s examples: x float32 [n, 28, 28] in [0, 1), y int32 [n]."""
  rng = np.random.default_rng([seed, client_id])
  x = rng.random((n, *IMAGE), dtype=np.float32)
  logits = (x.reshape(n, -1) - 0.5) @ _teacher(seed)
  return x, logits.argmax(axis=1).astype(np.int32)


def eval_data(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """A held-out set from the same distribution (a client id no simulator samples)."""
  return client_data(seed, 10_000_000, n)


def steps_per_client(args) -> int:
  return args.epochs * -(-args.examples_per_client // args.batch_size)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
  """Mean softmax cross-entropy, in float64 numpy (the same check for every worker)."""
  z = logits.astype(np.float64)
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return float(-logp[np.arange(len(y)), y].mean())


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
  return float((np.asarray(logits).argmax(axis=1) == y).mean())


class Evaluator:
  """Held-out evaluation inside the timed loop, for time-to-accuracy runs.

  Every worker calls `after_round(r, logits_fn)` after round r (1-based) with a function
  returning the logits of the current global model on the held-out inputs; it evaluates
  every `--eval-every` rounds (the evaluation's own time counts in the run, alike for
  every simulator) and says whether `--target-accuracy` is reached (stop then).
  """

  def __init__(self, args, launch: float):
    self.every, self.target, self.launch = args.eval_every, args.target_accuracy, launch
    self.x, self.y = eval_data(args.seed)
    self.history: list[dict] = []
    self.reached: dict | None = None

  def due(self, rnd: int) -> bool:
    return bool(self.every) and rnd % self.every == 0

  def after_round(self, rnd: int, logits_fn) -> bool:
    """Evaluates if due; True when the target is reached (the worker stops)."""
    if not self.due(rnd):
      return False
    logits = np.asarray(logits_fn(self.x))
    acc = accuracy(logits, self.y)
    entry = {"round": rnd, "time_s": time.time() - self.launch, "accuracy": acc,
             "loss": cross_entropy(logits, self.y)}
    self.history.append(entry)
    if self.reached is None and self.target is not None and acc >= self.target:
      self.reached = entry
    return self.reached is not None

  def extra(self) -> dict:
    if not self.every:
      return {}
    return {"eval_every": self.every, "target_accuracy": self.target,
            "eval_history": self.history,
            "target_reached": self.reached is not None,
            "time_to_target_s": self.reached["time_s"] if self.reached else None,
            "rounds_to_target": self.reached["round"] if self.reached else None}


def fedjax_sim_compile():
  """fedjax_sim/compile.py loaded by itself (it needs only jax): the peers' workers run in
  their own environments, without fedjax_sim, and compile with the options it chooses."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                      "fedjax_sim", "compile.py")
  spec = importlib.util.spec_from_file_location("fedjax_sim_compile", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fedjax_sim_fedavg(kind: str, examples: int, clients: int, per_round: int):
  """(algorithm, initial state, data) of fedjax_sim's FedAvg on this task, as the peers'
  short benchmarks run it (SGD 0.1 on clients, 1.0 on the server, batch 20, one epoch).
  Imports fedjax_sim: for the scripts that run in its environment, not the peers'."""
  import jax
  import optax
  import fedjax_sim as fs
  xs, ys = zip(*(client_data(0, i, examples) for i in range(clients)))
  data = fs.from_clients(list(xs), list(ys), num_classes=NUM_CLASSES)
  model = fs.mlp(seed=0) if kind == "mlp" else fs.cnn(seed=0)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                        server_optimizer=optax.sgd(1.0), clients_per_round=per_round,
                        batch_size=20, epochs=1)
  return algorithm, algorithm.init(model.params, jax.random.key(0)), data


def byte_compile(python: str, *dirs: str) -> None:
  """Writes `python`'s bytecode (__pycache__) for the modules under `dirs`, as `pip
  install` does for the peers' packages in their environments.

  Python compiles a module's source on every import when no bytecode was written for it,
  and a machine whose environment sets PYTHONDONTWRITEBYTECODE never writes any: a tree
  run from source (fedjax_sim, these workers) would then pay its compilation in every
  fresh process, which no installed package pays. `compileall` writes it regardless."""
  subprocess.run([python, "-m", "compileall", "-q", *dirs], check=True,
                 stdout=subprocess.DEVNULL)


def launch_time(main_start: float) -> float:
  """The driver's launch time (or `main_start`, when the worker is run by hand)."""
  return float(os.environ.get(LAUNCH_ENV, main_start))


def cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def versions(*names: str) -> dict[str, str | None]:
  from importlib import metadata
  out = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def record(args, *, simulator: str, launch: float, main_start: float, setup_done: float,
           round_ends: list[float], rounds_per_call: int = 1, extra: dict | None = None,
           packages: dict | None = None, device: str | None = None) -> dict:
  """The worker's result, written to `args.output` as JSON and returned.

  Args:
    launch: the driver's time.time() before it started this process.
    main_start: time.time() at the top of the worker (before its heavy imports).
    setup_done: time.time() when data, model and simulator were ready (before round 1).
    round_ends: time.time() at the end of each timed call, in order (one call runs
      `rounds_per_call` rounds).
  """
  starts = [setup_done] + round_ends[:-1]
  call_s = [e - s for s, e in zip(starts, round_ends)]
  per_round = [c / rounds_per_call for c in call_s]
  warm = per_round[1:]  # none when a single call ran every round
  result = {
      "simulator": simulator,
      "task": task_config(args),
      "steps_per_client": steps_per_client(args),
      "rounds_per_call": rounds_per_call,
      "device": device or "cpu",
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "packages": packages or {},
      "loadavg_at_end": list(os.getloadavg()),
      "timings": {
          # Interpreter start and imports (from the driver's launch to the first line of
          # the worker) plus the worker's own imports.
          "startup_s": main_start - launch,
          "imports_and_setup_s": setup_done - main_start,
          "first_call_s": call_s[0],
          "call_s": call_s,
          "per_round_s": per_round,
          # Seconds per round after warm-up: median over every call but the first.
          "per_round_warm_median_s": float(np.median(warm)) if warm else None,
          # From the driver's launch to the end of the last round.
          "end_to_end_s": round_ends[-1] - launch,
      },
  }
  if extra:
    result.update(extra)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  return result
