"""Secure aggregation, simulated inside the round: Bonawitz, Ivanov, Kreuter, Marcedone,
McMahan, Patel, Ramage, Segal, Seth 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning".

Per round:

1. Each sampled client maps its update to integers: coordinates clipped to
   [-clip_range, clip_range], scaled to [0, 2^bits - 1] with unbiased stochastic
   rounding.
2. It adds a self mask PRG(b_u) and, for every other sampled client v, +PRG(s_uv)
   if u < v and -PRG(s_uv) otherwise, all in Z_{2^32} (uint32 wraparound). The
   pairwise seeds s_uv stand for the Diffie-Hellman agreed keys and b_u for the
   client's own secret; both derive from the round's key and the client ids.
3. Clients drop out after the keys were shared and before sending their masked
   input (the protocol's U2 \\ U3), each independently with probability `dropout`.
4. With fewer than `threshold` survivors the protocol aborts and the round's update
   is zero. Otherwise the server, from the survivors' Shamir shares, reconstructs
   the survivors' self seeds and the dropped clients' pairwise seeds (simulated: it
   recomputes exactly those seeds and no others), removes those masks from the sum
   of what it received; the pairwise masks between survivors cancel.
5. The unmasked sum is exact (bits + ceil(log2 m) <= 32, checked up front) and is
   decoded to the mean of the survivors' quantized updates (unweighted).

Not simulated: the cryptography itself (key agreement, secret sharing, encryption)
and dropouts during unmasking. The clients expand m - 1 pairwise masks each, m^2 d
PRG words per round, as the protocol does. Wire: each survivor sends d 32-bit ring
elements (`uplink_bytes`; the O(m) key and share messages are left out).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import (SURVIVORS, Aggregator, client_keys, no_state, ravel_clients,
                                    split_scalars)

RING_BITS = 32  # arithmetic in Z_{2^32}: uint32 wraps around
# Levels are rounded in float32, which holds every integer only up to 2^24: with more
# bits the top level 2^bits - 1 rounds up to 2^bits, past what the overflow check allows.
MAX_BITS = 24
# The quantizer divides by 2 x clip_range in float32: past this, that is inf.
MAX_CLIP_RANGE = float(np.finfo(np.float32).max) / 2


def quantize_to_ring(flat: jax.Array, bits: int, clip_range: float, keys: jax.Array) -> jax.Array:
  """[m, d] floats -> [m, d] uint32 levels in [0, 2^bits - 1], stochastically rounded
  (unbiased within the clipping range), one key per client."""
  levels = 2 ** bits - 1
  s = (jnp.clip(flat, -clip_range, clip_range) + clip_range) / (2 * clip_range) * levels
  floor = jnp.floor(s)
  up = jax.vmap(lambda k, row: jax.random.uniform(k, row.shape))(keys, s) < s - floor
  return jnp.clip(floor + up, 0, levels).astype(jnp.uint32)


def dequantize_mean(total: jax.Array, count: jax.Array, bits: int, clip_range: float) -> jax.Array:
  """The mean of `count` clients' dequantized values from the sum of their levels."""
  levels = 2 ** bits - 1
  mean_level = total.astype(jnp.float32) / jnp.maximum(count, 1)
  return mean_level / levels * (2 * clip_range) - clip_range


def _prg(key: jax.Array, d: int) -> jax.Array:
  return jax.random.bits(key, (d,), jnp.uint32)


def _pair_key(pair_base: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """s_ab = s_ba: the seed two clients agree on."""
  return jax.random.fold_in(jax.random.fold_in(pair_base, jnp.minimum(a, b)), jnp.maximum(a, b))


def _pairwise(ids: jax.Array, i: jax.Array, coefficient: jax.Array, pair_base: jax.Array,
              d: int) -> jax.Array:
  """sum_j coefficient_j * (+-PRG(s_ij)), + when id_i < id_j, in Z_{2^32}."""

  def one(j):
    mask = _prg(_pair_key(pair_base, ids[i], ids[j]), d)
    signed = jnp.where(ids[i] < ids[j], mask, jnp.uint32(0) - mask)
    return jnp.where(coefficient[j] & (j != i), signed, jnp.uint32(0))

  return jnp.sum(jax.vmap(one)(jnp.arange(ids.shape[0])), axis=0, dtype=jnp.uint32)


def masked_inputs(levels: jax.Array, ids: jax.Array, key: jax.Array) -> jax.Array:
  """What each client would send: y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^32.

  Args:
    levels: [m, d] uint32 quantized updates.
    ids: [m] client ids (distinct).
    key: the round's secure-aggregation key.
  """
  self_base, pair_base = jax.random.split(key)
  m, d = levels.shape
  everyone = jnp.ones((m,), bool)

  def one(i):
    own = _prg(jax.random.fold_in(self_base, ids[i]), d)
    return levels[i] + own + _pairwise(ids, i, everyone, pair_base, d)

  return jax.lax.map(one, jnp.arange(m))  # one client's masks at a time: memory m * d


def unmask_sum(masked: jax.Array, ids: jax.Array, alive: jax.Array, key: jax.Array) -> jax.Array:
  """The server's sum of the survivors' inputs: sum of what they sent, minus their self
  masks, minus their pairwise masks with dropped clients, mod 2^32."""
  self_base, pair_base = jax.random.split(key)
  m, d = masked.shape
  dropped = ~alive

  def removed(i):
    own = _prg(jax.random.fold_in(self_base, ids[i]), d)
    mask = own + _pairwise(ids, i, dropped, pair_base, d)
    return jnp.where(alive[i], mask, jnp.uint32(0))

  received = jnp.sum(jnp.where(alive[:, None], masked, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
  masks = jnp.sum(jax.lax.map(removed, jnp.arange(m)), axis=0, dtype=jnp.uint32)
  return received - masks


def secure_mean(*, bits: int = 16, clip_range: float = 1.0, dropout: float = 0.0,
                threshold: int | None = None) -> Aggregator:
  """The unweighted mean of the survivors' updates, computed through secure aggregation.

  Args:
    bits: quantization bits per coordinate (1 to 24).
    clip_range: coordinates are clipped to [-clip_range, clip_range] first.
    dropout: probability that a sampled client drops before sending its input.
    threshold: t, the fewest survivors the protocol proceeds with; None is a
      majority of the clients per round (m // 2 + 1).

  Returns:
    An Aggregator; metrics `secagg_survivors`, `secagg_aborted`, `uplink_bytes`.
  """
  if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= MAX_BITS):
    raise ValueError(f"secure_mean: bits must be an integer in [1, {MAX_BITS}] (float32 "
                     f"rounds the levels), got {bits!r}")
  if not (isinstance(clip_range, (int, float)) and not isinstance(clip_range, bool)
          and 0 < clip_range <= MAX_CLIP_RANGE):
    # inf (float32's too: 1e39 is inf there) decoded every update to NaN: a NaN model.
    raise ValueError(f"secure_mean: clip_range must be a finite number in (0, "
                     f"{MAX_CLIP_RANGE:.4g}] (the range 2 x clip_range is computed in "
                     f"float32), got {clip_range!r}")
  if isinstance(threshold, bool):
    raise ValueError(f"secure_mean: threshold must be an integer or None, got {threshold!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"secure_mean: dropout must lie in [0, 1), got {dropout!r}")

  def min_survivors(m):
    return threshold if threshold is not None else m // 2 + 1

  def validate(clients_per_round, num_clients=None):
    t = min_survivors(clients_per_round)
    if not (isinstance(t, int) and 1 <= t <= clients_per_round):
      raise ValueError(f"secure_mean: threshold must be an integer in [1, clients_per_round="
                       f"{clients_per_round}], got {t!r}")
    if bits + math.ceil(math.log2(clients_per_round)) > RING_BITS:
      raise ValueError(f"secure_mean: {clients_per_round} clients of {bits}-bit values can "
                       f"overflow the {RING_BITS}-bit modular sum; use fewer bits")

  def aggregate(state, deltas, weights, ids, key):
    del weights
    # The update through the ring; the scalars sent beside it (FedNova's gradient weight,
    # q-FFL's h) exactly, over the same survivors: clipped to clip_range and quantized
    # with the update they became 1 (a server step tau times too small).
    update, scalars, join = split_scalars(deltas)
    flat, unravel = ravel_clients(update)
    m, d = flat.shape
    validate(m)
    round_key, drop_key, mask_key = jax.random.split(key, 3)
    levels = quantize_to_ring(flat, bits, clip_range, client_keys(round_key, ids))
    masked = masked_inputs(levels, ids, mask_key)
    alive = jax.random.uniform(drop_key, (m,)) >= dropout
    survivors = jnp.sum(alive)
    aborted = survivors < min_survivors(m)
    total = unmask_sum(masked, ids, alive, mask_key)
    mean = jnp.where(aborted, 0.0, dequantize_mean(total, survivors, bits, clip_range))
    scalar_means = [jnp.where(aborted, 0.0, jnp.sum(jnp.where(alive, s, 0.0))
                              / jnp.maximum(survivors, 1)).astype(s.dtype) for s in scalars]
    sent = d + len(scalars)  # ring elements per client, the scalars' among them
    metrics = {"secagg_survivors": survivors, "secagg_aborted": aborted,
               "uplink_bytes": survivors.astype(jnp.float32) * sent * (RING_BITS // 8),
               SURVIVORS: alive & ~aborted}
    return join(unravel(mean), scalar_means), state, metrics

  return Aggregator(no_state, aggregate, validate, ignores_weights=True,
                    distinct_clients=True)
