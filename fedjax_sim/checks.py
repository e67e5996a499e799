"""Host-side checks of a model against its data, run before anything compiles.

Each names both sides of a mismatch: what the model expects and what the data hold
(the model's input shape against the examples' shape, its number of outputs against
the largest label), or the client and example whose features are not finite.
Used by every algorithm's `validate` (training data) and by the evaluators (the
central test set, per-client test splits).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.data import FederatedData


def is_concrete(value: Any) -> bool:
  """False for a traced value (a hyperparameter inside a sweep's program or a round):
  host-side checks of settings skip those, and `validate` checks the state's values."""
  return not isinstance(value, jax.core.Tracer)


def _of(what: str) -> str:
  """The possessive: "the data's", "the client test splits'"."""
  return what + ("'" if what.endswith("s") else "'s")


def _shape(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in text.replace(" ", "").split(",") if s)


def is_count(value: Any, minimum: int = 1) -> bool:
  """An integer >= minimum, Python's or numpy's; not a bool (True would count as 1)."""
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= minimum)


def count_error(name: str, value: Any) -> ValueError:
  """The error for `name` that is no positive integer; a traced value (a sweep's grid=)
  is told where such a setting goes."""
  where = (": it sets shapes, so a sweep takes it in static=, not grid="
           if isinstance(value, jax.core.Tracer) else "")
  return ValueError(f"{name} must be a positive integer, got {value!r}{where}")


class ModelInputError(ValueError):
  """Raised by a model, while tracing, for examples it would misread rather than fail on
  (a reshape takes any examples of the right size: channels-first images, scrambled)."""

  def __init__(self, expected: tuple[int, ...], got: tuple[int, ...], note: str = ""):
    self.expected, self.got, self.note = tuple(expected), tuple(got), note
    super().__init__(self.describe("the examples"))

  def describe(self, what: str) -> str:
    text = (f"the model expects inputs of shape {self.expected} "
            f"({int(np.prod(self.expected))} values) but {what} have shape {self.got}")
    return f"{text}: {self.note}" if self.note else text


def _input_mismatch(error: Exception, shape: tuple[int, ...], dtype, what: str) -> str:
  """A message naming what the model expects and what `what` (e.g. "the data's
  examples") hold, read from the error the model raised on one example if it can."""
  if isinstance(error, ModelInputError):
    return error.describe(what)
  message = str(error)
  size = int(np.prod(shape))
  dense = re.search(r"contracting dimensions to have the same shape, got "
                    r"\(([\d, ]*)\) and \(([\d, ]*)\)", message)
  if dense:  # x @ kernel: x's last axes against the kernel's first
    got, wants = _shape(dense.group(1)), _shape(dense.group(2))
    if got == shape or (len(got) == 1 and got[0] == size):
      return (f"the model expects inputs of shape {wants} but {what} have shape {shape}")
    return (f"a dense layer of the model expects inputs of shape {wants} but {what}, of "
            f"shape {shape}, give it {got}")
  reshape = re.search(r"cannot reshape array of shape \(([\d, ]*)\) \(size \d+\) into shape "
                      r"\(([\d, ]*)\)", message)
  if reshape:
    target = _shape(reshape.group(2))
    if target and target[0] == 1:  # the batch of one example, reshaped to the model's input
      wants = target[1:]
      return (f"the model expects inputs of shape {wants} ({int(np.prod(wants))} values) but "
              f"{what} have shape {shape} ({size} values)")
  first = message.strip().splitlines()[0] if message.strip() else ""
  return (f"the model cannot take {what}, of shape {shape} and dtype {np.dtype(dtype).name}: "
          f"{type(error).__name__}: {first}")


def model_output(apply, params, example_shape, dtype, what: str) -> jax.ShapeDtypeStruct:
  """The shape of `apply(params, x)` on a batch of one example of `example_shape`.

  Raises:
    ValueError: the model cannot take such examples, naming the shape it expects (when
      its error says) and the examples' shape, e.g. "the model expects inputs of shape
      (50,) but the data's examples have shape (60,)".
  """
  shape = tuple(int(s) for s in example_shape)
  try:
    return jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, *shape), dtype))
  except Exception as e:  # flax/jax raise TypeError, ValueError... from inside the model
    raise ValueError(_input_mismatch(e, shape, dtype, what)) from e


def check_label_values(logits: jax.ShapeDtypeStruct, y: np.ndarray, real: np.ndarray,
                       what: str, client_axis: bool) -> None:
  """Raises ValueError if the labels `y` (at the real examples `real`) do not fit the
  model's output `logits` (its shape on a batch of one example): labels per example of
  another shape than the outputs', a label above the number of outputs, or below 0."""
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{_of(what)} labels must be integers (class indices), got {y.dtype}")
  label_shape = y.shape[2:] if client_axis else y.shape[1:]
  if len(logits.shape) >= 2 and tuple(logits.shape[1:-1]) != tuple(label_shape):
    raise ValueError(
        f"the model's output for one example has shape {tuple(logits.shape[1:])} (the last "
        f"axis over classes) but {_of(what)} labels for one example have shape "
        f"{tuple(label_shape)}: it should output shape {(*label_shape, 'classes')}")
  num_classes = logits.shape[-1]
  # Per-token labels (extra axes) may hold IGNORE_LABEL (-1) at padded positions.
  lowest = -1 if len(label_shape) else 0
  mask = real.reshape(*real.shape, *([1] * len(label_shape)))
  real_labels = y[np.broadcast_to(mask, y.shape)]
  if real_labels.size == 0:
    return
  top, bottom = int(real_labels.max()), int(real_labels.min())
  if top < num_classes and bottom >= lowest:
    return
  offender = top if top >= num_classes else bottom
  where = ""
  if client_axis:
    i = int(np.argwhere(np.broadcast_to(mask, y.shape) & (y == offender))[0, 0])
    where = f" (client {i}'s)"
  if top >= num_classes:
    raise ValueError(f"the model has {num_classes} outputs but {_of(what)} labels go up to "
                     f"{top}{where}: build the model for at least {top + 1} classes, or fix the "
                     f"labels")
  raise ValueError(f"{_of(what)} labels must lie in [0, {num_classes}) for this model, found "
                   f"{bottom}{where}")


def check_token_ids(apply, x: np.ndarray, real: np.ndarray, what: str,
                    client_axis: bool) -> None:
  """Raises ValueError if `apply` reads its inputs as token ids (it has
  `token_vocab_size`, as `models.char_rnn`'s does) and the examples of `x` at `real`
  hold an id outside [0, token_vocab_size) or one that is not a whole number: one-hot
  encoding made those zero vectors, silently."""
  vocab = getattr(apply, "token_vocab_size", None)
  if vocab is None:
    return
  x = np.asarray(x)
  mask = np.broadcast_to(real.reshape(*real.shape, *([1] * (x.ndim - real.ndim))), x.shape)
  ids = x[mask]
  if ids.size == 0:
    return
  # NaN is not a whole number either; ids stored as floats (from_clients' default) are
  # fine while whole.
  fractional = (np.zeros(x.shape, bool) if np.issubdtype(x.dtype, np.integer)
                else x != np.round(x))
  if fractional[mask].any():
    bad = mask & fractional
    problem, tail = f"hold {float(x[bad][0]):g}", ", not a whole number"
  else:
    top, bottom = ids.max(), ids.min()
    if 0 <= bottom and top < vocab:
      return
    offender = top if top >= vocab else bottom
    bad = mask & (x == offender)
    shown = int(offender) if np.isfinite(offender) else offender
    if top >= vocab:
      problem = f"go up to {shown}"
      tail = f": build the model for at least {shown + 1} tokens, or fix the data"
    else:
      problem, tail = f"go down to {shown}", ""
  where = f" (client {int(np.argwhere(bad)[0, 0])}'s)" if client_axis else ""
  raise ValueError(f"the model reads token ids in [0, {vocab}) (vocab_size {vocab}) but "
                   f"{_of(what)} token ids {problem}{where}{tail}")


def check_counts(data: FederatedData, what: str = "the data") -> None:
  """Raises ValueError unless `data.counts` holds one integer per client in [0, its padded
  slots]: `from_clients` makes them so, but data built by hand is not checked there,
  and a count past the slots trains padding again, a negative one skews the weights."""
  counts = np.asarray(data.counts)
  if counts.shape != (data.num_clients,) or not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f"{_of(what)} counts must be integers, one per client "
                     f"({data.num_clients}), got shape {counts.shape} and dtype {counts.dtype}")
  bad = np.flatnonzero((counts < 0) | (counts > data.max_examples))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"{_of(what)} counts must lie in [0, {data.max_examples}] (the padded "
                     f"slots per client); client {i}'s is {int(counts[i])}")


def check_labels(apply, params, data: FederatedData, what: str = "the data") -> None:
  """Raises ValueError if the model cannot take `data`'s examples (token ids outside its
  vocabulary among them), or its labels do not fit the model's outputs (negative, or not
  below the number of outputs)."""
  check_counts(data, what)
  logits = model_output(apply, params, data.x.shape[2:], data.x.dtype, f"{_of(what)} examples")
  y, counts = np.asarray(data.y), np.asarray(data.counts)
  real = np.arange(data.max_examples) < counts[:, None]
  check_token_ids(apply, data.x, real, what, client_axis=True)
  check_label_values(logits, y, real, what, client_axis=True)


def real_labels(data: FederatedData) -> np.ndarray:
  """The labels of `data`'s real examples, padding slots left out: [examples, *token axes]."""
  return np.asarray(data.y)[np.arange(data.max_examples) < np.asarray(data.counts)[:, None]]


def check_label_schedule(schedule, apply, params, data: FederatedData) -> None:
  """Raises ValueError if a client data schedule that rotates labels over `num_classes`
  (systems.label_drift) does not fit: labels of `data` at or above it would be rewritten
  from round 0, and a model with fewer outputs gets labels past its last logit (a NaN
  loss from the first shift on)."""
  for stage in getattr(schedule, "stages", ()):  # systems.chain_schedules
    check_label_schedule(stage, apply, params, data)
  num_classes = getattr(schedule, "num_classes", None)
  if num_classes is None:
    return
  outputs = model_output(apply, params, data.x.shape[2:], data.x.dtype,
                         f"{_of('the data')} examples").shape[-1]
  if num_classes > outputs:
    raise ValueError(f"the label drift rotates labels over {num_classes} classes but the "
                     f"model has {outputs} outputs")
  top = int(real_labels(data).max(initial=-1))
  if top >= num_classes:
    raise ValueError(f"the label drift rotates labels over {num_classes} classes but the "
                     f"data's labels go up to {top}")


def _non_finite_kind(values: np.ndarray) -> str:
  return "NaN" if np.isnan(values).any() else "inf"


_FINITE_BLOCK = 2**20  # elements of the features checked at a time on the host


def check_finite_features(data: FederatedData, what: str = "the data") -> None:
  """Raises ValueError naming the first client (and example) of `data` whose features hold
  NaN or inf: a model trained on them has a NaN loss from the first round."""
  x = data.x
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  if jax.default_backend() == "cpu":  # the host view: no copy, nothing compiled
    host = np.asarray(x).reshape(x.shape[0], -1)
    # A block of clients at a time: `np.isfinite` of it all is a temporary a quarter of
    # the data's size in fresh memory (78 MB for 1,000 MNIST-shaped clients of 100:
    # 0.07-0.41 against 0.04-0.06 s, benchmarks/dataset_setup.py).
    block = max(1, _FINITE_BLOCK // max(1, host.shape[1]))
    rows = np.concatenate([np.isfinite(host[i:i + block]).all(axis=1)
                           for i in range(0, len(host), block)] or [np.ones(0, bool)])
  else:  # one reduction on the device instead of copying the data to the host
    rows = np.asarray(jax.jit(
        lambda a: jnp.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))(x))
  if rows.all():
    return
  i = int(np.flatnonzero(~rows)[0])
  xi = np.asarray(x[i])
  bad = ~np.isfinite(xi.reshape(xi.shape[0], -1)).all(axis=1)
  j, n = int(np.flatnonzero(bad)[0]), int(np.asarray(data.counts)[i])
  place = f"example {j}" if j < n else f"padding slot {j}, past its {n} examples"
  raise ValueError(f"{what}: client {i}'s features contain {_non_finite_kind(xi[j])} "
                   f"({place}); {len(np.flatnonzero(~rows))} client(s) in all have non-finite "
                   f"features: clean or drop those examples")


def check_finite_array(x: np.ndarray, what: str) -> None:
  """Raises ValueError naming the first example of host array `x` that holds NaN or inf."""
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.inexact) or x.size == 0:
    return
  bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
  if bad.any():
    j = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{_of(what)} features contain {_non_finite_kind(x[j])} (example {j}; "
                     f"{int(bad.sum())} example(s) in all): clean or drop those examples")


def check_finite_params(params: Any, what: str = "the model's parameters") -> None:
  """Raises ValueError naming the first leaf of `params` that holds NaN or inf."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    host = np.asarray(leaf)
    if not np.isfinite(host).all():
      raise ValueError(f"{what} contain {_non_finite_kind(host)} (in "
                       f"{jax.tree_util.keystr(path)}): start from finite parameters")
