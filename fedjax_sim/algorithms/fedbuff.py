"""FedBuff: asynchronous federated learning with buffered aggregation, by event time.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba 2022, "Federated Learning with
Buffered Asynchronous Aggregation" (AISTATS), Algorithm 1:

- `concurrency` clients train at all times. A dispatched client downloads the current
  model w and its version v, trains locally, and sends back its delta.
- The server adds each arriving delta to a buffer, weighted by the staleness weight
  s(tau), tau = (current version - v); the paper's s(tau) = 1 / sqrt(1 + tau).
- After `buffer_size` (K) arrivals it applies the pseudo-gradient
  -sum_i w_i s(tau_i) delta_i / sum_i w_i with the server optimizer (w_i = 1 is the
  paper's mean over K; w_i = example counts is the default here, as in `fedavg`),
  and the version goes up by one.
- Each arriving client is replaced at once by one drawn uniformly from the clients not
  in flight, which downloads the model current at that moment.

Simulation. The in-flight clients are slots in `state.algorithm_state` (`InFlight`):
each slot's client id, the model version and parameters it downloaded, its dispatch
time and its training key. Its arrival time is its dispatch time plus
`systems.client_seconds` of its full local work, the model's bytes down and its update's
up (as the aggregator's compressor codes it). One
`round(state, data)` is one server update: a `lax.scan` over the K next arrival events
(the earliest-finishing slot, ties to the lower slot index), each refilling its slot at
its arrival time, then the K arrived clients are trained together (vmap) from the
models they downloaded. Training at arrival rather than at dispatch gives the same
result (local training depends only on the downloaded model, the client's data and
its key), so `init` needs no data. A replacement dispatched before the update time T
gets the model before the update; one dispatched at T (the K-th arrival and any
arrival tied with it) gets the updated model. A replacement fast enough to arrive
before T is trained in the same round (the events are processed one at a time for
that reason; taking the K earliest slots at once would miss it).

When concurrency == buffer_size and the whole cohort arrives at the same instant
(every client equally fast), nobody is in flight when the next cohort is dispatched,
and it is drawn as `fedavg` draws one (`start_round`'s keys and `sample_clients`):
FedBuff is then FedAvg round for round, same ids, keys and parameters, unless an
aggregator stage draws random numbers (quantization): its key comes from the round
after fedavg's, since each cohort is drawn a round ahead of its update.

`state.round` counts server updates (the model version); `state.sim_time` is the
simulated time of the latest update. Client availability in the profiles is not used:
a dispatched client always reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import keys as keys_lib
from fedjax_sim import aggregators, local, systems
from fedjax_sim.algorithms.base import (FederatedAlgorithm, ServerState, check_model_and_data,
                                        check_round_args, client_key, client_weights,
                                        map_clients, model_bytes, resolve_chunk_size,
                                        round_keys, round_metrics, sample_clients, server_step,
                                        upload_bytes, weighted_sum)
from fedjax_sim.data import FederatedData
from fedjax_sim.losses import cross_entropy

Params = Any
STALENESS = ("polynomial", "constant")


class InFlight(NamedTuple):
  """The clients in flight, one slot each; every field has a leading axis [concurrency]."""

  client_ids: jax.Array  # int32
  versions: jax.Array    # int32: the model version (server update count) it downloaded
  params: Params         # the model it downloaded, stacked
  start_s: jax.Array     # float32: simulated dispatch time
  keys: jax.Array        # its local training key


def staleness_weight(staleness: str | Callable[[jax.Array], jax.Array]) -> Callable:
  """The weight function s(tau) for a staleness name or callable (see `fedbuff`)."""
  if callable(staleness):
    return staleness
  if staleness == "polynomial":
    return lambda tau: 1.0 / jnp.sqrt(1.0 + tau)
  if staleness == "constant":
    return jnp.ones_like
  raise ValueError(f"staleness must be 'polynomial', 'constant' or a callable tau -> weight, "
                   f"got {staleness!r}")


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_buffer_aggregator(aggregator: Any) -> None:
  """Raises ValueError for a stage that needs every client at most once among the rows
  it combines: a fast client can arrive twice before the buffer fills."""
  for stage in () if aggregator is None else aggregators.stages_of(aggregator):
    if getattr(stage, "distinct_clients", False):
      name = getattr(stage.aggregate, "__qualname__", repr(stage)).split(".")[0]
      raise ValueError(
          f"fedbuff cannot aggregate with {name} (DP: --clip/--noise-multiplier/"
          f"--target-epsilon; --aggregator secure_mean): a fast client can arrive twice "
          f"before the buffer fills, and its guarantee (DP's sensitivity of one client's "
          f"update and its accountant's uniform sampling, secure aggregation's pairwise "
          f"masks) assumes every client at most once")


def check_buffer_aggregator_state(aggregator: Any, state: Any) -> None:
  """Raises ValueError for a per-client stage that keeps per-client state (top-k error
  feedback): a client twice in one buffer would read its state twice and keep one write."""
  stage = aggregators.stateful_client_stage(aggregator, state)
  if stage is not None:
    raise ValueError(
        f"fedbuff does not support per-client transforms that keep state (such as "
        f"compression.top_k with error feedback): a client can arrive twice before the "
        f"buffer fills; got a stateful {getattr(stage.apply, '__qualname__', stage)!r}")


def fedbuff(
    apply: Callable[[Params, jax.Array], jax.Array],
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    profiles: systems.ClientProfiles,
    concurrency: int,
    buffer_size: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    staleness: str | Callable[[jax.Array], jax.Array] = "polynomial",
    weighting: str = "examples",
    client_chunk_size: int | str | None = "auto",
    loss: local.PerExampleLoss | None = None,
    regularizer: local.Regularizer | None = None,
    aggregator: Any = None,
    systems_config: Any = None,
) -> FederatedAlgorithm:
  """FedBuff: asynchronous buffered aggregation, simulated by event time.

  Args:
    apply: the model's pure `apply(params, x) -> logits`.
    client_optimizer: optax optimizer for local training (fresh state per dispatch).
    server_optimizer: optax optimizer on the pseudo-gradient; default SGD, lr 1.
    profiles: every client's system profile (`systems.sample_profiles` or
      `make_profiles`), which sets how long its work takes.
    concurrency: clients in flight at all times (at most the number of clients).
    buffer_size: arrivals per server update, K (at most `concurrency`).
    batch_size: local minibatch size.
    epochs / steps: local epochs, or a fixed number of local steps (exactly one).
    staleness: 'polynomial' (1 / sqrt(1 + tau), the paper's), 'constant' (1), or a
      callable mapping float32 staleness [K] to weights [K].
    weighting: 'examples' or 'uniform' (the paper's), the w_i of the mean.
    client_chunk_size: train this many arrived clients at a time to bound memory
      (None: all at once; "auto", the default: as in `fedavg`).
    loss: per-example loss; default softmax cross-entropy on integer labels.
    regularizer: `regularizer(params, downloaded_params)` added to each local step.
    aggregator: how the buffer's uploads are combined, as in `fedavg` (robust,
      compression, attacks...; not DP or secure aggregation, nor top-k with error
      feedback: a client can arrive twice before the buffer fills): it gets the
      staleness-scaled deltas s(tau_i) delta_i and the weights w_i, so the weighted
      mean is the rule above.
    systems_config: refused: FedBuff simulates its clients' systems itself from
      `profiles`; a deadline or over-selection has no meaning without rounds.

  Returns:
    FederatedAlgorithm(init, round, validate); `init(params, key, num_clients=None)`
    dispatches the first `concurrency` clients at time 0. Each round is one server
    update; its metrics add `num_aggregated` (the buffer size), `client_staleness`,
    `staleness_mean`, `staleness_max`, `client_arrival_s`, `round_time_s` and
    `sim_time_s` to the usual ones.
  """
  if systems_config is not None:
    raise ValueError("fedbuff takes no systems= (deadline, over-selection, stragglers, "
                     "dropout): it is asynchronous, with no synchronous round for a deadline "
                     "to cut or over-selection to close; client speeds come from profiles=")
  _positive_int("concurrency", concurrency)
  _positive_int("buffer_size", buffer_size)
  concurrency, buffer_size = int(concurrency), int(buffer_size)  # numpy integers too
  check_round_args(buffer_size, weighting, client_chunk_size)
  local.check_schedule(batch_size, epochs, steps)
  if not isinstance(profiles, systems.ClientProfiles):
    raise ValueError("profiles must be a systems.ClientProfiles (systems.sample_profiles or "
                     f"systems.make_profiles), got {type(profiles).__name__}")
  systems.check_profiles(profiles)
  num_clients = profiles.num_clients
  if buffer_size > concurrency:
    raise ValueError(f"buffer_size={buffer_size} is larger than concurrency={concurrency}: the "
                     "server would wait for more arrivals than there are clients in flight")
  if concurrency > num_clients:
    raise ValueError(f"concurrency={concurrency} but the profiles describe only {num_clients} "
                     "clients, and no client can be in flight twice")
  check_buffer_aggregator(aggregator)
  if getattr(aggregator, "validate", None) is not None:
    aggregator.validate(buffer_size, None)
  weight_of = staleness_weight(staleness)
  out = jax.eval_shape(weight_of, jax.ShapeDtypeStruct((buffer_size,), jnp.float32))
  if getattr(out, "shape", None) != (buffer_size,):
    raise ValueError(f"staleness callable must map staleness [K] to weights [K], got "
                     f"{getattr(out, 'shape', out)} for K={buffer_size}")
  server_optimizer = server_optimizer or optax.sgd(1.0)
  loss = loss or cross_entropy(apply)
  local_update = local.make_local_update(loss, client_optimizer, batch_size=batch_size,
                                         epochs=epochs, steps=steps, regularizer=regularizer)

  def seconds(ids: jax.Array, counts: jax.Array, nbytes: tuple[float, float]) -> jax.Array:
    """Simulated seconds of a full dispatch of clients `ids` (download, train, upload):
    `nbytes` = (down, up)."""
    work = systems.full_steps(counts[ids], batch_size, epochs, steps)
    return systems.client_seconds(systems.gather(profiles, ids), work, batch_size, *nbytes)


  def init(params: Params, key: jax.Array, num_clients: int | None = None) -> ServerState:
    """Dispatches `concurrency` clients at time 0, drawn as fedavg's round 0 draws them."""
    keys_lib.check_key(key, "fedbuff.init")
    if num_clients is not None and num_clients != profiles.num_clients:
      raise ValueError(f"num_clients={num_clients} but the profiles describe "
                       f"{profiles.num_clients} clients")
    next_key, sample_key, train_key = round_keys(key)
    ids = sample_clients(sample_key, profiles.num_clients, concurrency).astype(jnp.int32)
    slots = InFlight(
        client_ids=ids, versions=jnp.zeros(concurrency, jnp.int32),
        params=jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(a, (concurrency, *jnp.shape(a))).copy(), params),
        start_s=jnp.zeros(concurrency, jnp.float32),
        keys=jax.vmap(lambda i: client_key(train_key, i))(ids))
    agg_state = None if aggregator is None else aggregator.init(params, profiles.num_clients)
    check_buffer_aggregator_state(aggregator, agg_state)
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), next_key,
                       algorithm_state=slots, aggregator_state=agg_state,
                       sim_time=jnp.zeros((), jnp.float32), hp={})

  def validate(state: ServerState, data: FederatedData) -> None:
    systems.check_profiles(profiles, data.num_clients)
    slots = state.algorithm_state
    if not isinstance(slots, InFlight) or np.shape(slots.client_ids) != (concurrency,):
      raise ValueError("the state was not made by this fedbuff's init (it needs "
                       f"{concurrency} clients in flight in state.algorithm_state)")
    check_model_and_data(apply, state.params, data)
    if getattr(aggregator, "validate", None) is not None:
      aggregator.validate(buffer_size, data.num_clients)
    aggregators.refuse_empty_clients(
        data, "they would reach the buffer first and fill it with no update",
        prefix="fedbuff: ")

  def round(state: ServerState, data: FederatedData) -> tuple[ServerState, dict]:
    systems.check_profiles_fit(profiles, data.num_clients)
    slots, version = state.algorithm_state, state.round
    # The model down, its update up as the compressor codes it (as fedavg(systems=)).
    nbytes = (float(model_bytes(state.params)), upload_bytes(aggregator, state.params))
    n = profiles.num_clients
    # The next round's draws, exactly as fedavg splits its round key.
    next_key, sample_key, train_key = round_keys(state.key)
    # (not fold_in(sample_key, event) itself: event 1's would be the aggregator's key)
    dispatch_key = keys_lib.arrival_key(sample_key)

    def arrival(carry, event):
      ids, start, finish, keys, fresh, in_flight, dispatches = carry
      j = jnp.argmin(finish)  # the first minimum: ties go to the lower slot
      t, arrived = finish[j], ids[j]
      entry = (j, arrived, keys[j], fresh[j], jnp.where(fresh[j], version, slots.versions[j]), t)
      in_flight = in_flight.at[arrived].set(False)
      # A uniform draw among the clients not in flight (Gumbel-max over a masked score).
      scores = jax.random.gumbel(jax.random.fold_in(dispatch_key, event), (n,))
      new = jnp.argmax(jnp.where(in_flight, -jnp.inf, scores)).astype(jnp.int32)
      # A client dispatched twice in one round gets a distinct key each time; the
      # first dispatch keeps fedavg's key fold_in(train_key, id).
      key = client_key(train_key, new + n * dispatches[new])
      carry = (ids.at[j].set(new), start.at[j].set(t),
               finish.at[j].set(t + seconds(new[None], data.counts, nbytes)[0]),
               keys.at[j].set(key), fresh.at[j].set(True), in_flight.at[new].set(True),
               dispatches.at[new].add(1))
      return carry, entry

    carry = (slots.client_ids, slots.start_s,
             slots.start_s + seconds(slots.client_ids, data.counts, nbytes), slots.keys,
             jnp.zeros(concurrency, bool), jnp.zeros(n, bool).at[slots.client_ids].set(True),
             jnp.zeros(n, jnp.int32))
    carry, entries = jax.lax.scan(arrival, carry, jnp.arange(buffer_size))
    ids, start, _, keys, fresh, _, _ = carry
    slot, arrived, arrived_keys, was_fresh, versions, times = entries
    update_time = times[-1]  # events come in time order

    if concurrency == buffer_size:
      # Every client arrived at once: nobody is in flight, so the next cohort is
      # fedavg's (slot s was the s-th arrival, as ties go to the lower slot).
      together = (times[0] == update_time) & jnp.all(slot == jnp.arange(buffer_size))
      cohort = sample_clients(sample_key, n, buffer_size).astype(jnp.int32)
      ids = jnp.where(together, cohort, ids)
      keys = jnp.where(together, jax.vmap(lambda i: client_key(train_key, i))(cohort), keys)

    # Arrivals from slots refilled this round downloaded the current model.
    def downloaded(stored, current):
      rows = stored[slot]
      return jnp.where(was_fresh.reshape(-1, *([1] * (rows.ndim - 1))), current[None], rows)

    starts = jax.tree_util.tree_map(downloaded, slots.params, state.params)

    def train(args):
      params, i, key = args
      return local_update(params, local.ClientRows(data.x, i), local.ClientRows(data.y, i),
                          data.counts[i], key, params)

    results = map_clients(train, (starts, arrived, arrived_keys),
                          resolve_chunk_size(client_chunk_size, buffer_size, state.params))
    tau = version - versions
    weights = client_weights(weighting, data.counts[arrived])
    stale = weight_of(tau.astype(jnp.float32)).astype(jnp.float32)
    agg_state, agg_metrics = state.aggregator_state, {}
    if aggregator is None:
      weight = jnp.sum(weights)  # 0 only if no arrival has examples: a zero update
      delta = jax.tree_util.tree_map(lambda d: d / jnp.where(weight > 0, weight, 1.0),
                                     weighted_sum(weights * stale, results.delta))
    else:
      uploads = jax.tree_util.tree_map(
          lambda d: d * stale.reshape(-1, *([1] * (d.ndim - 1))).astype(d.dtype), results.delta)
      delta, agg_state, agg_metrics = aggregator.aggregate(
          agg_state, uploads, weights, arrived, keys_lib.aggregation_key(sample_key))
    params, opt_state = server_step(server_optimizer, state, delta)
    # A buffer of clients without examples is no update: the model and the optimizer
    # stay as they were (a zero pseudo-gradient still moves them by momentum).
    some_examples = jnp.any(weights > 0)
    params, opt_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(some_examples, new, old), (params, opt_state),
        (state.params, state.opt_state))

    # Refilled slots hold the model current at their dispatch: the updated one from T on.
    after = fresh & (start >= update_time)
    new_versions = jnp.where(after, version + 1, jnp.where(fresh, version, slots.versions))

    def refill(stored, old, new):
      shape = (-1, *([1] * (stored.ndim - 1)))
      return jnp.where(after.reshape(shape), new[None],
                       jnp.where(fresh.reshape(shape), old[None], stored))

    new_slots = InFlight(ids, new_versions,
                         jax.tree_util.tree_map(refill, slots.params, state.params, params),
                         start, keys)
    metrics = {
        **round_metrics(results.loss_sum, results.num_trained, delta, data, arrived),
        "client_staleness": tau,
        "staleness_mean": jnp.mean(tau.astype(jnp.float32)),
        "staleness_max": jnp.max(tau),
        "client_arrival_s": times,
        "round_time_s": update_time - state.sim_time,
        "sim_time_s": update_time,
        "num_aggregated": jnp.int32(arrived.shape[0]),  # as fedavg(systems=...) reports
        **agg_metrics,
    }
    new_state = state._replace(params=params, opt_state=opt_state, round=version + 1,
                               key=next_key, algorithm_state=new_slots, aggregator_state=agg_state,
                               sim_time=update_time)
    return new_state, metrics

  return FederatedAlgorithm(init, round, validate, clients_per_round=int(buffer_size))
