"""Loop references of the aggregator transforms: one client at a time, numpy float64.

Each mirrors a vectorized stage of fedjax_sim and draws the same random numbers from
the same keys (the key scheme is part of each stage's contract); everything else is
an independent implementation of what the paper says. A `Chain` of them is the
host-side `aggregator` of `ReferenceFedAvg`. Client stages map
`(deltas: list of pytrees, weights, ids, key) -> (deltas, weights)`, reducers
`(deltas, weights, ids, key) -> delta`, server stages `(delta, key) -> delta`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def flat(tree) -> np.ndarray:
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def unflat(vec: np.ndarray, like):
  leaves, treedef = jax.tree_util.tree_flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(np.shape(leaf)))
    out.append(np.asarray(vec[start:start + size], np.float32).reshape(np.shape(leaf)))
    start += size
  return jax.tree_util.tree_unflatten(treedef, out)


def split(tree):
  """(the update's coordinates, the 0-d leaves: scalars an algorithm sends beside its
  update, such as FedNova's gradient weight) of one client's upload, float64, with the
  inverse `join(update, scalars)`."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_scalar = [np.ndim(x) == 0 for x in leaves]
  update = [x for x, s in zip(leaves, is_scalar) if not s]
  scalars = np.array([float(x) for x, s in zip(leaves, is_scalar) if s], np.float64)

  def join(u, sc):
    u_leaves, it, out = jax.tree_util.tree_leaves(unflat(u, update)), iter(sc), []
    u_iter = iter(u_leaves)
    for s in is_scalar:
      out.append(np.float32(next(it)) if s else next(u_iter))
    return jax.tree_util.tree_unflatten(treedef, out)

  return flat(update), scalars, join


def normal(key, size):
  """The noise draw of privacy.normal_like: one vector over all coordinates, in tree order."""
  return np.asarray(jax.random.normal(key, (size,), jnp.float32), np.float64)


def client_key(key, client_id):
  return jax.random.fold_in(key, int(client_id))


class Chain:
  """Client stages, one reducer, server stages, each with its own split key."""

  def __init__(self, *stages):
    self.stages = stages
    self.r = next(i for i, s in enumerate(stages) if s.kind == "reducer")
    self.ignores_weights = getattr(stages[self.r], "ignores_weights", False)

  def __call__(self, deltas, weights, ids, key):
    keys = jax.random.split(key, len(self.stages))
    weights = np.asarray(weights, np.float64)
    for i in range(self.r):
      deltas, weights = self.stages[i](deltas, weights, ids, keys[i])
    delta = self.stages[self.r](deltas, weights, ids, keys[self.r])
    for i in range(self.r + 1, len(self.stages)):
      delta = self.stages[i](delta, keys[i])
    return delta


# --- per-client stages -------------------------------------------------------------


class Clip:
  kind = "client"

  def __init__(self, clip_norm):
    self.clip_norm = clip_norm

  def __call__(self, deltas, weights, ids, key):
    out = []
    for d in deltas:
      v = flat(d)
      norm = np.linalg.norm(v)
      out.append(unflat(v * min(1.0, self.clip_norm / norm) if norm > 0 else v, d))
    return out, weights


def quantize_vector(x, bits, u):
  levels = 2 ** bits - 1
  lo, hi = x.min(), x.max()
  if hi == lo:
    return x.copy()
  s = (x - lo) / (hi - lo) * levels
  level = np.clip(np.floor(s) + (u < s - np.floor(s)), 0, levels)
  return lo + level * (hi - lo) / levels


class Quantize:
  kind = "client"

  def __init__(self, bits, rotation=False):
    self.bits, self.rotation = bits, rotation

  def __call__(self, deltas, weights, ids, key):
    sign_key, round_key = jax.random.split(key)
    out = []
    for d, i in zip(deltas, ids):
      v = flat(d)
      n = len(v)
      if self.rotation:
        size = 1 << math.ceil(math.log2(n))
        signs = np.asarray(jax.random.rademacher(sign_key, (size,), dtype=jnp.float32), np.float64)
        h = scipy.linalg.hadamard(size) / math.sqrt(size)
        x = h @ (np.pad(v, (0, size - n)) * signs)
      else:
        x = v
      u = np.asarray(jax.random.uniform(client_key(round_key, i), (len(x),)), np.float64)
      q = quantize_vector(x, self.bits, u)
      if self.rotation:
        q = (signs * (h @ q))[:n]
      out.append(unflat(q, d))
    return out, weights


class TopK:
  kind = "client"

  def __init__(self, k=None, fraction=None, error_feedback=True):
    self.k, self.fraction, self.error_feedback = k, fraction, error_feedback
    self.residual = {}

  def __call__(self, deltas, weights, ids, key):
    out = []
    for d, i in zip(deltas, ids):
      v = flat(d)
      k = self.k if self.k is not None else max(1, round(self.fraction * len(v)))
      u = v + self.residual.get(int(i), 0.0) if self.error_feedback else v
      keep = np.argsort(-np.abs(u), kind="stable")[:k]
      sent = np.zeros_like(u)
      sent[keep] = u[keep]
      if self.error_feedback:
        self.residual[int(i)] = u - sent
      out.append(unflat(sent, d))
    return out, weights


class Scale:
  """Sign flipping (factor -s), scaling (factor) or model replacement (factor None)."""

  kind = "client"

  def __init__(self, malicious, factor=None, server_learning_rate=1.0):
    self.malicious, self.factor, self.lr = np.asarray(malicious), factor, server_learning_rate

  def __call__(self, deltas, weights, ids, key):
    if self.malicious.ndim == 0:  # the first k sampled
      bad = np.arange(len(deltas)) < int(self.malicious)
    else:
      bad = self.malicious[np.asarray(ids)]
    factor = self.factor
    if factor is None:
      factor = weights.sum() / (self.lr * weights[bad].sum()) if bad.any() else 1.0
    out = []
    for d, b in zip(deltas, bad):  # the update; scalars beside it go as computed
      u, sc, join = split(d)
      out.append(join(u * (factor if b else 1.0), sc))
    return out, weights


# --- reducers ----------------------------------------------------------------------


class Mean:
  kind = "reducer"

  def __call__(self, deltas, weights, ids, key):
    w = weights / weights.sum()
    return unflat(sum(wi * flat(d) for wi, d in zip(w, deltas)), deltas[0])


class DPMean:
  kind = "reducer"
  ignores_weights = True  # so the round counts every client once

  def __init__(self, clip_norm, noise_multiplier, target_quantile=None, learning_rate=0.2,
               count_stddev=None):
    self.clip_norm, self.z = clip_norm, noise_multiplier
    self.quantile, self.lr, self.count_stddev = target_quantile, learning_rate, count_stddev

  def __call__(self, deltas, weights, ids, key):
    m = len(deltas)
    noise_key, count_key = jax.random.split(key)
    c, z = self.clip_norm, self.z
    sigma_b = self.count_stddev if self.count_stddev is not None else m / 20
    if self.quantile is not None and z > 0:
      z = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    total, unclipped = 0.0, 0
    for d in deltas:
      v = flat(d)
      norm = np.linalg.norm(v)
      total = total + (v * min(1.0, c / norm) if norm > 0 else v)
      unclipped += norm <= c
    noise = normal(noise_key, len(flat(deltas[0])))
    if self.quantile is not None:
      b = (unclipped + sigma_b * float(jax.random.normal(count_key))) / m
      self.clip_norm = c * math.exp(-self.lr * (b - self.quantile))
    return unflat((total + z * c * noise) / m, deltas[0])


class Median:
  kind = "reducer"
  ignores_weights = True  # so the round counts every client once

  def __call__(self, deltas, weights, ids, key):
    return unflat(np.median(np.stack([flat(d) for d in deltas]), axis=0), deltas[0])


class TrimmedMean:
  kind = "reducer"
  ignores_weights = True  # so the round counts every client once

  def __init__(self, num_trim):
    self.k = num_trim

  def __call__(self, deltas, weights, ids, key):
    x = np.sort(np.stack([flat(d) for d in deltas]), axis=0)
    return unflat(x[self.k:len(deltas) - self.k].mean(axis=0), deltas[0])


class Krum:
  kind = "reducer"
  ignores_weights = True  # so the round counts every client once

  def __init__(self, num_byzantine, num_selected=1):
    self.f, self.selected = num_byzantine, num_selected

  def __call__(self, deltas, weights, ids, key):
    # Distances between the updates alone; the chosen clients' scalars averaged alike.
    parts = [split(d) for d in deltas]
    x, sc = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    m = len(x)
    scores = []
    for i in range(m):
      dist = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(m) if j != i)
      scores.append(sum(dist[:m - self.f - 2]))
    chosen = np.argsort(scores, kind="stable")[:self.selected]
    return parts[0][2](x[chosen].mean(axis=0), sc[chosen].mean(axis=0))


class GeometricMedian:
  kind = "reducer"

  def __init__(self, num_iterations=8, smoothing=1e-6):
    self.iterations, self.nu = num_iterations, smoothing

  def __call__(self, deltas, weights, ids, key):
    # Weiszfeld on the updates alone; the scalars combined with the last step's shares.
    parts = [split(d) for d in deltas]
    x, sc = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    if not (weights > 0).any():  # no client with examples: no update
      return parts[0][2](np.zeros_like(x[0]), np.zeros_like(sc[0]))
    alpha = weights / weights.sum()
    v = np.median(x[weights > 0], axis=0)  # clients of weight 0 do not count
    for _ in range(self.iterations):
      beta = alpha / np.maximum(self.nu, np.linalg.norm(x - v, axis=1))
      shares = beta / beta.sum()
      v = shares @ x
    return parts[0][2](v, shares @ sc)


class SecureMean:
  """What secure aggregation must compute: the plain mean of the survivors' quantized
  updates (no masks: they are the vectorized path's business, and must cancel)."""

  kind = "reducer"
  ignores_weights = True  # so the round counts every client once

  def __init__(self, bits=16, clip_range=1.0, dropout=0.0, threshold=None):
    self.bits, self.r, self.dropout, self.threshold = bits, clip_range, dropout, threshold

  def __call__(self, deltas, weights, ids, key):
    round_key, drop_key, _ = jax.random.split(key, 3)
    m, levels = len(deltas), 2 ** self.bits - 1
    alive = np.asarray(jax.random.uniform(drop_key, (m,))) >= self.dropout
    t = self.threshold if self.threshold is not None else m // 2 + 1
    # The update quantized; the scalars beside it (FedNova's gradient weight) exact.
    parts = [split(d) for d in deltas]
    join = parts[0][2]
    if alive.sum() < t:
      return join(np.zeros_like(parts[0][0]), np.zeros_like(parts[0][1]))
    values, scalars = [], []
    for (v, sc, _), i, a in zip(parts, ids, alive):
      u = np.asarray(jax.random.uniform(client_key(round_key, i), (len(v),)), np.float64)
      s = (np.clip(v, -self.r, self.r) + self.r) / (2 * self.r) * levels
      level = np.clip(np.floor(s) + (u < s - np.floor(s)), 0, levels)
      if a:
        values.append(level / levels * 2 * self.r - self.r)
        scalars.append(sc)
    return join(np.mean(values, axis=0), np.mean(scalars, axis=0))


# --- server stages -----------------------------------------------------------------


class GaussianNoise:
  kind = "server"

  def __init__(self, stddev):
    self.stddev = stddev

  def __call__(self, delta, key):
    v = flat(delta)
    return unflat(v + self.stddev * normal(key, len(v)), delta)
