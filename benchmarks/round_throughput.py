"""Times one FedAvg round: the vectorized engine against the loop reference.

For each model and number of clients per round, on the same synthetic data, model,
optimizers and keys, it measures:

- vectorized: `runner.make_chunk(algorithm, 1)` (one round inside the jitted
  `lax.scan` the runner uses, with `compile.compiler_options()`), compiled ahead of
  time (the compile time is recorded) and warmed up by one round;
- vectorized_plain_jit: the same round under plain `jax.jit`, without
  `compile.compiler_options()` (on CPU: with XLA's default YNNPACK fusions), so the
  effect of the CPU fix is measured side by side (only where the options exist);
- vectorized_chunked (with `--also-chunk-size`): the round with a smaller
  `client_chunk_size`;
- loop: `reference.ReferenceFedAvg.round` (per-client, per-batch jitted steps, host
  averaging), warmed up by one round; skipped and recorded as skipped, never estimated,
  above `--skip-loop-above`;
- centralized (a practical ceiling, as in DESIGN.md): one set of weights trained for the
  same number of SGD steps on batches of clients x batch_size examples, the same FLOPs as
  the round's local training;
- roofline: the device's float32 matmul rate and memory bandwidth are measured first
  (machine.measured_peaks); a round's bound is the slower of its local-training FLOPs at
  that rate and its bytes at that bandwidth, both counted by XLA (training_cost).

Models: logistic regression, the 2NN MLP and the FedAvg CNN (three convolution
implementations) on MNIST-shaped images; the next-character model (char_rnn) on
Shakespeare-shaped texts.

The variants of one (model, clients) row are timed round-robin, one round of each in turn
(`--repeats` rounds, `--loop-repeats` for the loop), with `block_until_ready`, so they
all see the same load from other processes; medians of wall time and of process CPU time
are recorded. Each timed round continues from the state the previous one left (other
clients are sampled, the work is the same). The first vectorized and loop rounds start
from the same state and key and their parameters are compared, which checks that both
paths do the same work.

Run from the repository root (see benchmarks/README.md), e.g.

  python benchmarks/round_throughput.py --models mlp cnn --clients 10 100 1000 \\
      --skip-loop-above cnn=100

It prints a markdown table and writes JSON to `--output` (default
benchmarks/results/round_throughput_<platform>.json, rewritten after every row) with a .md
table next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import compile as compile_lib
from fedjax_sim import local, models, reference, runner
from fedjax_sim.algorithms.base import resolve_chunk_size
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.data import FederatedData, from_clients
from fedjax_sim.datasets import text as text_lib
from fedjax_sim.losses import cross_entropy

import machine  # benchmarks/machine.py: device, versions, load, commit

# Inputs: MNIST-shaped images (28x28 floats, 10 classes) or Shakespeare-shaped text (80
# token ids per example, a label per token, the Shakespeare task's vocabulary).
TEXT_LENGTH = 80
VOCAB = text_lib.vocab_size()
MODELS: dict[str, Callable[[], models.Model]] = {
    "logreg": lambda: models.logistic_regression(784, 10),
    "mlp": lambda: models.mlp(),
    "cnn": lambda: models.cnn(conv_impl="patches"),
    "cnn_lax": lambda: models.cnn(conv_impl="lax"),
    "cnn_seq": lambda: models.cnn(conv_impl="sequential"),
    "char_rnn": lambda: models.char_rnn(VOCAB),
}
TEXT_MODELS = {"char_rnn"}
MODEL_NAMES = {
    "logreg": "logistic regression 784-10",
    "mlp": "2NN MLP 784-200-200-10",
    "cnn": "FedAvg CNN, conv as patches @ weights",
    "cnn_lax": "FedAvg CNN, conv as lax.conv",
    "cnn_seq": "FedAvg CNN, conv per client in canonical layout (conv.py sequential; CPU default)",
    "char_rnn": f"next-character model: embedding 8, 2 GRU layers of 256, {TEXT_LENGTH} tokens",
}
# Clients trained at once by default: fedavg's client_chunk_size="auto" (all on
# accelerators, a few on a CPU), at most these many: the CNN's conv2 patches alone are
# ~12.5 MB per client at batch 20, so 1000 clients at once would need tens of GB.
DEFAULT_MAX_CHUNK = {"logreg": 1000, "mlp": 1000, "cnn": 100, "cnn_lax": 100, "cnn_seq": 100,
                     "char_rnn": 100}


def example_spec(name: str) -> tuple[tuple[int, ...], jnp.dtype, tuple[int, ...]]:
  """(input shape, input dtype, label shape) of one example for model `name`."""
  if name in TEXT_MODELS:
    return (TEXT_LENGTH,), jnp.int32, (TEXT_LENGTH,)
  return (28, 28), jnp.float32, ()


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
  p.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000],
                 help="clients per round")
  p.add_argument("--num-clients", type=int, default=None,
                 help="clients in the data set (default: the largest --clients)")
  p.add_argument("--examples-per-client", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=20)
  sched = p.add_mutually_exclusive_group()
  sched.add_argument("--steps", type=int, default=None, help="local steps (default 5)")
  sched.add_argument("--epochs", type=int, default=None, help="local epochs instead of steps")
  p.add_argument("--client-lr", type=float, default=0.05)
  p.add_argument("--server-lr", type=float, default=1.0)
  p.add_argument("--repeats", type=int, default=5, help="timed vectorized rounds (median)")
  p.add_argument("--loop-repeats", type=int, default=None,
                 help="timed loop rounds (default: --repeats)")
  p.add_argument("--skip-loop-above", nargs="*", default=[],
                 help="skip the loop reference above this many clients per round: N for "
                      "every model, or MODEL=N for one (e.g. 1000 cnn=100)")
  p.add_argument("--client-chunk-size", nargs="*", default=[],
                 help="most clients trained at once (client_chunk_size is the largest "
                      "divisor of clients per round not above it): N or MODEL=N; default: "
                      "what client_chunk_size='auto' picks, at most "
                      + ", ".join(f"{k}={v}" for k, v in DEFAULT_MAX_CHUNK.items()))
  p.add_argument("--also-chunk-size", nargs="*", default=[],
                 help="also time the vectorized round with this client_chunk_size (largest "
                      "divisor not above it; at least the clients per round: all at once), "
                      "interleaved with the others: N or MODEL=N")
  p.add_argument("--no-plain-jit", action="store_true",
                 help="do not time the vectorized round under plain jax.jit")
  p.add_argument("--skip-plain-jit-above", nargs="*", default=[],
                 help="skip the plain jax.jit round above this many clients per round: N or "
                      "MODEL=N")
  p.add_argument("--loop-default-fusions", action="store_true",
                 help="also time the loop reference without compile.compiler_options()")
  p.add_argument("--no-centralized", action="store_true",
                 help="do not time the centralized ceiling")
  p.add_argument("--no-roofline", action="store_true",
                 help="do not measure the device's matmul rate and bandwidth (no roofline)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None,
                 help="JSON path (default benchmarks/results/round_throughput_<platform>.json); "
                      "a .md table is written next to it")
  p.add_argument("--merge", action="store_true",
                 help="keep the rows of an existing --output file for (model, clients, "
                      "client_chunk_size) not rerun")
  args = p.parse_args(argv)
  if args.steps is None and args.epochs is None:
    args.steps = 5
  if args.loop_repeats is None:
    args.loop_repeats = args.repeats
  args.skip_loop_above = per_model(args.skip_loop_above, "--skip-loop-above", None)
  args.skip_plain_jit_above = per_model(args.skip_plain_jit_above, "--skip-plain-jit-above",
                                        None)
  args.also_chunk_size = per_model(args.also_chunk_size, "--also-chunk-size", None)
  args.client_chunk_size = per_model(args.client_chunk_size, "--client-chunk-size", "auto")
  if args.num_clients is None:
    args.num_clients = max(args.clients)
  if args.num_clients < max(args.clients):
    p.error(f"--num-clients={args.num_clients} is below --clients {max(args.clients)}")
  return args


def per_model(tokens: list[str], flag: str, default) -> dict[str, int | str | None]:
  """Parses ['N', 'MODEL=N', ...] into {model: N} (`default` where not given)."""
  out = dict(default) if isinstance(default, dict) else {m: default for m in MODELS}
  for token in tokens:
    name, _, value = token.rpartition("=")
    if name and name not in MODELS:
      raise SystemExit(f"{flag}: unknown model {name!r}")
    for m in [name] if name else MODELS:
      out[m] = int(value)
  return out


def chunk_size(clients: int, most: int | None) -> int | None:
  """The largest divisor of `clients` not above `most` (None: all clients at once)."""
  if most is None or most >= clients:
    return None
  return max(d for d in range(1, most + 1) if clients % d == 0)


def make_data(num_clients: int, examples: int, seed: int, text: bool = False) -> FederatedData:
  """MNIST-shaped random data (28x28 floats in [0, 1), labels in 0..9) or, with `text`,
  Shakespeare-shaped random token ids, each label the next token."""
  rng = np.random.default_rng(seed)
  if text:
    tokens = rng.integers(1, VOCAB, (num_clients, examples, TEXT_LENGTH + 1), dtype=np.int32)
    x, y, classes = tokens[..., :-1], tokens[..., 1:], VOCAB
  else:
    x = rng.random((num_clients, examples, 28, 28), dtype=np.float32)
    y, classes = rng.integers(0, 10, (num_clients, examples)), 10
  return from_clients(list(x), list(y), num_classes=classes)


def examples_per_client(n: int, batch_size: int, steps: int | None, epochs: int | None) -> int:
  """Examples one client with n examples processes in local training (repeats counted)."""
  spe = local.steps_per_epoch(n, batch_size)
  total = steps if steps is not None else epochs * spe
  return sum(min(batch_size, n - (s % spe) * batch_size) for s in range(total))


def copy_tree(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def max_abs_diff(a, b) -> float:
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda u, v: jnp.max(jnp.abs(jnp.asarray(u) - jnp.asarray(v))), a, b))
  return float(max(leaves))


@contextlib.contextmanager
def default_fusions():
  """While active, `compile_lib.jit` builds plain `jax.jit`s (no CPU compiler options).

  Used only to build a second ReferenceFedAvg for `--loop-default-fusions`; the package's
  `compile.jit` reads `compiler_options()` when a function is wrapped.
  """
  saved = compile_lib.compiler_options
  compile_lib.compiler_options = lambda: None
  try:
    yield
  finally:
    compile_lib.compiler_options = saved


class Timed:
  """One timed variant: `state = step(state)` is one round (or one centralized run)."""

  def __init__(self, step: Callable, state, repeats: int, info: dict):
    self.step, self.state, self.repeats, self.info = step, state, repeats, info
    self.times: list[float] = []
    self.cpu_times: list[float] = []

  def run_once(self) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    self.state = jax.block_until_ready(self.step(self.state))
    self.times.append(time.perf_counter() - start)
    self.cpu_times.append(time.process_time() - cpu_start)

  def summary(self) -> dict:
    return {**self.info, "median_s": statistics.median(self.times), "min_s": min(self.times),
            "times_s": self.times, "median_cpu_s": statistics.median(self.cpu_times),
            "cpu_times_s": self.cpu_times}


def time_interleaved(variants: dict[str, Timed]) -> dict[str, dict]:
  """Times the variants round-robin (one round of each in turn), so that all of them see
  the same load from other processes; ratios of their medians are what to compare.

  CPU seconds (this process, all threads) are recorded too: on a shared machine they move
  less with other processes' load than wall time does.
  """
  for i in range(max(v.repeats for v in variants.values())):
    for v in variants.values():
      if i < v.repeats:
        v.run_once()
  return {name: v.summary() for name, v in variants.items()}


def memory_info(compiled) -> dict:
  """XLA's memory analysis of a compiled round: arguments, outputs, temporaries."""
  try:
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes)}
  except Exception:  # not every backend reports it
    return {}


def prepare_vectorized(jitted, state0, data, repeats: int) -> tuple[Timed, object]:
  """Compiles `jitted(state, data)` ahead of time and runs one warm-up round.

  Returns (the Timed round, the parameters after the warm-up round, on the host).
  """
  state = copy_tree(state0)  # the chunk donates its state
  start = time.perf_counter()
  compiled = jitted.lower(state, data).compile()
  info = {"compile_s": time.perf_counter() - start, **memory_info(compiled)}
  start = time.perf_counter()
  state, _ = jax.block_until_ready(compiled(state, data))
  info["first_round_s"] = time.perf_counter() - start
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU; GPUs report their peak
  if "peak_bytes_in_use" in stats:
    info["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return Timed(lambda s: compiled(s, data)[0], state, repeats, info), jax.device_get(state.params)


def prepare_loop(ref: reference.ReferenceFedAvg, state0, data, repeats: int):
  """Runs one warm-up round (it compiles the per-batch step); returns (Timed, params)."""
  start = time.perf_counter()
  state = jax.block_until_ready(ref.round(state0, data)[0])
  info = {"first_round_s": time.perf_counter() - start}
  return Timed(lambda s: ref.round(s, data)[0], state, repeats, info), jax.device_get(state.params)


def training_cost(name: str, clients: int, args) -> dict:
  """FLOPs and bytes of a round's local training, counted by XLA's cost analysis.

  FLOPs: one SGD step (forward, backward, update) with one set of weights on all
  clients' examples, times the local steps. Bytes: the compiled step vmapped over
  clients, each with its own weights, times the local steps: XLA's count of what its
  fused kernels read and write, so every client's weights, gradients and activations
  are read and rewritten each step (which one set of weights does once).
  (The cost analysis of the round itself counts a scan's body once, not once per step.)
  The CNNs are counted with `lax.conv`, so that extracting patches is not counted as work.
  """
  model = MODELS["cnn_lax" if name.startswith("cnn") else name]()
  total_steps = args.steps if args.steps is not None else args.epochs * local.steps_per_epoch(
      args.examples_per_client, args.batch_size)
  loss = cross_entropy(model.apply)

  def step(params, x, y):
    grads = jax.grad(lambda p: jnp.mean(loss(p, x, y)))(params)
    return jax.tree_util.tree_map(lambda p, g: p - args.client_lr * g, params, grads)

  def cost(compiled) -> dict:
    c = compiled.cost_analysis()
    return c[0] if isinstance(c, (list, tuple)) else c

  x_shape, x_dtype, y_shape = example_spec(name)
  batch = clients * args.batch_size
  flops = cost(jax.jit(step).lower(
      model.params, jax.ShapeDtypeStruct((batch, *x_shape), x_dtype),
      jax.ShapeDtypeStruct((batch, *y_shape), jnp.int32)))["flops"]
  stacked = jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((clients, *p.shape), p.dtype), model.params)
  per_client = cost(compile_lib.jit(jax.vmap(step)).lower(
      stacked, jax.ShapeDtypeStruct((clients, args.batch_size, *x_shape), x_dtype),
      jax.ShapeDtypeStruct((clients, args.batch_size, *y_shape), jnp.int32)).compile())
  return {"flops": float(flops) * total_steps,
          "bytes": float(per_client["bytes accessed"]) * total_steps}


def roofline(cost: dict, peaks: dict) -> dict:
  """The roofline bound on a round's local training: the slower of doing its FLOPs at
  the measured matmul rate and moving its bytes at the measured bandwidth."""
  compute_s = cost["flops"] / peaks["matmul_flops_per_s"]
  memory_s = cost["bytes"] / peaks["memory_bytes_per_s"]
  return {"roofline_s": max(compute_s, memory_s),
          "roofline_bound": "compute" if compute_s >= memory_s else "memory",
          "roofline_compute_s": compute_s, "roofline_memory_s": memory_s}


def prepare_centralized(name: str, model: models.Model, clients: int, args,
                        repeats: int) -> Timed:
  """One set of weights, as many SGD steps as a client takes, on batches of
  clients * batch_size examples: the same FLOPs as the round's local training."""
  total_steps = args.steps if args.steps is not None else args.epochs * local.steps_per_epoch(
      args.examples_per_client, args.batch_size)
  batch = clients * args.batch_size
  rng = np.random.default_rng(args.seed + 1)
  if name in TEXT_MODELS:
    x = jnp.asarray(rng.integers(1, VOCAB, (total_steps, batch, TEXT_LENGTH), dtype=np.int32))
    y = jnp.asarray(rng.integers(1, VOCAB, (total_steps, batch, TEXT_LENGTH), dtype=np.int32))
  else:
    x = jnp.asarray(rng.random((total_steps, batch, 28, 28), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, (total_steps, batch)))
  loss = cross_entropy(model.apply)
  opt = optax.sgd(args.client_lr)

  def train(params, x, y):
    def step(carry, xy):
      params, opt_state = carry
      grads = jax.grad(lambda p: jnp.mean(loss(p, *xy)))(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt.init(params)), (x, y))[0][0]

  params = model.params
  start = time.perf_counter()
  compiled = compile_lib.jit(train).lower(params, x, y).compile()
  info = {"compile_s": time.perf_counter() - start, "steps": total_steps, "batch": batch}
  jax.block_until_ready(compiled(params, x, y))
  return Timed(lambda p: compiled(p, x, y), params, repeats, info)


def bench_one(name: str, clients: int, data: FederatedData, args,
              peaks: dict | None) -> dict:
  model = MODELS[name]()
  most = args.client_chunk_size[name]
  if most == "auto":
    auto = resolve_chunk_size("auto", clients, model.params)
    most = DEFAULT_MAX_CHUNK[name] if auto is None else min(auto, DEFAULT_MAX_CHUNK[name])
  chunk = chunk_size(clients, most)
  kwargs = dict(client_optimizer=optax.sgd(args.client_lr),
                server_optimizer=optax.sgd(args.server_lr), clients_per_round=clients,
                batch_size=args.batch_size, steps=args.steps, epochs=args.epochs)
  algorithm = fedavg(model.apply, client_chunk_size=chunk, **kwargs)
  state0 = algorithm.init(model.params, jax.random.key(args.seed))
  algorithm.validate(state0, data)
  per_client = examples_per_client(args.examples_per_client, args.batch_size, args.steps,
                                   args.epochs)
  row = {"model": name, "model_name": MODEL_NAMES[name], "clients": clients,
         "client_chunk_size": chunk, "examples_per_round": clients * per_client,
         "params": models.num_params(model.params)}
  log = lambda msg: print(f"  [{name} x{clients}] {msg}", flush=True)

  variants: dict[str, Timed] = {}
  variants["vectorized"], vec_params = prepare_vectorized(
      runner.make_chunk(algorithm, 1), state0, data, args.repeats)
  log(f"vectorized compiled in {variants['vectorized'].info['compile_s']:.1f} s")

  plain_limit = args.skip_plain_jit_above[name]
  if args.no_plain_jit or compile_lib.compiler_options() is None:
    pass
  elif plain_limit is not None and clients > plain_limit:
    row["vectorized_plain_jit"] = {
        "skipped": f"clients per round {clients} > --skip-plain-jit-above {plain_limit}"}
  else:
    def chunk_fn(state, data):  # runner.make_chunk's body, under plain jax.jit
      return jax.lax.scan(lambda s, _: algorithm.round(s, data), state, None, length=1)
    plain, plain_params = prepare_vectorized(jax.jit(chunk_fn, donate_argnums=0), state0, data,
                                             args.repeats)
    plain.info["max_abs_param_diff_vs_vectorized"] = max_abs_diff(plain_params, vec_params)
    variants["vectorized_plain_jit"] = plain

  also = chunk_size(clients, args.also_chunk_size[name])
  if args.also_chunk_size[name] is not None and also != chunk:
    chunked = fedavg(model.apply, client_chunk_size=also, **kwargs)
    variants["vectorized_chunked"], chunked_params = prepare_vectorized(
        runner.make_chunk(chunked, 1), state0, data, args.repeats)
    variants["vectorized_chunked"].info.update(
        client_chunk_size=also, max_abs_param_diff_vs_vectorized=max_abs_diff(chunked_params,
                                                                              vec_params))

  limit = args.skip_loop_above[name]
  if limit is not None and clients > limit:
    row["loop"] = {"skipped": f"clients per round {clients} > --skip-loop-above {limit}"}
  else:
    ref = reference.ReferenceFedAvg(model.apply, **kwargs)
    loop, loop_params = prepare_loop(ref, state0, data, args.loop_repeats)
    loop.info["max_abs_param_diff_vs_vectorized"] = max_abs_diff(loop_params, vec_params)
    variants["loop"] = loop
    log(f"loop warmed up; parameters after round 1 differ from the vectorized ones by "
        f"{loop.info['max_abs_param_diff_vs_vectorized']:.2e}")
    if args.loop_default_fusions and compile_lib.compiler_options() is not None:
      with default_fusions():
        ref = reference.ReferenceFedAvg(model.apply, **kwargs)
      variants["loop_plain_jit"], _ = prepare_loop(ref, state0, data, args.loop_repeats)

  if not args.no_centralized:
    variants["centralized"] = prepare_centralized(name, model, clients, args, args.repeats)

  row.update(time_interleaved(variants))
  for key in ("vectorized", "vectorized_plain_jit", "vectorized_chunked", "loop",
              "loop_plain_jit", "centralized"):
    if "median_s" in row.get(key, {}):
      log(f"{key}: {row[key]['median_s']:.4f} s (CPU {row[key]['median_cpu_s']:.4f} s)")
    elif key in row:
      log(f"{key}: skipped")
  vec = row["vectorized"]
  vec_s = vec["median_s"]
  row["vectorized_examples_per_s"] = row["examples_per_round"] / vec_s
  if "median_s" in row["loop"]:
    row["loop_examples_per_s"] = row["examples_per_round"] / row["loop"]["median_s"]
    row["loop_over_vectorized"] = row["loop"]["median_s"] / vec_s
    row["loop_over_vectorized_cpu"] = row["loop"]["median_cpu_s"] / vec["median_cpu_s"]
  if "vectorized_chunked" in row:
    row["chunked_over_vectorized"] = row["vectorized_chunked"]["median_s"] / vec_s
  if "median_s" in row.get("vectorized_plain_jit", {}):
    row["plain_jit_over_vectorized"] = row["vectorized_plain_jit"]["median_s"] / vec_s
  if "centralized" in row:
    row["vectorized_over_centralized"] = vec_s / row["centralized"]["median_s"]
  try:
    cost = training_cost(name, clients, args)
  except Exception as e:  # cost analysis is best effort
    log(f"no FLOP or byte count: {e}")
    return row
  row["training_flops_per_round"] = cost["flops"]
  row["training_bytes_per_round"] = cost["bytes"]
  row["vectorized_gflops_per_s"] = cost["flops"] / vec_s / 1e9
  if peaks:
    row.update(roofline(cost, peaks))
    row["roofline_over_vectorized"] = row["roofline_s"] / vec_s
  return row


def _fmt_bytes(num: int | None) -> str:
  return "-" if num is None else f"{num / 2**20:,.0f} MiB"


def _fmt_s(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
  meta, dev = result["meta"], result["meta"]["device"]
  lines = [
      f"# FedAvg round throughput ({dev['platform']}: {dev['device_kind']})",
      "",
      f"jax {dev['jax_version']}, jaxlib {dev['jaxlib_version']}, {dev['cpu_count']} CPUs "
      f"({dev['cpu_model']}), compiler options {dev['compiler_options']}.",
      "",
  ]
  for i, run in enumerate(meta["runs"]):
    cfg = run["config"]
    sched = f"{cfg['steps']} local steps" if cfg["steps"] else f"{cfg['epochs']} local epochs"
    lines.append(
        f"Run {i} ({run['date']}, commit {run['git_commit']}): `{run['command']}`. Synthetic "
        f"data (28x28 images; {TEXT_LENGTH}-token texts for {', '.join(sorted(TEXT_MODELS))}), {cfg['num_clients']} clients of {cfg['examples_per_client']} examples, "
        f"{sched} of batch {cfg['batch_size']}, client SGD lr {cfg['client_lr']}, server SGD "
        f"lr {cfg['server_lr']}; median of {cfg['repeats']} rounds (loop: "
        f"{cfg['loop_repeats']}) after a warm-up round." + (
            f" Measured roofs: {run['peaks']['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s "
            f"(float32 {run['peaks']['matmul_n']}^2 matmul), "
            f"{run['peaks']['memory_bytes_per_s'] / 1e9:,.1f} GB/s (x + 1 on "
            f"{run['peaks']['bandwidth_array_mib']} MiB)." if "peaks" in run else ""))
  lines += [
      "",
      "| model | clients | vectorized | loop | loop / vectorized | same, CPU time "
      "| vectorized ex/s | GFLOP/s | loop ex/s "
      "| compile | plain jax.jit | plain / vectorized | centralized ceiling "
      "| vectorized / centralized | roofline | roofline / vectorized | XLA temp | device peak "
      "| run |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in result["results"]:
    loop = r["loop"]
    plain = r.get("vectorized_plain_jit", {})
    cent = r.get("centralized", {})
    model = r["model"] + (f" (chunks of {r['client_chunk_size']})"
                          if r["client_chunk_size"] else "")
    lines.append(
        f"| {model} | {r['clients']} | {_fmt_s(r['vectorized']['median_s'])} | "
        f"{_fmt_s(loop.get('median_s')) if 'median_s' in loop else 'skipped'} | "
        f"{_fmt(r.get('loop_over_vectorized'), '.2f')} | "
        f"{_fmt(r.get('loop_over_vectorized_cpu'), '.2f')} | "
        f"{_fmt(r['vectorized_examples_per_s'], ',.0f')} | "
        f"{_fmt(r.get('vectorized_gflops_per_s'), '.1f')} | "
        f"{_fmt(r.get('loop_examples_per_s'), ',.0f')} | "
        f"{r['vectorized']['compile_s']:.1f} s | "
        f"{'skipped' if 'skipped' in plain else _fmt_s(plain.get('median_s'))} | "
        f"{_fmt(r.get('plain_jit_over_vectorized'), '.2f')} | {_fmt_s(cent.get('median_s'))} | "
        f"{_fmt(r.get('vectorized_over_centralized'), '.2f')} | "
        f"{_fmt_s(r.get('roofline_s'))}{' (' + r['roofline_bound'] + ')' if 'roofline_bound' in r else ''} | "
        f"{_fmt(r.get('roofline_over_vectorized'), '.0%')} | "
        f"{_fmt_bytes(r['vectorized'].get('temp_bytes'))} | "
        f"{_fmt_bytes(r['vectorized'].get('device_peak_bytes'))} | {r['run']} |")
  lines += [
      "",
      "All variants of a row are timed round-robin (one round of each in turn), so they see "
      "the same load. "
      "vectorized: `runner.make_chunk(algorithm, 1)` with `compile.compiler_options()`, "
      "clients in the chunks the model column names (by default what "
      "`client_chunk_size=\"auto\"` picks on the device, at most DEFAULT_MAX_CHUNK); "
      "plain jax.jit: the same round without them; loop: `reference.ReferenceFedAvg.round`; "
      "centralized: one set of weights, the same number of SGD steps on batches of "
      "clients x batch size (the same FLOPs). XLA temp: the compiled vectorized round's "
      "temporaries (memory_analysis); device peak: the device's peak bytes in use after its "
      "first round where the backend reports it (GPUs; '-' on CPU). 'same, CPU time': loop / vectorized in process CPU "
      "seconds (all threads), steadier than wall time on a shared machine. GFLOP/s: the "
      "vectorized round's local-training FLOPs (XLA's count for one centralized step times the "
      "steps) per second. roofline: the slower of the round's local-training FLOPs at the "
      "measured matmul rate and its bytes at the measured bandwidth (bytes: XLA's count for "
      "the compiled step vmapped over clients, times the steps; each client's weights are "
      "read and rewritten every step), with the bound that sets it; roofline / vectorized: "
      "the fraction of that bound the vectorized round achieves. ex/s: examples processed "
      "in local training per second. Loop rows marked skipped were not run (`--skip-loop-above`).",
  ]
  if any("vectorized_chunked" in r for r in result["results"]):
    chunks = lambda c: "all clients at once" if c is None else f"chunks of {c}"
    lines += ["", "The vectorized round with other client chunks (`--also-chunk-size`, timed "
              "interleaved with the row above):", ""]
    lines += [f"- {r['model']} x{r['clients']}, "
              f"{chunks(r['vectorized_chunked']['client_chunk_size'])}: "
              f"{_fmt_s(r['vectorized_chunked']['median_s'])} (the row's "
              f"{chunks(r['client_chunk_size'])}: {_fmt_s(r['vectorized']['median_s'])}; loop: "
              f"{_fmt_s(r['loop'].get('median_s')) if 'median_s' in r['loop'] else 'skipped'})"
              for r in result["results"] if "vectorized_chunked" in r]
  if any("loop_plain_jit" in r for r in result["results"]):
    lines += ["", "Loop reference without `compile.compiler_options()`:", ""]
    lines += [f"- {r['model']} x{r['clients']}: {_fmt_s(r['loop_plain_jit']['median_s'])} "
              f"(with them: {_fmt_s(r['loop']['median_s'])})"
              for r in result["results"] if "loop_plain_jit" in r]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = machine.device_info()
  output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"round_throughput_{info['platform']}.json")
  config = {k: getattr(args, k) for k in (
      "models", "clients", "num_clients", "examples_per_client", "batch_size", "steps",
      "epochs", "client_lr", "server_lr", "repeats", "loop_repeats", "skip_loop_above",
      "skip_plain_jit_above", "client_chunk_size", "also_chunk_size", "seed")}
  print(f"device: {info['platform']} ({info['device_kind']}), jax {info['jax_version']}, "
        f"compiler options {info['compiler_options']}", flush=True)
  run = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "git_commit": machine.git_commit(), "config": config}
  if not args.no_roofline:
    run["peaks"] = machine.measured_peaks()
    print(f"measured peaks: {run['peaks']['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s float32 "
          f"matmul, {run['peaks']['memory_bytes_per_s'] / 1e9:,.1f} GB/s", flush=True)
  runs, old_rows = [run], []
  if args.merge and os.path.exists(output):
    with open(output) as f:
      old = json.load(f)
    if old["meta"]["device"]["device_kind"] != info["device_kind"]:
      raise SystemExit(f"--merge: {output} was measured on {old['meta']['device']['device_kind']}")
    runs, old_rows = old["meta"]["runs"] + runs, old["results"]
  datasets = {}  # image and text data, made when a model first needs them
  rows, result = [], None
  for name in args.models:
    for clients in args.clients:
      print(f"{name}, {clients} clients per round", flush=True)
      text = name in TEXT_MODELS
      if text not in datasets:
        datasets[text] = make_data(args.num_clients, args.examples_per_client, args.seed, text)
      row = bench_one(name, clients, datasets[text], args, run.get("peaks"))
      row["run"] = len(runs) - 1
      rows.append(row)
      # Written after every row, so that an interrupted run keeps what it measured.
      result = write(output, info, runs, old_rows, rows)
  print()
  print(markdown(result))
  print(f"wrote {output} and {os.path.splitext(output)[0]}.md")
  return result


def write(output: str, info: dict, runs: list, old_rows: list, rows: list) -> dict:
  """Writes the JSON and markdown results: new rows replace old ones of the same key."""
  key = lambda r: (r["model"], r["clients"], r["client_chunk_size"])
  done = {key(r) for r in rows}
  rows = [r for r in old_rows if key(r) not in done] + rows
  rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["clients"],
                           r["client_chunk_size"] or r["clients"]))
  used = sorted({r["run"] for r in rows})  # drop runs whose rows were all replaced
  renumber = {old: new for new, old in enumerate(used)}
  rows = [{**r, "run": renumber[r["run"]]} for r in rows]
  result = {"meta": {"device": info, "runs": [runs[i] for i in used]}, "results": rows}
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(output)[0] + ".md", "w") as f:
    f.write(markdown(result))
  return result


if __name__ == "__main__":
  main()
