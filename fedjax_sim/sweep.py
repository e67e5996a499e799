"""Hyperparameter x seed sweeps as one compiled program per shape.

The purejaxrl pattern (`make_train(config)` returning a pure `train(key)`): the user
gives `make_algorithm(hparams)`, a function that builds a FederatedAlgorithm from a
dict of hyperparameters. Traced hyperparameters (learning rates, mu, a noise
multiplier...) arrive as scalar tracers, so the algorithm is built *inside* the
vmapped program and every configuration shares one compilation; `optax.sgd(lr)`,
`fs.fedavg(...)` and friends accept traced scalars as they are. Shape-changing
settings (clients per round, local steps, batch size, model) go in `static`: each
combination of them is its own compilation, run one after another.

    result = fs.sweep(
        lambda hp: fs.fedavg(apply, client_optimizer=optax.sgd(hp["client_lr"]),
                             clients_per_round=hp["clients_per_round"], batch_size=10,
                             epochs=1),
        params, train, grid={"client_lr": [0.01, 0.1]}, seeds=[0, 1],
        static={"clients_per_round": [5, 10]}, rounds=50, evaluate=evaluate)
    result.rows        # one dict per configuration and seed: final and best metrics
    result.curves      # metric -> [configurations, rounds]

A configuration with seed s starts from `jax.random.key(s)`, exactly as
`algorithm.init(params, jax.random.key(s))` does in a separate run, so each row
equals the separate `fs.run` of that configuration (tested).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import checkpoint as checkpoint_lib
from fedjax_sim import compile as compile_lib
from fedjax_sim import runner, sharding
from fedjax_sim.plots import plot_colours
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.data import FederatedData

Hyperparams = dict[str, Any]


@dataclasses.dataclass
class SweepResult:
  """What a sweep returns.

  Attributes:
    rows: one dict per configuration and seed: its hyperparameters, `seed`,
      `final_<metric>` and `best_<metric>` (max for accuracies, min otherwise) of
      `train_loss` and of every evaluation metric; `diverged` (bool) and
      `diverged_round` (the first round whose training loss means divergence by
      `runner.DIVERGENCE_RULE`, as `fs.run` stops; None if none). A row cannot stop
      alone inside the vmapped program, so a diverged row runs to the end, marked.
    curves: per-round training metrics, name -> array [len(rows), rounds].
    eval_rounds: the rounds at which `evaluate` ran (the end of each chunk).
    eval_curves: evaluation metrics, name -> array [len(rows), len(eval_rounds)].
    params: the final model parameters of each row, as a list of pytrees.
    seconds: wall time per static group (compilation included), in group order.
  """

  rows: list[dict[str, Any]]
  curves: dict[str, np.ndarray]
  eval_rounds: np.ndarray
  eval_curves: dict[str, np.ndarray]
  params: list[Any]
  seconds: list[float]

  def column(self, name: str) -> np.ndarray:
    """The values of `name` over the rows (NaN where a row lacks it)."""
    return np.array([r.get(name, np.nan) for r in self.rows])

  def plot(self, metric: str = "test_accuracy", ax=None):
    """Curves of `metric` against rounds (needs matplotlib): one colour per configuration
    (distinct up to 20 with tab10/tab20, spread over a continuous colormap beyond), one
    line style per seed, and a legend of configurations and seeds outside the axes."""
    import matplotlib.pyplot as plt  # lazy: an optional extra
    from matplotlib.lines import Line2D

    if ax is None:
      _, ax = plt.subplots(figsize=(8, 4.5))
    if metric in self.eval_curves:
      x, ys = self.eval_rounds, self.eval_curves[metric]
    else:
      ys = self.curves[metric]
      x = np.arange(1, ys.shape[1] + 1)
    skip = ("seed", "diverged", "diverged_round")
    labels = [", ".join(f"{k}={v}" for k, v in row.items()
                        if k not in skip and not k.startswith(("final_", "best_")))
              for row in self.rows]
    configs = list(dict.fromkeys(labels))
    seeds = list(dict.fromkeys(row.get("seed") for row in self.rows))
    colours = plot_colours(len(configs))
    for row, label, y in zip(self.rows, labels, ys):
      ax.plot(x, y, color=colours[configs.index(label)],
              **_seed_style(seeds.index(row.get("seed"))),
              label=f"{label}, seed={row.get('seed')}")
    handles = [Line2D([], [], color=c, label=label or "(one configuration)")
               for c, label in zip(colours, configs)]
    if len(seeds) > 1:
      handles += [Line2D([], [], color="gray", **_seed_style(i), label=f"seed={seed}")
                  for i, seed in enumerate(seeds)]
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.legend(handles=handles, fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=1 + len(handles) // 25)
    return ax


_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = (None, "o", "s", "^", "x", "D", "v", "*")


def _seed_style(i: int) -> dict[str, Any]:
  """The i-th seed's line style, and a marker from the fifth on: 32 seeds apart."""
  return {"linestyle": _LINE_STYLES[i % 4], "marker": _MARKERS[i // 4 % len(_MARKERS)],
          "markersize": 4}


def _product(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def make_sweep_chunk(make_algorithm: Callable[[Hyperparams], FederatedAlgorithm],
                     static: Hyperparams, length: int) -> Callable:
  """jit(vmap(scan over `length` rounds)) over a leading configuration axis.

  Args:
    make_algorithm: `hparams -> FederatedAlgorithm`.
    static: the shape-changing hyperparameters of this compilation.
    length: rounds per call.

  Returns:
    `(states, traced_hparams, data) -> (states, metrics)`: states, hparams and
    metrics with a leading configuration axis, the data shared (an argument, not
    a constant baked into the program); the states are donated.
  """

  def one(state, hparams, data):
    algorithm = make_algorithm({**hparams, **static})
    return jax.lax.scan(lambda s, _: algorithm.round(s, data), state, None, length=length)

  return compile_lib.jit(jax.vmap(one, in_axes=(0, 0, None)), donate_argnums=0)


def _best(name: str, values: np.ndarray) -> float:
  """The best finite value (NaN if none), as `results.Run.best`: a round that went NaN
  made best_<metric> NaN here while `fedjax-sim runs` showed the best before it."""
  finite = values[np.isfinite(values)]
  if not finite.size:
    return float("nan")
  return float(np.max(finite) if "accuracy" in name else np.min(finite))


def sweep(
    make_algorithm: Callable[[Hyperparams], FederatedAlgorithm],
    params: Any,
    data: FederatedData,
    *,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    static: Mapping[str, Sequence[Any]] | None = None,
    rounds: int,
    rounds_per_chunk: int | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    num_clients: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> SweepResult:
  """Runs every configuration of `grid` x `seeds` (x `static`) for `rounds` rounds.

  Args:
    make_algorithm: `hparams -> FederatedAlgorithm`, called inside the program
      with the traced values of `grid` (scalar tracers) and the Python values of
      `static`; it must not branch on traced values in Python.
    params: the initial model parameters, shared by every configuration.
    data: the training FederatedData.
    grid: traced hyperparameters, name -> values; their product is vmapped.
    seeds: the seeds of `jax.random.key(seed)` for each configuration.
    static: shape-changing hyperparameters, name -> values; each combination is
      a separate compilation.
    rounds: rounds per configuration.
    rounds_per_chunk: rounds per compiled call (evaluation happens after each);
      default all rounds in one call.
    evaluate: `params -> dict` of held-out metrics, run on the host for each
      configuration after each chunk.
    num_clients: passed to `init` for algorithms with per-client state.
    mesh: split the configurations over this mesh's first axis (their number a
      multiple of its size); the data is replicated on it.
    checkpoint_dir: checkpoint each static group's vmapped states, curves and
      evaluations here (`group<i>/`, orbax) at chunk boundaries, at the group's end and
      when SIGINT/SIGTERM stops the sweep (`runner.Interrupted`, after the chunk).
    checkpoint_every: rounds between checkpoints (whole chunks); None: about every
      `runner.CHECKPOINT_SECONDS` of wall time; 0: at group ends and interruptions.
    resume: continue each group from its newest checkpoint in `checkpoint_dir` (a
      finished group is not run again); the result equals the uninterrupted sweep's.

  Returns:
    A SweepResult: rows in the order static x grid x seeds.
  """
  if not isinstance(rounds, int) or rounds <= 0:
    raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
  if rounds_per_chunk is not None and not (isinstance(rounds_per_chunk, int)
                                           and rounds_per_chunk > 0):
    # -1 looped for ever, as fs.run refuses too
    raise ValueError(f"rounds_per_chunk must be a positive integer, got {rounds_per_chunk!r}")
  rounds_per_chunk = rounds_per_chunk or rounds
  if not grid:
    raise ValueError("grid needs at least one hyperparameter with at least one value")
  for what, values_of in (("grid", grid), ("static", static or {})):
    for name, values in values_of.items():
      # A string ran letter by letter; a number failed deep inside; [] made no rows.
      if isinstance(values, (str, bytes)) or not isinstance(values,
                                                           Sequence | np.ndarray | jax.Array):
        raise ValueError(f"{what}[{name!r}] must be a list of values, got {values!r}")
      if len(values) == 0:
        raise ValueError(f"{what}[{name!r}] needs at least one value")
      if len(set(map(repr, values))) < len(values):
        raise ValueError(f"{what}[{name!r}] repeats a value: {list(values)!r}")
  if len(seeds) == 0:
    raise ValueError("seeds must not be empty")
  bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer))
         or not 0 <= s < 2**32]
  if bad:  # 0.7 ran as seed 0 (a uint32 cast), reported as 0.7
    raise ValueError(f"seeds must be integers in [0, 2^32), got {bad[0]!r}")
  if len(set(int(s) for s in seeds)) < len(seeds):
    raise ValueError(f"seeds repeat a seed: {[int(s) for s in seeds]}")
  overlap = set(grid) & set(static or {})
  if overlap:
    raise ValueError(f"{sorted(overlap)} are both in grid and static")
  groups = _product(static) if static else [{}]
  # Every configuration built with concrete values, which checks them on the host (the
  # traced builds cannot), before anything compiles; the first of a group validates it.
  probes = []
  for group in groups:
    built = [make_algorithm({**config, **group}) for config in _product(grid)]
    probes.append(built[0])
  traced = [{**config, "seed": seed} for config in _product(grid) for seed in seeds]
  # Each row's grid values and seed as JSON numbers (a checkpoint records them).
  configs = [[float(c[name]) for name in grid] + [int(c["seed"])] for c in traced]
  hparams = {name: jnp.asarray([c[name] for c in traced], jnp.float32) for name in grid}
  keys = jax.vmap(jax.random.key)(jnp.asarray(list(seeds) * (len(traced) // len(seeds)), jnp.uint32))

  if mesh is not None:
    size = mesh.shape[mesh.axis_names[0]]
    if len(traced) % size:
      raise ValueError(f"{len(traced)} configurations do not split over {size} devices")
    hparams = sharding.shard_leading(hparams, mesh)
    data = sharding.replicate(data, mesh)
  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs the checkpoint_dir to resume from")
  rows, params_out, seconds = [], [], []
  curves: list[dict[str, np.ndarray]] = []        # per static group
  eval_curves: list[dict[str, np.ndarray]] = []
  eval_rounds: list[int] = []
  for group, static_config in enumerate(groups):
    start = time.perf_counter()
    probe = probes[group]
    init_args = () if num_clients is None else (num_clients,)
    # jit: fresh output buffers, never aliases of `params` (the chunks donate them).
    states = jax.jit(jax.vmap(lambda hp, key: make_algorithm({**hp, **static_config}).init(
        params, key, *init_args)))(hparams, keys)
    probe.validate(jax.tree_util.tree_map(lambda a: a[0], states), data)
    runner.check_evaluator(evaluate, params)
    if mesh is not None:
      states = sharding.shard_leading(states, mesh)
    group_metrics: list[dict] = []
    group_evals: list[dict] = []
    group_eval_rounds = []
    # One program for every chunk, the shorter final one included (as in `fs.run`).
    call_rounds = math.gcd(rounds_per_chunk, rounds)
    call = make_sweep_chunk(make_algorithm, static_config, call_rounds)
    done = 0
    checkpoints, seconds_before = None, 0.0
    if checkpoint_dir is not None:
      checkpoints = checkpoint_lib.Checkpoints(os.path.join(checkpoint_dir, f"group{group}"))
      if checkpoints.steps() and not resume:
        raise ValueError(f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds checkpoints of "
                         f"an earlier sweep: pass resume=True to continue it, or remove it")
      if resume and checkpoints.steps():
        states, record = checkpoints.restore(states)
        if record["rounds_per_chunk"] != rounds_per_chunk or record["rows"] != len(traced):
          raise ValueError(f"{checkpoints.directory}: written by a sweep of "
                           f"{record['rows']} rows with rounds_per_chunk="
                           f"{record['rounds_per_chunk']}, not this one")
        if record.get("configs", configs) != configs:  # its rows would be relabelled
          raise ValueError(f"{checkpoints.directory}: written by a sweep of other grid "
                           f"values or seeds ({record['configs']}), not this one ({configs})")
        done, seconds_before = record["round"], record["seconds"]
        # Exact: float32/int32 values survive JSON as Python numbers.
        group_metrics.append({n: np.asarray(c["values"], dtype=c["dtype"]).reshape(c["shape"])
                              for n, c in record["curves"].items()})
        group_evals, group_eval_rounds = record["evals"], record["eval_rounds"]
    last_save = time.perf_counter()

    def save_checkpoint():
      curves_so_far = {n: np.concatenate([m[n] for m in group_metrics], axis=1)
                       for n, v in group_metrics[0].items() if np.ndim(v) == 2}
      checkpoints.save(states, {
          "rounds_per_chunk": rounds_per_chunk, "rows": len(traced), "configs": configs,
          "evals": group_evals,
          "eval_rounds": group_eval_rounds,
          "seconds": seconds_before + time.perf_counter() - start,
          "curves": {n: {"dtype": c.dtype.str, "shape": list(c.shape),
                         "values": c.reshape(-1).tolist()}
                     for n, c in curves_so_far.items()}}, step=done)

    try:
      with runner.DeferredSignals() as signals:
        while done < rounds:
          length = min(rounds_per_chunk, rounds - done)
          parts = []
          for _ in range(length // call_rounds):  # queued; fetched once per chunk
            states, metrics = call(states, hparams, data)
            parts.append(metrics)
          group_metrics.extend(jax.device_get(parts))
          done += length
          if evaluate is not None:
            group_eval_rounds.append(done)
            group_evals.append(
                [evaluate(jax.tree_util.tree_map(lambda a, i=i: a[i], states.params))
                 for i in range(len(traced))])
          if checkpoints is not None:
            due = (time.perf_counter() - last_save >= runner.CHECKPOINT_SECONDS
                   if checkpoint_every is None else
                   checkpoint_every > 0 and done % checkpoint_every < length)
            if done >= rounds or signals.signum is not None or due:
              save_checkpoint()
              last_save = time.perf_counter()
          if signals.signum is not None:
            raise runner.Interrupted(signals.signum, done, checkpoint_dir and os.fspath(
                checkpoint_dir))
    finally:
      if checkpoints is not None:
        checkpoints.close()
    seconds.append(seconds_before + time.perf_counter() - start)
    eval_rounds = group_eval_rounds
    scalar_names = [n for n, v in group_metrics[0].items() if np.ndim(v) == 2]
    group_curves = {n: np.concatenate([m[n] for m in group_metrics], axis=1) for n in scalar_names}
    group_eval = {n: np.array([[e[i][n] for e in group_evals] for i in range(len(traced))])
                  for n in (group_evals[0][0] if group_evals else {})}
    for i, config in enumerate(traced):
      row = {**static_config, **config}
      # final/best of the training loss and of every evaluation metric; the rest
      # (bytes, update norms) stay in `curves`.
      summarized = {**{n: v for n, v in group_curves.items() if n == "train_loss"}, **group_eval}
      for name, values in summarized.items():
        row[f"final_{name}"] = float(values[i, -1])
        row[f"best_{name}"] = _best(name, values[i])
      if "train_loss" in group_curves:
        beside = [group_curves.get(n) for n in ("num_aggregated", "num_examples")]
        row["diverged_round"] = runner.diverged_round(
            group_curves["train_loss"][i], *(None if c is None else c[i] for c in beside))
        row["diverged"] = row["diverged_round"] is not None
      rows.append(row)
      params_out.append(jax.tree_util.tree_map(lambda a, i=i: np.asarray(a[i]), states.params))
    curves.append(group_curves)
    eval_curves.append(group_eval)
  return SweepResult(
      rows=rows,
      curves=_stack_groups(curves, len(traced), rounds),
      eval_rounds=np.array(eval_rounds),
      eval_curves=_stack_groups(eval_curves, len(traced), len(eval_rounds)),
      params=params_out,
      seconds=seconds)


def _stack_groups(groups: list[dict[str, np.ndarray]], rows: int, width: int
                  ) -> dict[str, np.ndarray]:
  """Each metric's curves of every static group, one row per configuration in row order:
  NaN rows where a group does not report the metric (systems' metrics in the group with
  systems alone), which would otherwise leave its rows off and misalign the rest."""
  names = dict.fromkeys(name for group in groups for name in group)
  return {name: np.concatenate([group[name] if name in group
                                else np.full((rows, width), np.nan) for group in groups])
          for name in names}
