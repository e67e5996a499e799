"""Client system profiles and simulated time: how long each client's round takes.

A client's round is download, local training and upload after a fixed latency:

  seconds = latency_s + downlink_bytes / downlink_bytes_per_s
            + steps * batch_size / examples_per_s + uplink_bytes / uplink_bytes_per_s

where `steps` counts every local step the client trains: Ditto's global and personal
models each train its budgeted steps, FedRep's head steps come on top of its body's.

`ClientProfiles` holds these rates as arrays over all clients (given, e.g. loaded from
a device trace, or drawn by `sample_profiles`); `client_seconds` evaluates the formula
for the sampled clients inside the round program, so deadlines, over-selection and
asynchronous arrival order are decided on the device, vectorized over clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import keys
from fedjax_sim.aggregators import stages_of, stateful_client_stage
from fedjax_sim.checks import is_concrete
from fedjax_sim.partition import seeded_rng

# Defaults of `sample_profiles`, roughly phones on mobile networks: a few hundred
# examples per second of a small model, megabytes per second each way, 50 ms latency.
DEFAULT_SPEED = ("lognormal", 200.0, 0.5)
DEFAULT_DOWNLINK = ("lognormal", 4e6, 0.7)
DEFAULT_UPLINK = ("lognormal", 1e6, 0.7)
DEFAULT_LATENCY = 0.05

Distribution = Any  # a number, a 1-d array over clients, or (name, *parameters)


class ClientProfiles(NamedTuple):
  """System characteristics of every client, float32 arrays of shape [num_clients].

  examples_per_s: local training speed, examples processed per second.
  downlink_bytes_per_s / uplink_bytes_per_s: network bandwidth each way.
  latency_s: fixed seconds per round trip (connection set-up, scheduling).
  availability: probability that the client is reachable in a given round; a
    sampled client that is not, does not report.
  """

  examples_per_s: jax.Array
  downlink_bytes_per_s: jax.Array
  uplink_bytes_per_s: jax.Array
  latency_s: jax.Array
  availability: jax.Array

  @property
  def num_clients(self) -> int:
    return int(self.examples_per_s.shape[0])


def make_profiles(num_clients: int, *, examples_per_s: Distribution,
                  downlink_bytes_per_s: Distribution, uplink_bytes_per_s: Distribution,
                  latency_s: Distribution = 0.0, availability: Distribution = 1.0,
                  seed: int = 0) -> ClientProfiles:
  """Profiles from given values: each a number (every client alike), an array over
  clients (a device trace), or a distribution `(name, *params)` as in `sample_profiles`."""
  if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  rng = seeded_rng(seed)
  fields = dict(examples_per_s=examples_per_s, downlink_bytes_per_s=downlink_bytes_per_s,
                uplink_bytes_per_s=uplink_bytes_per_s, latency_s=latency_s,
                availability=availability)
  values = {name: _draw(name, spec, int(num_clients), rng) for name, spec in fields.items()}
  profiles = ClientProfiles(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  check_profiles(profiles)
  return profiles


def sample_profiles(num_clients: int, *, seed: int = 0,
                    examples_per_s: Distribution = DEFAULT_SPEED,
                    downlink_bytes_per_s: Distribution = DEFAULT_DOWNLINK,
                    uplink_bytes_per_s: Distribution = DEFAULT_UPLINK,
                    latency_s: Distribution = DEFAULT_LATENCY,
                    availability: Distribution = 1.0) -> ClientProfiles:
  """Heterogeneous profiles drawn on the host, deterministic in `seed`.

  Each field is a number, an array over clients, or a distribution:
  `("lognormal", median, sigma)` (speeds and bandwidths spread over orders of
  magnitude, as measured across phones), `("uniform", low, high)`, or
  `("choice", values, probabilities)` (device tiers).
  """
  return make_profiles(num_clients, examples_per_s=examples_per_s,
                       downlink_bytes_per_s=downlink_bytes_per_s,
                       uplink_bytes_per_s=uplink_bytes_per_s, latency_s=latency_s,
                       availability=availability, seed=seed)


def _draw(name: str, spec: Distribution, num: int, rng: np.random.Generator) -> np.ndarray:
  if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
    kind, *params = spec
    if kind == "lognormal" and len(params) == 2:
      median, sigma = params
      return float(median) * np.exp(float(sigma) * rng.standard_normal(num))
    if kind == "uniform" and len(params) == 2:
      return rng.uniform(float(params[0]), float(params[1]), num)
    if kind == "choice" and len(params) in (1, 2):
      return rng.choice(np.asarray(params[0], float), num,
                        p=None if len(params) == 1 else np.asarray(params[1], float))
    raise ValueError(f"{name}: unknown distribution {spec!r}; use ('lognormal', median, sigma), "
                     "('uniform', low, high) or ('choice', values[, probabilities])")
  arr = np.asarray(spec, float)
  if arr.ndim == 0:
    return np.full(num, float(arr))
  if arr.shape != (num,):
    raise ValueError(f"{name}: expected a number or an array of shape ({num},), "
                     f"got shape {arr.shape}")
  return arr


def check_profiles_fit(profiles: ClientProfiles, num_clients: int) -> None:
  """Raises ValueError unless the profiles describe `num_clients` clients: a round reads
  them by client id (out of range, jax clamps it: another client's profile). A check
  of shapes alone, so a round traced on other data runs it too."""
  if profiles.num_clients != num_clients:
    raise ValueError(f"the profiles describe {profiles.num_clients} clients but the data has "
                     f"{num_clients}")


def check_profiles(profiles: ClientProfiles, num_clients: int | None = None) -> None:
  """Raises ValueError naming the field and client of a bad profile value."""
  sizes = {np.shape(v) for v in profiles}
  if len(sizes) != 1 or len(next(iter(sizes))) != 1:
    raise ValueError(f"every ClientProfiles field must be a 1-d array of the same length, "
                     f"got shapes {[np.shape(v) for v in profiles]}")
  if num_clients is not None:
    check_profiles_fit(profiles, num_clients)
  for name, value in profiles._asdict().items():
    v = np.asarray(value)
    if name == "latency_s":
      bad, need = ~(v >= 0) | ~np.isfinite(v), ">= 0 and finite"
    elif name == "availability":
      bad, need = ~((v >= 0) & (v <= 1)), "in [0, 1]"
    else:
      bad, need = ~(v > 0) | ~np.isfinite(v), "> 0 and finite"
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"{name} must be {need}: client {i} has {v[i]}")


def full_steps(counts: jax.Array, batch_size: int, epochs: int | None,
               steps: int | None) -> jax.Array:
  """Local steps each client takes when it finishes its work (int32)."""
  if steps is not None:  # a client without examples takes no step (local.py)
    return jnp.where(jnp.asarray(counts) > 0, steps, 0).astype(jnp.int32)
  return (epochs * ((counts + batch_size - 1) // batch_size)).astype(jnp.int32)


def gather(profiles: ClientProfiles, ids: jax.Array) -> ClientProfiles:
  """The profiles of clients `ids`."""
  return ClientProfiles(*(v[ids] for v in profiles))


def communication_seconds(profiles: ClientProfiles, downlink_bytes: Any,
                          uplink_bytes: Any) -> jax.Array:
  """Latency plus model download plus update upload, per client of `profiles`."""
  return (profiles.latency_s + downlink_bytes / profiles.downlink_bytes_per_s
          + uplink_bytes / profiles.uplink_bytes_per_s)


def step_seconds(profiles: ClientProfiles, batch_size: int) -> jax.Array:
  """Seconds one local step of `batch_size` examples takes, per client."""
  return batch_size / profiles.examples_per_s


def client_seconds(profiles: ClientProfiles, num_steps: jax.Array, batch_size: int,
                   downlink_bytes: Any, uplink_bytes: Any) -> jax.Array:
  """Simulated seconds of a client's round: communication plus `num_steps` local steps.

  `profiles` are those of the clients in question (see `gather`); the byte counts are
  per client, scalars or arrays over them (the update's real size: compressed, if a
  compressor runs).
  """
  return (communication_seconds(profiles, downlink_bytes, uplink_bytes)
          + num_steps * step_seconds(profiles, batch_size))


def describe(profiles: ClientProfiles) -> Mapping[str, dict[str, float]]:
  """Median, 10th and 90th percentile of each field (for logs and notebooks)."""
  out = {}
  for name, value in profiles._asdict().items():
    p10, p50, p90 = np.percentile(np.asarray(value), [10, 50, 90])
    out[name] = {"p10": float(p10), "median": float(p50), "p90": float(p90)}
  return out


# --- Synchronous rounds with stragglers, dropouts, deadlines and over-selection. ---

STRAGGLER_POLICIES = ("drop", "partial")


def _is_number(value: Any) -> bool:
  """A real number: a Python or NumPy scalar, or a concrete 0-d numeric array."""
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float, np.integer, np.floating)):
    return True
  return (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
          and np.issubdtype(np.asarray(value).dtype, np.number))


@dataclasses.dataclass(frozen=True, eq=False)
class SystemsConfig:
  """How a synchronous round treats client systems (`fedavg(..., systems=...)`).

  profiles: ClientProfiles of every client of the data.
  deadline_s: seconds after which the server stops waiting; a client whose work
    does not fit is a straggler. None: no deadline.
  over_selection: sample this many clients more than clients_per_round and keep
    the clients_per_round that report first.
  stragglers: 'drop' (FedAvg: a straggler's update is discarded) or 'partial'
    (FedProx: it sends the steps it managed, via local_update's step_budget).
  dropout: probability that a sampled client does not respond, on top of its
    profile's availability (it responds with probability availability * (1 - dropout)).
  straggler_fraction: the protocol of Li et al. 2020, Sec. 5.2: this fraction of
    the sampled clients (round(s * sampled), chosen at random each round) are
    stragglers that manage only a random amount of work, uniform in {1..E} epochs
    or {1..S} steps.
  """

  profiles: ClientProfiles
  deadline_s: float | None = None
  over_selection: int = 0
  stragglers: str = "drop"
  dropout: float = 0.0
  straggler_fraction: float = 0.0

  def __post_init__(self):
    if not isinstance(self.profiles, ClientProfiles):
      raise ValueError(f"profiles must be ClientProfiles (see make_profiles / sample_profiles), "
                       f"got {type(self.profiles).__name__}")
    check_profiles(self.profiles)
    # deadline_s, dropout and straggler_fraction may be traced (a sweep builds the config
    # inside its program): they are checked when concrete.
    d = self.deadline_s
    # float32 holds it on the device: past its largest value it became inf (inf times).
    if d is not None and is_concrete(d) and not (
        _is_number(d) and 0 < d <= float(np.finfo(np.float32).max)):
      raise ValueError(f"deadline_s must be a number > 0 that float32 holds (or None for no "
                       f"deadline), got {d!r}")
    if not (isinstance(self.over_selection, (int, np.integer))
            and not isinstance(self.over_selection, bool) and self.over_selection >= 0):
      raise ValueError(f"over_selection must be an integer >= 0, got {self.over_selection!r}")
    if self.stragglers not in STRAGGLER_POLICIES:
      raise ValueError(f"stragglers must be 'drop' or 'partial', got {self.stragglers!r}")
    if is_concrete(self.dropout) and not (_is_number(self.dropout)
                                           and 0.0 <= self.dropout < 1.0):
      raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
    s = self.straggler_fraction
    if is_concrete(s) and not (_is_number(s) and 0.0 <= s <= 1.0):
      raise ValueError(f"straggler_fraction must lie in [0, 1], got {s!r}")


class RoundPlan(NamedTuple):
  """Who a synchronous round aggregates and how long it takes, per sampled client [C]."""

  aggregated: jax.Array    # bool: the update enters the mean
  step_budget: jax.Array   # int32: local steps trained into the update (0 if not aggregated)
  seconds: jax.Array       # float32: simulated seconds of the work the client attempts
  responded: jax.Array     # bool: the client was reachable (availability, dropout)
  straggler: jax.Array     # bool: it could not do its full work (protocol or deadline)
  round_time: jax.Array    # float32 scalar: simulated seconds of the round


def systems_key(sample_key: jax.Array) -> jax.Array:
  """The key of a round's system draws (who responds, who straggles, how much work),
  independent of the training keys and of the aggregator's key (fold 1)."""
  return keys.systems_key(sample_key)


def num_protocol_stragglers(straggler_fraction: float, sampled: int) -> int | jax.Array:
  """round(s * sampled): how many sampled clients the FedProx protocol makes stragglers
  (Python's round, half to even; when s is traced, an int32 array: s * sampled in
  float32, rounded half to even)."""
  if not is_concrete(straggler_fraction):
    return jnp.round(jnp.float32(sampled) * straggler_fraction).astype(jnp.int32)
  return int(round(straggler_fraction * sampled))


def plan_round(config: SystemsConfig, ids: jax.Array, counts: jax.Array, key: jax.Array, *,
               clients_per_round: int, batch_size: int, epochs: int | None,
               steps: int | None, downlink_bytes: Any, uplink_bytes: Any,
               trainings_per_step: int = 1, unbudgeted_steps: Any = 0) -> RoundPlan:
  """Decides, before any training, which sampled clients a synchronous round aggregates.

  The rule, per sampled client (ids [C], C = clients_per_round + over_selection):

  1. it responds with probability availability * (1 - dropout);
  2. its planned work is its full steps (`full_steps`), except for the
     round(straggler_fraction * C) protocol stragglers drawn at random, whose work
     is e epochs (e * ceil(n / B) steps, e uniform in {1..E}) or s steps (uniform
     in {1..S});
  3. with a deadline D, a client whose planned work (fixed seconds + steps *
     seconds per step) takes longer than D is a straggler too; under 'partial' it runs
     floor((D - fixed seconds) / seconds per step) steps, clipped to [0, planned]
     (0: it cannot contribute). Fixed seconds: communication plus the steps it trains
     besides its budget (`unbudgeted_steps`, FedRep's head) at `step_seconds`; seconds
     per step: `step_seconds` times the trainings each budgeted step pays for
     (`trainings_per_step`: Ditto trains the global and the personal model alike);
  4. 'drop' excludes every straggler, 'partial' keeps their partial work;
  5. among the responding clients left that hold examples (candidates: one with none
     sends no update), the clients_per_round with the smallest simulated seconds
     (ties by position) are aggregated: the server closes the round at the
     clients_per_round-th report.

  `round_time` is the largest simulated seconds among aggregated clients (0 if
  none), except that with a deadline, when fewer than clients_per_round clients
  are aggregated, the server has waited for a client that never reported in time
  and the round takes D. `seconds` is, per client, communication plus the steps
  of the work it attempts (its planned work, or under 'partial' the steps that
  fit the deadline) and its unbudgeted steps, whether or not it is aggregated.

  Args:
    config: the SystemsConfig.
    ids: sampled client ids [C].
    counts: their example counts [C] (as they train this round).
    key: the round's systems key (`systems_key`).
    clients_per_round: K, the clients the server aggregates at most.
    batch_size, epochs, steps: the local schedule.
    downlink_bytes, uplink_bytes: bytes each client receives and sends.
    trainings_per_step: local trainings each step of the budget pays for (>= 1).
    unbudgeted_steps: steps each client trains besides its budget, [C] or a scalar.

  Returns:
    A RoundPlan.
  """
  num = ids.shape[0]
  profiles = gather(config.profiles, ids)
  respond_key, straggler_key, work_key = jax.random.split(key, 3)
  responded = (jax.random.uniform(respond_key, (num,))
               < profiles.availability * (1.0 - config.dropout))
  full = full_steps(counts, batch_size, epochs, steps)

  num_slow = num_protocol_stragglers(config.straggler_fraction, num)
  if not isinstance(num_slow, int) or num_slow > 0:  # traced: decided on the device
    # A random subset of exactly num_slow positions: the first num_slow of a permutation.
    order = jax.random.permutation(straggler_key, num)
    designated = jnp.zeros((num,), bool).at[order].set(jnp.arange(num) < num_slow)
    if epochs is not None:
      reduced = (jax.random.randint(work_key, (num,), 1, epochs + 1)
                 * ((counts + batch_size - 1) // batch_size))
    else:
      reduced = jax.random.randint(work_key, (num,), 1, steps + 1)
    planned = jnp.where(designated, jnp.minimum(reduced, full), full).astype(jnp.int32)
  else:
    designated = jnp.zeros((num,), bool)
    planned = full

  one_step = step_seconds(profiles, batch_size)
  fixed = (communication_seconds(profiles, downlink_bytes, uplink_bytes)
           + unbudgeted_steps * one_step)
  per_step = trainings_per_step * one_step
  partial = config.stragglers == "partial"
  if config.deadline_s is not None:
    deadline = jnp.float32(config.deadline_s)
    late = fixed + planned * per_step > deadline
    # The most steps that pass the lateness test itself: the division alone, in float32,
    # gave one step fewer where the work ends exactly at the deadline (0.3 + 1 x 0.2 s
    # fits 0.5 s but (0.5 - 0.3) / 0.2 = 0.99999994), or one more than fits.
    guess = jnp.floor((deadline - fixed) / per_step)
    guess = (guess + (fixed + (guess + 1) * per_step <= deadline)
             - (fixed + guess * per_step > deadline))
    fits = jnp.clip(guess, 0, planned).astype(jnp.int32)
    work = jnp.where(late, fits, planned) if partial else planned
    cannot = late & (fits == 0)
  else:
    late = jnp.zeros((num,), bool)
    work, cannot = planned, late
  straggler = designated | late
  # A client with no examples sends no update: it must not take a report's place.
  candidate = responded & (~cannot if partial else ~straggler) & (counts > 0)
  seconds = (fixed + work * per_step).astype(jnp.float32)
  if config.deadline_s is not None:
    # Work that passed the lateness test finishes by the deadline: the same sum computed
    # again (XLA may contract it differently) could land an ulp past it.
    # Clients without work that fits (dropped late; under 'partial' those that cannot
    # contribute) report their own time, past the deadline where it is.
    unfit = late if not partial else cannot
    seconds = jnp.where(unfit, seconds, jnp.minimum(seconds, deadline))

  # Over-selection: the server keeps the first clients_per_round reports.
  finish = jnp.where(candidate, seconds, jnp.inf)
  rank = jnp.zeros((num,), jnp.int32).at[jnp.argsort(finish, stable=True)].set(
      jnp.arange(num, dtype=jnp.int32))
  aggregated = candidate & (rank < clients_per_round)

  round_time = jnp.max(jnp.where(aggregated, seconds, 0.0))
  if config.deadline_s is not None:
    round_time = jnp.where(aggregated.sum() < clients_per_round, deadline, round_time)
  return RoundPlan(aggregated, jnp.where(aggregated, work, 0).astype(jnp.int32), seconds,
                   responded, straggler & responded, round_time.astype(jnp.float32))


def round_metrics(plan: RoundPlan, sim_time: jax.Array) -> dict:
  """The systems metrics of a round; `sim_time` is the cumulative time after it."""
  return {
      "round_time_s": plan.round_time,
      "sim_time_s": sim_time,
      "num_aggregated": plan.aggregated.sum(),
      "num_stragglers": plan.straggler.sum(),
      "num_dropped": (~plan.responded).sum(),
      "client_seconds": plan.seconds,
      "client_aggregated": plan.aggregated,
      "client_steps": plan.step_budget,
  }


def check_aggregator(aggregator: Any) -> None:
  """Raises ValueError unless the aggregator's reducer is the weighted mean.

  With systems, clients that are not aggregated still occupy a row of the stacked
  updates, with weight 0 and a zero update. Only a reducer that weights its rows
  ignores them; the median, trimmed mean, Krum, geometric median's median start,
  `privacy.dp_mean` and `secure_aggregation.secure_mean` do not use the weights,
  so zero rows would count as clients voting for no change.
  """
  if aggregator is None:
    return
  for reducer in stages_of(aggregator):
    if hasattr(reducer, "aggregate") and not reducer.weighted:
      raise ValueError(
          f"systems= needs an aggregator whose reducer is the weighted mean "
          f"(aggregators.mean(), possibly in a chain with per-client and server transforms); "
          f"got the reducer {getattr(reducer.aggregate, '__qualname__', reducer)!r}, which "
          f"is not (it ignores the weights, or starts from a median, as the geometric "
          f"median), so clients that dropped out or missed the deadline would count as zero "
          f"updates")


def check_aggregator_state(aggregator: Any, state: Any) -> None:
  """Raises ValueError if a per-client transform keeps per-client state (top-k error
  feedback): the clients a round does not aggregate would update it too."""
  stage = stateful_client_stage(aggregator, state)
  if stage is not None:
    raise ValueError(
        f"systems= does not support per-client transforms that keep state (such as "
        f"compression.top_k with error feedback): clients that are not aggregated would "
        f"update it too; got a stateful {getattr(stage.apply, '__qualname__', stage)!r}")


# --- Time-varying client data. ---

# schedule(x, y, n, client_id, round) -> (x, y, n): a client's padded data as it is in
# a given round (counted from 0); real examples first, padding after, as always.
ClientDataSchedule = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                              tuple[jax.Array, jax.Array, jax.Array]]


def _mul_mod(a: jax.Array, b: jax.Array, n: jax.Array, bound: int) -> jax.Array:
  """a * b mod n for 0 <= a, b < n <= bound (static), without int32 overflow: directly
  while (bound - 1)^2 fits in int32 (bound <= 46340) or in uint32 (<= 65536), else by
  doubling and adding over b's 31 bits in uint32 (every partial sum stays below 2^32)."""
  dtype = jnp.result_type(a, b, n)
  if bound <= 46340:
    return a * b % n
  a, b, n = (jnp.asarray(v).astype(jnp.uint32) for v in (a, b, n))
  if bound <= 65536:
    return (a * b % n).astype(dtype)

  def bit(i, acc):
    acc = acc * 2 % n
    return jnp.where((b >> (30 - i)) & 1, (acc + a) % n, acc)

  return jax.lax.fori_loop(0, 31, bit, jnp.zeros_like(a)).astype(dtype)


def sliding_window(window: int, stride: int) -> ClientDataSchedule:
  """A stream window over each client's examples.

  In round r a client with n examples trains on the min(window, n) examples that
  start at (r * stride) mod n, wrapping around its data.
  """
  if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window <= 0:
    raise ValueError(f"window must be a positive integer, got {window!r}")
  if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 0:
    raise ValueError(f"stride must be an integer >= 0, got {stride!r}")

  def schedule(x, y, n, client_id, round_index):
    del client_id
    size = jnp.maximum(n, 1)
    start = _mul_mod(round_index % size, stride % size, size, x.shape[0])
    kept = jnp.minimum(n, window).astype(jnp.asarray(n).dtype)
    pos = jnp.arange(x.shape[0])
    index = jnp.where(pos < kept, (start + pos) % size, pos)
    return x[index], y[index], kept

  return schedule


def label_drift(num_classes: int, period: int) -> ClientDataSchedule:
  """Concept drift: in round r every label c becomes (c + r // period) mod num_classes.

  Negative labels (IGNORE_LABEL at padded tokens) are left alone.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  if not isinstance(period, (int, np.integer)) or isinstance(period, bool) or period <= 0:
    raise ValueError(f"period must be a positive integer, got {period!r}")

  def schedule(x, y, n, client_id, round_index):
    del client_id
    shift = (round_index // period) % num_classes
    return x, jnp.where(y >= 0, (y + shift) % num_classes, y).astype(y.dtype), n

  schedule.num_classes = num_classes  # what validate checks the data and model against
  return schedule


def chain_schedules(*schedules: ClientDataSchedule) -> ClientDataSchedule:
  """Applies `schedules` in order (e.g. a window, then label drift)."""

  def schedule(x, y, n, client_id, round_index):
    for s in schedules:
      x, y, n = s(x, y, n, client_id, round_index)
    return x, y, n

  schedule.stages = schedules  # validate checks each
  return schedule
