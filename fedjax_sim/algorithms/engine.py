"""The round engine: every synchronous algorithm is `compose(client_work, server_rule)`.

One round, whatever the algorithm (TFF's composers, with optax's style of parts):

1. plan: sample clients, their weights, systems (who is kept, step budgets), the
   data schedule (keys from `fedjax_sim.keys`);
2. `server_rule.message(state, hp)`: what clients receive besides the model;
3. `client_work.train(ClientInput) -> ClientOutput` for every sampled client, mapped
   here and only here (one vmap, chunks of clients, or split over a mesh);
4. the aggregator chain over the whole upload pytree (a fused running weighted mean
   when there is none, so chunked rounds hold one chunk of uploads);
5. `server_rule.update(state, aggregated upload, RoundInfo) -> ServerUpdate`;
6. the per-client state rows of the clients that were aggregated are scattered back
   (clients dropped by `systems` keep theirs).

Numeric hyperparameters live in `state.hp` (float32 scalars), never closed over, so
a sweep vmaps over them, `set_hparams` changes them between rounds without
recompiling, and `hparam_schedule(round, hp) -> hp` makes any of them a function of
the round. Optimizers are given as optax transformations (fixed) or as functions
`hp -> GradientTransformation` (built each round from `state.hp`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim import keys
from fedjax_sim import checks
from fedjax_sim.checks import is_concrete  # noqa: F401 (engine.is_concrete)
from fedjax_sim import systems as systems_lib
from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, check_client_states,
                                       check_clients_per_round, check_model_and_data,
                                       check_round_args, client_losses, client_weights,
                                       gather_rows, init_client_states, mean_loss, model_bytes,
                                       resolve_chunk_size, sample_clients, scatter_rows,
                                       upload_bytes, vmap_clients, weighted_sum)
from fedjax_sim.tree import same_dtypes
from fedjax_sim.data import FederatedData, check_count_range
from fedjax_sim import local
from fedjax_sim.aggregators import Aggregator, ignores_weights, stages_of


Params = Any
Hparams = dict[str, jax.Array]
# An optimizer: fixed, or built each round from the state's hyperparameters.
OptimizerSpec = optax.GradientTransformation | Callable[[Hparams], optax.GradientTransformation]
# client_data_transform(x, y, n, client_id, key) -> (x, y, n): a sampled client's padded data
# before local training (data poisoning: label flipping, backdoors; see `attacks`).
ClientDataTransform = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                               tuple[jax.Array, jax.Array, jax.Array]]


class ClientInput(NamedTuple):
  """What one sampled client has in a round."""

  params: Params          # the server model it received
  message: Any            # the rest of what it received (SCAFFOLD's c...), or None
  row: Any                # its per-client state row, or None
  x: jax.Array            # its padded data as it trains this round
  y: jax.Array
  n: jax.Array            # its real example count
  client_id: jax.Array
  key: jax.Array          # its training key
  sample_key: jax.Array   # the round's sampling key (see `second_key`)
  budget: Any             # its step budget under `systems`, else None
  relative_weight: jax.Array  # its weight over the mean weight of all clients (FedDyn)
  hp: Hparams
  # (min, max) of the real counts of every client this round, known on the host (static
  # Python ints), or None: when min == max, `n` equals it and local training can drop the
  # padding masks (see `local.make_local_update`).
  count_range: tuple[int, int] | None = None
  # (x, y) as `local.ClientRows` of the round's data where the client trains on its row
  # as stored (no data schedule or transform): local training gathers its minibatches
  # from them, so `x` and `y` are not copied out unless something else reads them.
  data_rows: tuple[local.ClientRows, local.ClientRows] | None = None

  @property
  def second_key(self) -> jax.Array:
    """An independent key of its own (Ditto's personal steps, FedRep's head steps),
    derived where it is used: the round's program traces and lowers no unused keys."""
    return keys.client_key(keys.second_train_key(self.sample_key), self.client_id)


class ClientOutput(NamedTuple):
  """What one client sends (`upload`, aggregated), keeps (`row`) and reports."""

  upload: Params
  row: Any
  loss_sum: jax.Array
  num_trained: jax.Array
  num_steps: jax.Array
  metrics: dict = {}      # per-client scalars, reported as `client_<name>`


class ClientWork(NamedTuple):
  """`train(ClientInput) -> ClientOutput`; `upload_like(params)`: zeros shaped like one
  upload (the aggregator's init sees it); `init_row(params)`: a client's initial state
  row, or None for clients without state; `download(params)`: the part of the model a
  client receives (FedRep's clients need only the body), for the downlink's bytes.

  For `systems`' simulated time: `trainings_per_step`, the local trainings each step of
  a client's budget pays for (Ditto trains its global and its personal model the same
  steps: 2); `unbudgeted_steps(counts [C]) -> steps [C]`, the steps it trains besides
  its budget (FedRep's head), or None."""

  train: Callable[[ClientInput], ClientOutput]
  upload_like: Callable[[Params], Params] = lambda params: params
  init_row: Callable[[Params], Any] | None = None
  download: Callable[[Params], Params] = lambda params: params
  trainings_per_step: int = 1
  unbudgeted_steps: Callable[[jax.Array], jax.Array] | None = None


class RoundInfo(NamedTuple):
  """What the server rule knows about the round besides the aggregated upload."""

  hp: Hparams
  message: Any
  weight_sum: jax.Array      # sum of the aggregated clients' weights
  total_weight: jax.Array    # sum of every client's weight (all N)
  num_clients: int
  any_aggregated: jax.Array
  client_metrics: dict       # ClientOutput.metrics stacked over the sampled clients


class ServerUpdate(NamedTuple):
  params: Params
  opt_state: Any
  algorithm_state: Any
  delta: Params              # the model change it applied before the optimizer (update_norm)
  metrics: dict = {}


class ServerRule(NamedTuple):
  """`init(params, hp) -> (opt_state, algorithm_state)`; `update(state, upload, info)
  -> ServerUpdate`; `message(state, hp)`: what clients receive besides the model.

  `weighted_ratio`: the rule divides weighted means (q-FFL, FedNova), so a reducer that
  ignores the weights (median, DP mean...) is refused unless weights are uniform.
  `uniform_mean`: aggregate with equal weights whatever `weighting` says (FedDyn).
  """

  init: Callable[[Params, Hparams], tuple[Any, Any]]
  update: Callable[[ServerState, Params, RoundInfo], ServerUpdate]
  message: Callable[[ServerState, Hparams], Any] = lambda state, hp: None
  weighted_ratio: bool = False
  uniform_mean: bool = False


def host_scalar(value: Any, dtype: Any) -> Any:
  """A Python or numpy number as a numpy scalar of `dtype`, anything else (a sweep's
  traced hyperparameter) as a jax array: placing a numpy scalar is a transfer, while
  `jnp.asarray` of a number, or an eager op on a device scalar (optax.sgd negates its
  learning rate), compiles a program, 6-30 ms each of a fresh process's set-up."""
  if isinstance(value, (int, float, np.number)):
    return np.dtype(dtype).type(value)
  return jnp.asarray(value, dtype)


def on_device(tree: Any) -> Any:
  """`tree` with its numpy leaves placed on the device (jax arrays left as they are)."""
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(a) if isinstance(a, (np.ndarray, np.generic)) else a, tree)


def resolve(spec: OptimizerSpec, hp: Hparams) -> optax.GradientTransformation:
  """The optax transformation of an OptimizerSpec for these hyperparameters."""
  return spec if isinstance(spec, optax.GradientTransformation) else spec(hp)


def keep_unless(condition: jax.Array, new, old):
  """`new` where `condition` holds, else `old`, leaf by leaf."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)


def fedopt(server_optimizer: OptimizerSpec | None,
           delta_of: Callable[[Params], Params] = lambda upload: upload) -> ServerRule:
  """FedOpt's server rule: `server_optimizer` (default SGD lr 1, plain FedAvg) applied to
  the pseudo-gradient -mean delta, where the delta is `delta_of(aggregated upload)`."""
  server_optimizer = server_optimizer or optax.sgd(1.0)

  def init(params, hp):
    return resolve(server_optimizer, hp).init(params), None

  def update(state, upload, info):
    delta = delta_of(upload)
    pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
    updates, opt_state = resolve(server_optimizer, info.hp).update(
        pseudo_grad, state.opt_state, state.params)
    # A round in which no client was aggregated (all dropped) leaves the model and the
    # optimizer as they were: a zero pseudo-gradient would still move them by momentum.
    params, opt_state = keep_unless(info.any_aggregated,
                                    (optax.apply_updates(state.params, updates), opt_state),
                                    (state.params, state.opt_state))
    return ServerUpdate(params, opt_state, state.algorithm_state, delta)

  return ServerRule(init, update)


class Schedule(NamedTuple):
  """A client's local schedule: minibatch size, and epochs or steps (exactly one)."""

  batch_size: int
  epochs: int | None = None
  steps: int | None = None


def schedule_of(options: Mapping[str, Any]) -> Schedule:
  """The Schedule among a factory's `compose` options."""
  return Schedule(options.get("batch_size"), options.get("epochs"), options.get("steps"))


def local_train(inp: ClientInput, loss: local.PerExampleLoss,
                optimizer: optax.GradientTransformation, schedule: Schedule, *,
                start: Params | None = None, regularizer: local.Regularizer | None = None,
                context: Any = None, key: jax.Array | None = None) -> local.LocalResult:
  """Local training of the client of `inp` on its data, within its step budget.

  Starts from `start` (default the server model) with `inp.key` (or `key`);
  `regularizer(params, context)` is added to every step's objective.
  """
  update = local.make_local_update(loss, optimizer, batch_size=schedule.batch_size,
                                   epochs=schedule.epochs, steps=schedule.steps,
                                   regularizer=regularizer)
  n, low = inp.n, None
  if inp.count_range is not None:
    low, high = inp.count_range
    n = low if low == high else n  # a static count: the unpadded step where it fits
  x, y = (inp.x, inp.y) if inp.data_rows is None else inp.data_rows
  return update(inp.params if start is None else start, x, y, n,
                inp.key if key is None else key, context, inp.budget, min_examples=low)


def full_batch_loss(loss: local.PerExampleLoss, params: Params, inp: ClientInput) -> jax.Array:
  """The client's local objective at `params`: the mean loss over its real examples."""
  real = jnp.arange(inp.x.shape[0]) < inp.n
  # Padding slots read example 0 instead (real when n > 0), whose loss is left out: the
  # zeros of a padding slot may make the model non-finite, and its gradient then NaN.
  rows = jnp.where(real, jnp.arange(inp.x.shape[0]), 0)
  per_example = loss(params, inp.x[rows], inp.y[rows])
  return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.maximum(inp.n, 1).astype(jnp.float32)


def full_batch_grad(loss: local.PerExampleLoss, params: Params, inp: ClientInput) -> Params:
  """The gradient of `full_batch_loss` at `params`; zeros for a client with no examples,
  whose only row is padding: where the model is not finite on it, the masked loss's
  gradient is 0 x NaN, and its weight of 0 in the mean would not undo a NaN."""
  grad = jax.grad(full_batch_loss, argnums=1)(loss, params, inp)
  return jax.tree_util.tree_map(lambda g: jnp.where(inp.n > 0, g, jnp.zeros_like(g)), grad)


# --- Hyperparameters -----------------------------------------------------------------


class Check(NamedTuple):
  """A host-side check of one hyperparameter: `ok(value)` or ValueError `must ...`."""

  ok: Callable[[float], bool]
  must: str


POSITIVE = Check(lambda v: v > 0, "be positive")
NONNEGATIVE = Check(lambda v: v >= 0, "be >= 0")
FRACTION = Check(lambda v: 0 <= v < 1, "lie in [0, 1)")


def check_hparams(values: Mapping[str, Any], checks: Mapping[str, Check]) -> None:
  """Raises ValueError for a concrete hyperparameter that fails its check (traced values,
  inside a sweep, are checked on the host by `validate` instead)."""
  for name, check in checks.items():
    value = values.get(name)
    if value is None or not is_concrete(value):
      continue
    if isinstance(value, bool) or np.ndim(value) != 0 or not np.issubdtype(
        np.asarray(value).dtype, np.number):
      raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(float(value)) or not check.ok(float(value)):
      raise ValueError(f"{name} must {check.must}, got {float(value)!r}")


def set_hparams(state: ServerState, **values: float) -> ServerState:
  """`state` with hyperparameters replaced; the next round uses them, without recompiling."""
  unknown = sorted(set(values) - set(state.hp or {}))
  if unknown:
    raise ValueError(f"unknown hyperparameters {unknown}; this algorithm has "
                     f"{sorted(state.hp or {})}")
  hp = dict(state.hp)
  hp.update({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  return state._replace(hp=hp)


def scheduled(hparam_schedule: Callable, state: ServerState) -> Hparams:
  """`hparam_schedule(round, hp)`, which must name exactly the state's hyperparameters
  (checked while tracing): a misspelt name was ignored, a missing one a KeyError deep
  inside local training."""
  hp = hparam_schedule(state.round, state.hp)
  given, have = set(hp) if isinstance(hp, Mapping) else set(), set(state.hp or {})
  if given != have:
    raise ValueError(f"hparam_schedule must return every hyperparameter of the state and no "
                     f"other: unknown {sorted(given - have)}, missing {sorted(have - given)}; "
                     f"this algorithm has {sorted(have)} (start from {{**hp, ...}})")
  return hp


def get_hparams(state: ServerState) -> dict[str, float]:
  """The state's hyperparameters as Python floats."""
  return {k: float(v) for k, v in (state.hp or {}).items()}


# --- The engine ----------------------------------------------------------------------


def reducer_is_weighted(aggregator: Aggregator | None) -> bool:
  if aggregator is None:
    return True
  return all(s.weighted for s in stages_of(aggregator) if hasattr(s, "aggregate"))


def compose(
    name: str,
    apply: Callable,
    *,
    client_work: ClientWork,
    server_rule: ServerRule,
    hparams: Mapping[str, Any],
    hparam_checks: Mapping[str, Check] | None = None,
    clients_per_round: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    aggregator: Aggregator | None = None,
    client_data_transform: ClientDataTransform | None = None,
    client_sharding: jax.sharding.Sharding | None = None,
    systems: systems_lib.SystemsConfig | None = None,
    client_data_schedule: systems_lib.ClientDataSchedule | None = None,
    hparam_schedule: Callable[[jax.Array, Hparams], Hparams] | None = None,
    extra_hparams: Mapping[str, Any] | None = None,
    extra_hparam_checks: Mapping[str, Check] | None = None,
) -> FederatedAlgorithm:
  """A FederatedAlgorithm from its parts; every argument after `hparam_checks` is a
  feature every algorithm shares (see `fedavg` for what each does).

  Args:
    name: the algorithm's name, for messages.
    apply: the model's pure apply function (label checks).
    client_work: what each sampled client does.
    server_rule: what the server does with the aggregated upload.
    hparams: the numeric hyperparameters, name -> initial value, stored in `state.hp`.
    hparam_checks: name -> Check, run on concrete values here and in `validate`.
    hparam_schedule: optional `(round, hp) -> hp` applied at the start of every round.
    extra_hparams: more hyperparameters for the state, name -> value (read by
      optimizers given as `hp -> GradientTransformation`).
    extra_hparam_checks: name -> Check for `extra_hparams`, run as `hparam_checks` are
      (a learning rate set by `set_hparams` is checked as the one built with).

  Returns:
    FederatedAlgorithm(init, round, validate, hparams=names).
  """
  local.check_schedule(batch_size, epochs, steps)
  clash = sorted(set(extra_hparams or {}) & set(hparams))
  if clash:
    raise ValueError(f"extra_hparams {clash} are {name}'s own hyperparameters; set them by name")
  hparams = {**hparams, **(extra_hparams or {})}
  check_round_args(clients_per_round, weighting, client_chunk_size)
  missing = sorted(k for k, v in hparams.items() if v is None)
  if missing:  # the state stores numbers: None failed in init, naming no argument
    raise ValueError(f"{name}: hyperparameters {missing} are None; give numbers")
  hparam_checks = {**(hparam_checks or {}), **(extra_hparam_checks or {})}
  check_hparams(hparams, hparam_checks)
  if systems is not None and not isinstance(systems, systems_lib.SystemsConfig):
    raise ValueError(f"systems must be a systems.SystemsConfig, got {type(systems).__name__}")
  # Over-selection samples more clients than the server keeps: those are the rows trained.
  sampled = clients_per_round + (0 if systems is None else systems.over_selection)
  if isinstance(client_chunk_size, int) and sampled % client_chunk_size:
    what = "clients_per_round" if systems is None else "clients_per_round + over_selection"
    raise ValueError(f"client_chunk_size={client_chunk_size!r} must be a positive divisor of "
                     f"{what}={sampled}")
  if systems is not None:
    systems_lib.check_aggregator(aggregator)
  if server_rule.weighted_ratio and weighting != "uniform" and not reducer_is_weighted(aggregator):
    raise ValueError(
        f"{name}'s server rule divides example-weighted means, but this aggregator's reducer "
        f"is not the weighted mean (it ignores the weights, or uses them otherwise, as the "
        f"geometric median); use weighting='uniform' (then every reducer is exact) or a "
        f"weighted reducer (aggregators.mean(), possibly in a chain)")
  if getattr(aggregator, "validate", None) is not None:
    aggregator.validate(sampled, None)
  stateful = client_work.init_row is not None
  # A reducer that ignores the weights counts every client once, and so does everything
  # else that reads them (SCAFFOLD's control variate step, FedDyn's alpha_k): else example
  # counts, even those of clients not sampled, would reach the model around the reducer
  # (around DP's clipping and noise, for one).
  by_examples = weighting == "examples" and not ignores_weights(aggregator)

  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    """`num_clients` is needed by algorithms and aggregators with per-client state."""
    keys.check_key(key, f"{name}.init")
    # Built from host numbers, then placed: no set-up compiles (host_scalar).
    host_hp = {k: host_scalar(v, np.float32) for k, v in hparams.items()}
    opt_state, algorithm_state = on_device(server_rule.init(params, host_hp))
    client_states = (init_client_states(client_work.init_row(params), num_clients, name)
                     if stateful else None)
    agg_state = (None if aggregator is None
                 else aggregator.init(client_work.upload_like(params), num_clients))
    if systems is not None:
      systems_lib.check_aggregator_state(aggregator, agg_state)
    sim_time = None if systems is None else on_device(np.float32(0))
    return ServerState(params, opt_state, on_device(np.int32(0)), key, client_states,
                       algorithm_state, agg_state, sim_time, on_device(host_hp))

  def validate(state: ServerState, data: FederatedData) -> None:
    if systems is not None:
      systems_lib.check_profiles(systems.profiles, data.num_clients)
      if sampled > data.num_clients:
        raise ValueError(f"clients_per_round + over_selection = {clients_per_round} + "
                         f"{systems.over_selection} = {sampled} but the data has only "
                         f"{data.num_clients} clients")
      if state.sim_time is None:
        raise ValueError(f"the state has no sim_time: make it with this algorithm's init "
                         f"({name}(..., systems=...).init)")
    if state.hp is None or set(state.hp) != set(hparams):
      raise ValueError(f"the state's hyperparameters {sorted(state.hp or {})} are not "
                       f"{name}'s {sorted(hparams)}: make the state with this algorithm's init")
    check_hparams(state.hp, hparam_checks)
    check_clients_per_round(clients_per_round, data)
    check_model_and_data(apply, state.params, data)
    checks.check_label_schedule(client_data_schedule, apply, state.params, data)
    if getattr(client_data_transform, "validate", None) is not None:  # data attacks' own
      client_data_transform.validate(apply, state.params, data)
    aggregators_lib.check_clients_have_examples(aggregator, data)
    check_count_range(data)
    if stateful:
      check_client_states(state, data)
    if getattr(aggregator, "validate", None) is not None:
      aggregator.validate(sampled, data.num_clients)

  def client_data(data, client_id, round_index):
    x, y, n = data.x[client_id], data.y[client_id], data.counts[client_id]
    if client_data_schedule is not None:
      x, y, n = client_data_schedule(x, y, n, client_id, round_index)
    return x, y, n

  def uplink_bytes(params) -> float:
    """What one client sends: the compressor's encoding, else its float32 upload."""
    return upload_bytes(aggregator, client_work.upload_like(params))

  def chunk_size(params) -> int:
    if client_sharding is not None and client_chunk_size == "auto":
      return sampled  # the devices split one chunk of all clients between them
    return resolve_chunk_size(client_chunk_size, sampled, params) or sampled

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    check_clients_per_round(sampled, data)
    if systems is not None:
      systems_lib.check_profiles_fit(systems.profiles, data.num_clients)
    hp = state.hp if hparam_schedule is None else scheduled(hparam_schedule, state)
    next_key, sample_key, train_key = keys.round_keys(state.key)
    ids = sample_clients(sample_key, data.num_clients, sampled)
    if client_data_schedule is None:
      counts = data.counts[ids]
    else:
      counts = jax.vmap(lambda i: client_data(data, i, state.round)[2])(ids)
    raw_weights = client_weights("examples" if by_examples else "uniform", counts)
    if by_examples:
      # All N clients' counts on the scale of the sampled ones': as scheduled this round
      # (XLA drops the examples' gathers that only the counts' schedule would read).
      all_counts = (data.counts if client_data_schedule is None else jax.vmap(
          lambda i: client_data(data, i, state.round)[2])(jnp.arange(data.num_clients)))
      total_weight = all_counts.sum().astype(jnp.float32)
    else:
      total_weight = jnp.float32(data.num_clients)
    relative_weight = raw_weights * data.num_clients / total_weight
    weights = client_weights("uniform", counts) if server_rule.uniform_mean else raw_weights
    budgets, plan = None, None
    if systems is not None:
      plan = systems_lib.plan_round(
          systems, ids, counts, keys.systems_key(sample_key), clients_per_round=clients_per_round,
          batch_size=batch_size, epochs=epochs, steps=steps,
          downlink_bytes=float(downlink_bytes(state)), uplink_bytes=uplink_bytes(state.params),
          trainings_per_step=client_work.trainings_per_step,
          unbudgeted_steps=(0 if client_work.unbudgeted_steps is None
                            else client_work.unbudgeted_steps(counts)))
      weights = jnp.where(plan.aggregated, weights, 0.0)
      budgets = plan.step_budget
    message = server_rule.message(state, hp)
    rows = gather_rows(state.client_states, ids) if stateful else None
    # Unless a schedule or a transform changes the data clients train on, the host's (min,
    # max) of the counts holds for it and local training can read the stored rows.
    data_as_stored = client_data_schedule is None and client_data_transform is None
    count_range = data.count_range if data_as_stored else None

    def one(args):
      client_id, row, budget, rel = args
      x, y, n = client_data(data, client_id, state.round)
      if client_data_transform is not None:
        x, y, n = client_data_transform(x, y, n, client_id,
                                        keys.client_data_key(train_key, client_id))
      data_rows = ((local.ClientRows(data.x, client_id), local.ClientRows(data.y, client_id))
                   if data_as_stored else None)
      return client_work.train(ClientInput(
          state.params, message, row, x, y, n, client_id, keys.client_key(train_key, client_id),
          sample_key, budget, rel, hp, count_range, data_rows))

    def train_chunk(args):
      if client_sharding is None:
        return vmap_clients(one, args)
      # Constraining the inputs and results to the client axis makes GSPMD split the
      # vmapped local training over devices; reductions over it become all-reduces.
      constrain = lambda a: jax.lax.with_sharding_constraint(a, client_sharding)
      return jax.tree_util.tree_map(constrain, jax.vmap(one)(jax.tree_util.tree_map(constrain,
                                                                                   args)))

    chunk = chunk_size(state.params)
    by_chunk = lambda tree: jax.tree_util.tree_map(lambda a: a.reshape(-1, chunk, *a.shape[1:]),
                                                   tree)
    unchunk = lambda tree: jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), tree)
    args = (ids, rows, budgets, relative_weight)
    agg_state, agg_metrics = state.aggregator_state, {}
    kept = None if plan is None else plan.aggregated  # the clients aggregated, if not all
    if aggregator is None:
      if chunk == sampled:
        # One chunk: the weighted sum straight from it (what the scan below computes, bit
        # for bit, without tracing local training a second time for the shapes).
        out = train_chunk(args)
        total, weight_sum = weighted_sum(weights, out.upload), weights.sum()
        outputs = out._replace(upload=None)
      else:
        # Fused weighted mean: a scan over chunks keeps one chunk of uploads alive.
        def body(acc, xs):
          chunk_args, w = xs
          out = train_chunk(chunk_args)
          acc = (jax.tree_util.tree_map(jnp.add, acc[0], weighted_sum(w, out.upload)),
                 acc[1] + w.sum())
          return acc, out._replace(upload=None)

        # The accumulator's shapes from upload_like, not from tracing local training a
        # second time (a third of the trace of a round of 10 chunks); a mismatch with
        # the real uploads fails the scan's carry check.
        uploads = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((chunk, *np.shape(a)), jnp.result_type(a)),
            client_work.upload_like(state.params))
        shapes = jax.eval_shape(weighted_sum, jax.ShapeDtypeStruct((chunk,), weights.dtype),
                                uploads)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (total, weight_sum), outputs = jax.lax.scan(body, (zeros, jnp.zeros(())),
                                                    by_chunk((args, weights)))
        outputs = unchunk(outputs)
      # Every client may have dropped (systems): all weights are 0; keep 0, not NaN.
      aggregated = jax.tree_util.tree_map(
          lambda t: t / jnp.where(weight_sum > 0, weight_sum, 1.0), total)
    else:
      outputs = (train_chunk(args) if chunk == sampled
                 else unchunk(jax.lax.map(train_chunk, by_chunk(args))))
      aggregated, agg_state, agg_metrics = aggregator.aggregate(
          state.aggregator_state, outputs.upload, weights, ids, keys.aggregation_key(sample_key))
      agg_metrics = dict(agg_metrics)
      survived = agg_metrics.pop(aggregators_lib.SURVIVORS, None)
      if survived is not None:  # the reducer dropped clients (secure aggregation)
        kept = survived if kept is None else kept & survived
      weight_sum = weights.sum() if survived is None else jnp.where(survived, weights, 0.0).sum()
      if systems is not None:
        aggregated = jax.tree_util.tree_map(
            lambda d: jnp.where(plan.aggregated.any(), d, jnp.zeros_like(d)), aggregated)
    any_aggregated = weight_sum > 0
    info = RoundInfo(hp, message, weight_sum, total_weight, data.num_clients, any_aggregated,
                     outputs.metrics)
    update = server_rule.update(state, aggregated, info)
    # The state keeps its dtypes: with bfloat16 parameters the fused mean is float32, and
    # a rule that adds it to its state (SCAFFOLD's c, FedDyn's h and model, MimeLite's
    # momentum and model) turned bfloat16 leaves float32, which a scan over rounds refuses;
    # so did clients' float32 rows scattered into bfloat16 ones (a FutureWarning now).
    update = update._replace(
        params=same_dtypes(update.params, state.params),
        algorithm_state=same_dtypes(update.algorithm_state, state.algorithm_state))
    client_states = state.client_states
    if stateful:
      new_rows = same_dtypes(outputs.row, rows)
      if kept is not None:  # clients that were not aggregated keep their state
        new_rows = jax.tree_util.tree_map(
            lambda new, old: jnp.where(
                kept.reshape(-1, *([1] * (new.ndim - 1))), new, old), new_rows, rows)
      client_states = scatter_rows(state.client_states, ids, new_rows)
    loss_sum, num_trained = outputs.loss_sum, outputs.num_trained
    metrics = {
        "train_loss": mean_loss(loss_sum, num_trained),
        "update_norm": optax.tree.norm(update.delta),
        "num_examples": counts.sum(),
        "client_ids": ids,
        "client_train_loss": client_losses(loss_sum, num_trained),
        "uplink_bytes": jnp.float32(sampled * model_bytes(client_work.upload_like(state.params))),
        "downlink_bytes": jnp.float32(sampled * downlink_bytes(state)),
        **{f"client_{k}": v for k, v in outputs.metrics.items()},
        **agg_metrics, **update.metrics,
    }
    sim_time = state.sim_time
    if systems is not None:
      sim_time = state.sim_time + plan.round_time
      metrics.update(systems_lib.round_metrics(plan, sim_time))
      metrics["num_examples"] = jnp.where(plan.aggregated, counts, 0).sum()
      metrics["uplink_bytes"] = jnp.float32(uplink_bytes(state.params)) * plan.aggregated.sum()
    new_state = ServerState(update.params, update.opt_state, state.round + 1, next_key,
                            client_states, update.algorithm_state, agg_state, sim_time, state.hp)
    return new_state, metrics

  def downlink_bytes(state) -> int:
    """What one client receives: the model and the server's message."""
    message = jax.eval_shape(lambda s: server_rule.message(s, s.hp), state)
    return model_bytes(client_work.download(state.params)) + model_bytes(message)

  return FederatedAlgorithm(init, round, validate, tuple(hparams), int(clients_per_round))
