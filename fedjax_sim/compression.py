"""Uplink compression applied per client before aggregation, with bytes on the wire.

- Stochastic uniform quantization to b bits per coordinate between the update's
  minimum and maximum, unbiased, optionally after a random rotation (a Walsh-Hadamard
  transform of the sign-flipped update) that spreads the coordinates' range:
  Suresh, Yu, Kumar, McMahan 2017, "Distributed Mean Estimation with Limited
  Communication". Wire: b bits per (padded) coordinate plus the two float32 bounds.
- Top-k sparsification with error feedback: each client sends its k largest
  coordinates (value and index) of update + residual and keeps the rest as its
  residual for the next time it is sampled: Stich, Cordonnier, Jaggi 2018,
  "Sparsified SGD with Memory"; Sattler et al. 2019, "Robust and Communication-
  Efficient Federated Learning from Non-IID Data". The residuals are per-client state
  `[num_clients, d]` in the aggregator state, gathered and scattered by client id.
  Wire: k float32 values and k int32 indices.

Scalars an algorithm sends beside its update (FedNova's gradient weight, q-FFL's h,
FedExP's squared norm: `aggregators.split_scalars`) go up exact, as float32.

Each compressor reports `uplink_bytes` (all sampled clients, this round),
`bits_per_parameter` and `compression_error` (the mean over clients of
||decoded - input||^2 / ||input||^2); `fedavg` reports the float32 sizes when nothing compresses,
and `downlink_bytes` (the float32 model sent to each sampled client);
`uplink_bytes_per_client(aggregator, d)` gives one client's size statically (for
simulated upload times, `fedjax_sim.systems`). The
compressors decode on the server, so the next stage sees the values it would
reconstruct. Written here rather than taken from a library: optax has no
compressors, and these are a few lines of jnp each over the flattened update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators import (ClientTransform, client_keys, mean_over_clients, no_state,
                                    ravel_clients, split_scalars, stages_of)
from fedjax_sim.tree import gather_rows, scatter_rows

def uplink_bytes_per_client(aggregator: Any, num_params: int, num_scalars: int = 0
                            ) -> float | None:
  """Bytes one client uploads for a `num_params`-coordinate update and `num_scalars`
  float32 scalars beside it (`aggregators.split_scalars`) under `aggregator` (a
  compressor, or a chain holding one: the last compressor's size, as its metrics
  report), or None if nothing compresses (the float32 upload then goes up)."""
  bits = None
  for stage in stages_of(aggregator):
    if getattr(stage, "wire_bits", None) is not None:
      bits = stage.wire_bits(num_params)
  return None if bits is None else bits / 8 + 4 * num_scalars


def hadamard(x: jax.Array) -> jax.Array:
  """The orthonormal Walsh-Hadamard transform H x / sqrt(d) over the last axis.

  d must be a power of two; O(d log d) butterflies. H / sqrt(d) is symmetric and
  orthogonal, so it is its own inverse.
  """
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f"the Hadamard transform needs a power-of-two length, got {d}")
  lead, h = x.shape[:-1], 1
  while h < d:
    y = x.reshape(*lead, d // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    h *= 2
  return x / jnp.sqrt(jnp.float32(d))


def padded_length(d: int) -> int:
  """The power of two the rotation pads a d-vector to."""
  return 1 << max(0, math.ceil(math.log2(d)))


def rotation_signs(key: jax.Array, d: int) -> jax.Array:
  """The random diagonal D (+-1) of the rotation H D; shared by all clients of a round."""
  return jax.random.rademacher(key, (padded_length(d),), dtype=jnp.float32)


def rotate(flat: jax.Array, signs: jax.Array) -> jax.Array:
  """H D x / sqrt(d') of each row, zero-padded to d' = len(signs)."""
  pad = signs.shape[0] - flat.shape[-1]
  x = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  return hadamard(x * signs)


def unrotate(rotated: jax.Array, signs: jax.Array, d: int) -> jax.Array:
  """The inverse of `rotate`, cut back to length d."""
  return (hadamard(rotated) * signs)[..., :d]


def stochastic_quantize(v: jax.Array, bits: int, key: jax.Array) -> jax.Array:
  """Rounds each coordinate of v to one of 2^bits levels between min(v) and max(v),
  up with probability equal to its distance from the level below: unbiased.

  Returns:
    The dequantized vector (what the server reconstructs).
  """
  levels = 2 ** bits - 1
  lo, hi = jnp.min(v), jnp.max(v)
  width = hi - lo
  s = jnp.where(width > 0, (v - lo) / jnp.where(width > 0, width, 1.0) * levels, 0.0)
  floor = jnp.floor(s)
  level = jnp.clip(floor + (jax.random.uniform(key, v.shape) < s - floor), 0, levels)
  return jnp.where(width > 0, lo + level * (width / levels), v)


def relative_error(decoded: jax.Array, flat: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of ||decoded - flat||^2 / ||flat||^2 over the clients (rows) whose update
  counts (`aggregators.mean_over_clients`)."""
  err = jnp.sum((decoded - flat) ** 2, axis=1) / jnp.maximum(jnp.sum(flat ** 2, axis=1), 1e-30)
  return mean_over_clients(err, weights)


def quantize(bits: int, *, rotation: bool = False) -> ClientTransform:
  """Stochastic uniform quantization of each client's flattened update to `bits` bits.

  Args:
    bits: bits per coordinate, 1 to 16.
    rotation: quantize H D x instead of x (D random signs shared per round),
      and rotate back on the server; pads d to a power of two.

  Returns:
    A ClientTransform; metrics `uplink_bytes`, `bits_per_parameter`,
    `compression_error`.
  """
  if not (isinstance(bits, int) and 1 <= bits <= 16):
    raise ValueError(f"quantization bits must be an integer in [1, 16], got {bits!r}")

  def wire_bits(d: int) -> int:
    sent = padded_length(d) if rotation else d
    return bits * sent + 64  # plus min and max as float32

  def apply(state, deltas, weights, ids, key):
    update, scalars, join = split_scalars(deltas)
    flat, unravel = ravel_clients(update)
    num, d = flat.shape
    sign_key, round_key = jax.random.split(key)
    keys = client_keys(round_key, ids)
    if rotation:
      signs = rotation_signs(sign_key, d)
      coded = jax.vmap(lambda v, k: stochastic_quantize(v, bits, k))(rotate(flat, signs), keys)
      decoded = unrotate(coded, signs, d)
    else:
      decoded = jax.vmap(lambda v, k: stochastic_quantize(v, bits, k))(flat, keys)
    bits_per_client = wire_bits(d) + 32 * len(scalars)
    metrics = {"uplink_bytes": jnp.float32(num * bits_per_client / 8),
               "bits_per_parameter": jnp.float32(bits_per_client / (d + len(scalars))),
               "compression_error": relative_error(decoded, flat, weights)}
    return join(unravel(decoded), scalars), weights, state, metrics

  return ClientTransform(no_state, apply, wire_bits=wire_bits)


class TopKState(NamedTuple):
  residual: jax.Array  # [num_clients, d]: what each client has not sent yet


def top_k_mask(u: jax.Array, k: int) -> jax.Array:
  """u with all but its k largest-magnitude entries set to zero (one vector)."""
  _, index = jax.lax.top_k(jnp.abs(u), k)
  return jnp.zeros_like(u).at[index].set(u[index])


def top_k(k: int | None = None, *, fraction: float | None = None,
          error_feedback: bool = True) -> ClientTransform:
  """Top-k sparsification of each client's flattened update.

  Args:
    k: coordinates each client sends, or
    fraction: of the d coordinates (k = max(1, round(fraction * d))). Give one.
    error_feedback: add each client's residual before selecting and keep what it
      did not send; needs `num_clients` at `init` (`algorithm.init(params, key,
      num_clients)`).

  Returns:
    A ClientTransform; metrics `uplink_bytes`, `bits_per_parameter`,
    `compression_error` (of what it sends against update + residual).
  """
  if (k is None) == (fraction is None):
    raise ValueError("top_k: give exactly one of k= or fraction=")
  if k is not None and not (isinstance(k, int) and k >= 1):
    raise ValueError(f"top_k: k must be a positive integer, got {k!r}")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ValueError(f"top_k: fraction must lie in (0, 1], got {fraction!r}")

  def kept(d: int) -> int:
    num = k if k is not None else max(1, round(fraction * d))
    if num > d:
      raise ValueError(f"top_k: k={num} but the update has only {d} coordinates")
    return num

  def init(params, num_clients):
    d = sum(x.size for x in jax.tree_util.tree_leaves(params) if x.ndim)  # scalars go exact
    kept(d)
    if not error_feedback:
      return None
    if num_clients is None:
      raise ValueError("top_k with error feedback keeps a residual per client: pass "
                       "num_clients to algorithm.init(params, key, num_clients)")
    return TopKState(jnp.zeros((num_clients, d), jnp.float32))

  def apply(state, deltas, weights, ids, key):
    del key
    update, scalars, join = split_scalars(deltas)
    flat, unravel = ravel_clients(update)
    num, d = flat.shape
    kk = kept(d)
    u = flat if state is None else flat + gather_rows(state.residual, ids)
    sent = jax.vmap(lambda v: top_k_mask(v, kk))(u)
    if state is not None:
      # A client of weight 0 counts for nothing in the mean: it keeps all of u to send.
      state = TopKState(scatter_rows(state.residual, ids,
                                     jnp.where((weights > 0)[:, None], u - sent, u)))
    bits_per_client = 64 * kk + 32 * len(scalars)  # float32 value + int32 index per kept
    metrics = {"uplink_bytes": jnp.float32(num * bits_per_client / 8),
               "bits_per_parameter": jnp.float32(bits_per_client / (d + len(scalars))),
               "compression_error": relative_error(sent, u, weights)}
    return join(unravel(sent), scalars), weights, state, metrics

  # float32 value + int32 index per kept coordinate
  return ClientTransform(init, apply, wire_bits=lambda d: 64 * kept(d))
