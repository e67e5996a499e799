"""Attacks by a fixed set of malicious clients, inside the vectorized round.

The malicious clients are a fixed subset of client ids (a boolean mask from
`choose_malicious`), sampled like everyone else, so a round holds however many of
them were drawn (reported as `malicious_sampled`). Model poisoning can instead take
an integer k: the first k clients sampled each round are malicious (a uniformly
random k of them, since sampling is uniform), the setting of the robust
aggregators' analyses. Model poisoning is a per-client transform that goes first in
an aggregator chain; data poisoning is a `client_data_transform` for `fedavg`, so
malicious clients really train on poisoned data.

- Sign flipping: a malicious client sends -scale x its update (the sign-flipping
  attack of Li, Xu, Chen, Giannakis, Ling 2019, "RSA: Byzantine-Robust Stochastic
  Aggregation Methods for Distributed Learning from Heterogeneous Datasets").
- Scaling: factor x its update (explicit boosting: Bhagoji, Chakraborty, Mittal,
  Calo 2019, "Analyzing Federated Learning through an Adversarial Lens").
- Label flipping: label y becomes K - 1 - y (Tolpegin, Truex, Gursoy, Liu 2020,
  "Data Poisoning Attacks Against Federated Learning Systems").
- Model replacement backdoor: Bagdasaryan, Veit, Hua, Estrin, Shmatikov 2020, "How To
  Backdoor Federated Learning": the attacker trains on its data with a fraction of
  examples carrying a trigger and the target label, then scales its update by
  gamma = (sum of the round's weights) / (server lr x its weight), so that the
  averaged model is replaced by its own. `backdoor_evaluator` measures backdoor
  accuracy: the fraction of triggered test examples (not of the target class)
  classified as the target.

A data attack's transform has `validate(apply, params, data)`, which checks it against
the model and the training data before anything compiles: the mask's length against
the number of clients, labels and the backdoor's target against the model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import checks
from fedjax_sim.aggregators import ClientTransform, no_state, split_scalars
from fedjax_sim.data import FederatedData
from fedjax_sim.evaluation import make_evaluator


def choose_malicious(num_clients: int, fraction: float | None = None, *, count: int | None = None,
                     seed: int = 0) -> np.ndarray:
  """A boolean mask [num_clients] marking round(fraction * num_clients) (or `count`)
  clients, chosen at random by `seed`, as malicious (Python's round, half to even: 0.1
  of 25 clients is 2; give `count` for another)."""
  if not (checks.is_count(num_clients)):
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if isinstance(seed, bool):
    raise ValueError(f"choose_malicious: seed must be an integer, got {seed!r}")
  if (fraction is None) == (count is None):
    raise ValueError("choose_malicious: give exactly one of fraction= or count=")
  if fraction is not None:
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"malicious fraction must lie in [0, 1], got {fraction!r}")
    count = round(fraction * num_clients)
  if not (checks.is_count(count, 0)):
    raise ValueError(f"malicious count must be an integer >= 0, got {count!r}")
  if count > num_clients:
    raise ValueError(f"more malicious clients ({count}) than clients ({num_clients})")
  mask = np.zeros(num_clients, bool)
  mask[np.random.default_rng(seed).permutation(num_clients)[:count]] = True
  return mask


def _validator(malicious: np.ndarray):
  def validate(clients_per_round, num_clients=None):
    if num_clients is not None and len(malicious) != num_clients:
      raise ValueError(f"the malicious-client mask covers {len(malicious)} clients but the data "
                       f"has {num_clients}")
  return validate


def _check_mask(malicious) -> jax.Array:
  mask = np.asarray(malicious)
  if mask.dtype != bool or mask.ndim != 1:
    raise ValueError("malicious must be a 1-D boolean mask over clients (see choose_malicious)")
  return mask


def _model_attack(malicious, scale_fn: Callable) -> ClientTransform:
  """Multiplies malicious clients' updates by scale_fn(is_malicious [C], weights [C]).

  Only the update: the scalars an algorithm sends beside it (FedNova's gradient weight,
  q-FFL's h, FedExP's squared norm; `aggregators.split_scalars`) go as the client
  computed them, or a sign flip would flip FedNova's tau_eff too and a boost would
  boost it twice.

  `malicious` is a mask over all clients, or an integer k: the first k sampled each
  round. Either is the stage's state, so a sweep can swap it in the ServerState
  without recompiling.
  """
  if np.ndim(malicious) == 0:
    per_round = malicious
    if not (checks.is_count(per_round, 0)):
      raise ValueError(f"malicious clients per round must be an integer >= 0, got {per_round!r}")

    def validate(clients_per_round, num_clients=None):
      if per_round > clients_per_round:
        raise ValueError(f"more malicious clients per round ({per_round}) than clients "
                         f"sampled per round ({clients_per_round})")

    initial, is_bad = jnp.int32(per_round), lambda state, ids: jnp.arange(ids.shape[0]) < state
  else:
    mask = _check_mask(malicious)
    initial, is_bad, validate = jnp.asarray(mask), lambda state, ids: state[ids], _validator(mask)

  def init(params, num_clients):
    del params, num_clients
    return initial

  def apply(state, deltas, weights, ids, key):
    del key
    bad = is_bad(state, ids)
    factor = jnp.where(bad, scale_fn(bad, weights), 1.0)
    update, scalars, join = split_scalars(deltas)
    scaled = [d * factor.reshape(-1, *([1] * (d.ndim - 1))).astype(d.dtype) for d in update]
    return join(scaled, scalars), weights, state, {"malicious_sampled": jnp.sum(bad)}

  return ClientTransform(init, apply, validate)


def _check_factor(name: str, value, positive: bool) -> float:
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  value = float(value)
  if not np.isfinite(value) or (positive and not value > 0):
    # NaN or inf made a NaN model in a run reported as completed; a sign flip by -1 sent
    # the update unflipped: no attack, reported as one.
    raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
  return value


def sign_flip(malicious, scale: float = 1.0) -> ClientTransform:
  """Malicious clients (a mask over clients, or k per round) send -scale x their update
  (scale > 0)."""
  scale = _check_factor("sign_flip's scale", scale, positive=True)
  return _model_attack(malicious, lambda bad, w: -scale)


def scaling(malicious, factor: float) -> ClientTransform:
  """Malicious clients (a mask over clients, or k per round) send factor x their update."""
  factor = _check_factor("scaling's factor", factor, positive=False)
  if factor == 1.0:  # as sign_flip refuses -1: no attack, reported as one
    raise ValueError("scaling's factor 1 sends the honest update: no attack")
  return _model_attack(malicious, lambda bad, w: factor)


def model_replacement(malicious, server_learning_rate: float = 1.0,
                      boost: float | None = None) -> ClientTransform:
  """Malicious clients scale their update so the round's mean becomes theirs
  (Bagdasaryan et al. 2020): by `boost`, or by sum(w) / (lr x sum of the malicious w)."""
  if not server_learning_rate > 0:
    raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate!r}")
  if boost is not None:
    boost = _check_factor("model_replacement's boost", boost, positive=True)

  def gamma(bad, w):
    if boost is not None:
      return float(boost)
    return jnp.sum(w) / (server_learning_rate * jnp.maximum(jnp.sum(jnp.where(bad, w, 0.0)),
                                                            1e-12))

  return _model_attack(malicious, gamma)


def _is_malicious(mask: np.ndarray, client_id: jax.Array) -> jax.Array:
  # A client past the mask's end is honest: plain indexing clamps, which made every
  # later client a copy of the last one marked (`validate` refuses such a mask).
  return jnp.asarray(mask).at[client_id].get(mode="fill", fill_value=False)


def _check_mask_covers(mask: np.ndarray, data: FederatedData) -> None:
  if len(mask) != data.num_clients:
    raise ValueError(f"the malicious-client mask covers {len(mask)} clients but the data "
                     f"has {data.num_clients}")


def _num_outputs(apply, params, data: FederatedData) -> int:
  return checks.model_output(apply, params, data.x.shape[2:], data.x.dtype,
                             "the data's examples").shape[-1]


def label_flip(malicious, num_classes: int):
  """A client_data_transform: malicious clients' labels y become num_classes - 1 - y."""
  mask = _check_mask(malicious)
  if not (checks.is_count(num_classes, 2)):
    raise ValueError(f"label_flip: num_classes must be an integer >= 2, got {num_classes!r}")
  num_classes = int(num_classes)

  def transform(x, y, n, client_id, key):
    del key
    flipped = jnp.where(y >= 0, num_classes - 1 - y, y)  # keep ignored (-1) token labels
    return x, jnp.where(_is_malicious(mask, client_id), flipped, y), n

  def validate(apply, params, data: FederatedData) -> None:
    """Raises ValueError if the flip does not fit the data and the model: a label at or
    above num_classes flips to a negative one, a num_classes above the model's outputs
    flips labels past its last logit (a NaN loss)."""
    _check_mask_covers(mask, data)
    outputs = _num_outputs(apply, params, data)
    if num_classes > outputs:
      raise ValueError(f"label_flip: num_classes={num_classes} but the model has {outputs} "
                       f"outputs: flipped labels would go up to {num_classes - 1}")
    top = int(checks.real_labels(data).max(initial=-1))
    if top >= num_classes:
      raise ValueError(f"label_flip: num_classes={num_classes} but the data's labels go up "
                       f"to {top}: they would flip to negative labels")

  transform.validate = validate
  return transform


class Backdoor(NamedTuple):
  """A trigger: set input features `features` (indices into the flattened example)
  to `value`; triggered examples are labelled `target`."""

  features: Sequence[int]
  value: float
  target: int
  poison_fraction: float = 0.5  # of a malicious client's examples, poisoned each round


def _check_backdoor(backdoor: Backdoor) -> np.ndarray:
  """The trigger's feature indices, once every field that needs no data is checked."""
  features = np.asarray(backdoor.features)
  if not (features.ndim == 1 and features.size and np.issubdtype(features.dtype, np.integer)
          and features.min() >= 0):
    raise ValueError(f"the backdoor's features must be a non-empty list of indices >= 0 into "
                     f"the flattened example, got {backdoor.features!r}")
  value = backdoor.value
  try:  # NaN or inf features gave a NaN loss
    finite = not isinstance(value, bool) and np.ndim(value) == 0 and np.isfinite(float(value))
  except (TypeError, ValueError):
    finite = False
  if not finite:
    raise ValueError(f"the backdoor's value must be a finite number, got {value!r}")
  if not (checks.is_count(backdoor.target, 0)):
    raise ValueError(f"the backdoor's target must be a class index (an integer >= 0), got "
                     f"{backdoor.target!r}")
  return features


def _check_features_fit(features: np.ndarray, example_shape: tuple[int, ...]) -> None:
  size = int(np.prod(example_shape))
  if features.max() >= size:
    # A scatter drops an index past the end: the trigger was never stamped.
    raise ValueError(f"the backdoor's features index the flattened example, of "
                     f"{size} values (shape {tuple(example_shape)}), but go up to "
                     f"{int(features.max())}")


def apply_trigger(x: jax.Array, backdoor: Backdoor) -> jax.Array:
  """x [n, ...] with the trigger stamped on every example."""
  features = _check_backdoor(backdoor)
  _check_features_fit(features, x.shape[1:])  # static shapes: raises while tracing
  flat = x.reshape(x.shape[0], -1)
  flat = flat.at[:, jnp.asarray(features)].set(backdoor.value)
  return flat.reshape(x.shape)


def backdoor_data(malicious, backdoor: Backdoor):
  """A client_data_transform: each malicious client stamps the trigger on a random
  `poison_fraction` of its examples (fresh each round) and labels them `target`."""
  mask = _check_mask(malicious)
  features = _check_backdoor(backdoor)
  if not 0.0 < backdoor.poison_fraction <= 1.0:
    raise ValueError(f"poison_fraction must lie in (0, 1], got {backdoor.poison_fraction!r}")

  def transform(x, y, n, client_id, key):
    # One draw per example index, so padding cannot change which examples are poisoned.
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(x.shape[0]))
    poison = (u < backdoor.poison_fraction) & _is_malicious(mask, client_id)
    shape = (-1,) + (1,) * (x.ndim - 1)
    x = jnp.where(poison.reshape(shape), apply_trigger(x, backdoor), x)
    y = jnp.where(poison.reshape((-1,) + (1,) * (y.ndim - 1)), backdoor.target, y)
    return x, y, n

  def validate(apply, params, data: FederatedData) -> None:
    """Raises ValueError if the trigger or the target does not fit the data and the
    model: a target past its last logit gave a NaN loss."""
    _check_mask_covers(mask, data)
    _check_features_fit(features, data.x.shape[2:])
    outputs = _num_outputs(apply, params, data)
    if backdoor.target >= outputs:
      raise ValueError(f"the backdoor's target is {backdoor.target} but the model has "
                       f"{outputs} outputs")

  transform.validate = validate
  return transform


def compose_data(*transforms):
  """One client_data_transform applying `transforms` in order (each with its own key)."""
  def transform(x, y, n, client_id, key):
    for i, t in enumerate(transforms):
      x, y, n = t(x, y, n, client_id, jax.random.fold_in(key, i))
    return x, y, n

  def validate(apply, params, data: FederatedData) -> None:
    for t in transforms:
      if getattr(t, "validate", None) is not None:
        t.validate(apply, params, data)

  transform.validate = validate
  return transform


def backdoor_evaluator(apply, x: np.ndarray, y: np.ndarray, backdoor: Backdoor,
                       batch_size: int = 1024) -> Callable[..., dict[str, float]]:
  """`evaluate(params) -> {'backdoor_accuracy': ...}` on the test examples whose label
  is not the target, with the trigger stamped on."""
  _check_backdoor(backdoor)
  x, y = np.asarray(x), np.asarray(y)
  keep = y != backdoor.target
  if not keep.any():
    raise ValueError("backdoor_evaluator: every test example already has the target label")
  triggered = np.asarray(apply_trigger(jnp.asarray(x[keep]), backdoor))
  target = np.full(int(keep.sum()), backdoor.target, y.dtype)
  evaluate = make_evaluator(apply, test=(triggered, target), batch_size=batch_size)
  return lambda params: {"backdoor_accuracy": evaluate(params)["test_accuracy"]}
