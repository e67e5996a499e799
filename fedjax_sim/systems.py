"""Client system profiles and simulated time: how long each client's round takes.

A client's round is download, local training and upload after a fixed latency:

  seconds = latency_s + downlink_bytes / downlink_bytes_per_s
            + steps * batch_size / examples_per_s + uplink_bytes / uplink_bytes_per_s

`ClientProfiles` holds these rates as arrays over all clients (given, e.g. loaded from
a device trace, or drawn by `sample_profiles`); `client_seconds` evaluates the formula
for the sampled clients inside the round program, so deadlines, over-selection and
asynchronous arrival order are decided on the device, vectorized over clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
  rng = np.random.default_rng(seed)
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


def check_profiles(profiles: ClientProfiles, num_clients: int | None = None) -> None:
  """Raises ValueError naming the field and client of a bad profile value."""
  sizes = {np.shape(v) for v in profiles}
  if len(sizes) != 1 or len(next(iter(sizes))) != 1:
    raise ValueError(f"every ClientProfiles field must be a 1-d array of the same length, "
                     f"got shapes {[np.shape(v) for v in profiles]}")
  if num_clients is not None and profiles.num_clients != num_clients:
    raise ValueError(f"the profiles describe {profiles.num_clients} clients but the data has "
                     f"{num_clients}")
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
  if steps is not None:
    return jnp.full(jnp.shape(counts), steps, jnp.int32)
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
