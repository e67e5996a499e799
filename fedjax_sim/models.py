"""Models as flax nnx modules, and the pure `(apply, params)` view the engine uses.

Layers are chosen for how they batch under `vmap` over per-client weights:
a dense layer becomes a batched matmul, which is fast everywhere. A convolution
under `vmap` becomes a grouped convolution, which collapses at large client counts
(DESIGN.md), so `Conv` picks a formulation per backend (`fedjax_sim.conv`):
patches-then-matmul on accelerators, canonical per-client convolutions on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import compile as compile_lib
from fedjax_sim import conv as conv_lib
from fedjax_sim import checks
from fedjax_sim.checks import ModelInputError


def _import_nnx():
  """`flax.nnx`, imported without IPython where no IPython shell runs.

  On import, flax.nnx imports IPython (about 0.5 s) only to ask `get_ipython()` whether
  a shell is running, to colour its reprs. If IPython is not loaded, no shell is
  running and the answer is no either way; blocking the import for that moment gives
  flax the same answer for free. In a notebook or IPython, IPython is already loaded.
  """
  if "flax.nnx" in sys.modules or "IPython" in sys.modules:
    from flax import nnx
    return nnx
  sys.modules["IPython"] = None  # `import IPython` now raises ImportError
  try:
    from flax import nnx
  finally:
    del sys.modules["IPython"]
  return nnx


nnx = _import_nnx()

Params = Any


class Model(NamedTuple):
  """A pure model: `apply(params, x) -> logits` and initial `params`. A model that reads
  its inputs as token ids has `apply.token_vocab_size` (`checks.check_token_ids`)."""

  apply: Callable[[Params, jax.Array], jax.Array]
  params: Params


def from_nnx(module: nnx.Module) -> Model:
  """Splits an nnx module once into a pure apply function and its parameters."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(x)

  _mark_tokens(apply, getattr(module, "token_vocab_size", None))
  return Model(apply, params)


def _mark_tokens(apply: Callable, vocab_size: int | None) -> None:
  """Tells the host checks of data against the model that it reads token ids."""
  if vocab_size is not None:
    apply.token_vocab_size = vocab_size


# Initialization runs once per model (its program once per architecture), so it is
# compiled without backend optimization or the fusion emitters: op by op, nnx's
# initializers compiled a truncated normal per shape, 4-6 s for the CNN on a 2-core CPU;
# as one program at -O0 about 1 s, without the emitters 0.4-0.5 s. The values agree with
# eager initialization to the last bit or two (float32 ulps). jaxlib 0.11 and later have
# no emitters option; there -O0 alone more than halves the default's time (jax 0.12, the
# MLP's model phase 895 -> 399 ms: benchmarks/startup.py,
# results/startup_cpu_py312_before.md and _py312.md). The set is chosen by version: a
# jaxlib rejects an unknown option only after the model's trace and lowering, and trying
# the older set first cost the MLP's model phase 407 against 342 ms on jax 0.12
# (results/startup_cpu_py312_init_options.md).
_INIT_OPTIONS = {"xla_backend_optimization_level": 0,
                 **({"xla_cpu_use_fusion_emitters": False}
                    if compile_lib.major_minor() < (0, 11) else {})}


def build(module_class: Callable[..., nnx.Module], *args: Hashable, seed: int = 0,
          **kwargs: Hashable) -> Model:
  """`from_nnx(module_class(*args, **kwargs, rngs=nnx.Rngs(seed)))` with the initializers
  compiled as one program, kept per architecture (`_Programs`): the same seed again (a
  notebook's cell run twice) neither traces nor compiles, nor does a third seed (a loop
  over seeds), which runs the program taking the seed that the second compiled."""
  # A program for one seed alone, the seed a constant of it (nnx.Rngs takes no numpy int).
  own_program = lambda seed: _Initializer(
      lambda _: module_class(*args, **kwargs, rngs=nnx.Rngs(seed)))
  dtype = jax.dtypes.canonicalize_dtype(np.int64)  # what jax.random.key makes of an int
  programs = None
  if (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
      and np.iinfo(dtype).min <= seed <= np.iinfo(dtype).max):
    try:
      programs = _programs(module_class, _typed(args),
                           tuple((k, _typed(v)) for k, v in sorted(kwargs.items())))
    except TypeError:  # an unhashable argument (a list of sizes): no key to keep them by
      pass
  if programs is None:  # or a seed no int array holds (a wider int, a key)
    # nnx.Rngs takes a Python int of any size, but no numpy integer
    return own_program(int(seed) if isinstance(seed, np.integer) else seed)(None)
  if programs.first is None:
    programs.first_seed, programs.first = int(seed), own_program(int(seed))
  if seed == programs.first_seed:
    return programs.first(None)
  if programs.any_seed is None:
    programs.any_seed = _Initializer(lambda s: module_class(
        *args, **kwargs, rngs=nnx.Rngs(jax.random.key(s))))
  return programs.any_seed(np.asarray(seed, dtype))


@dataclasses.dataclass
class _Programs:
  """An architecture's initialization programs: the first seed's, the seed a constant,
  which XLA folds into a smaller program (its key derivation computed at compile time),
  so that a run building one model pays nothing for the others' sake; and one taking
  the seed, for every other seed. Both give the same parameters to the bit."""

  first_seed: int | None = None
  first: _Initializer | None = None
  any_seed: _Initializer | None = None


@functools.cache
def _programs(module_class, args: tuple, kwargs: tuple) -> _Programs:
  return _Programs()


def _typed(value: Any) -> Any:
  """`value` with the types of its parts, as a key: 1, 1.0 and True are equal and hash
  alike, so an architecture built with 1.0 reused the program built with 1 (int32
  parameters)."""
  if isinstance(value, tuple):
    return (tuple, tuple(_typed(v) for v in value))
  return (type(value), value)


class _Initializer:
  """`from_nnx(make_module(seed))` for a jit argument `seed`, the two jitted programs
  kept, so that calls with another seed of the same dtype reuse them."""

  def __init__(self, make_module: Callable[[Any], nnx.Module]):
    self.graphdef = None  # the module's structure, static, set by the first call's trace
    self.token_vocab_size = None  # likewise

    def init(seed):
      module = make_module(seed)
      self.token_vocab_size = getattr(module, "token_vocab_size", None)
      self.graphdef, params, rest = nnx.split(module, nnx.Param, ...)
      return params, rest

    self.tuned = (jax.jit(init, compiler_options=_INIT_OPTIONS)
                  if jax.default_backend() == "cpu" else None)
    self.plain = jax.jit(init)

  def __call__(self, seed) -> Model:
    out = None
    if self.tuned is not None:
      try:
        out = self.tuned(seed)
      except Exception:  # a jaxlib without one of these options, or inside a trace
        pass
    # As usual; may reuse the trace above, not running `init` again.
    params, rest = self.plain(seed) if out is None else out
    graphdef = self.graphdef

    def apply(params: Params, x: jax.Array) -> jax.Array:
      return nnx.merge(graphdef, params, rest)(x)

    _mark_tokens(apply, self.token_vocab_size)
    return Model(apply, params)


def mixed_precision(model: Model, compute_dtype: Any = jnp.bfloat16) -> Model:
  """`model` computing in `compute_dtype` (bfloat16: half the bytes, faster matmuls and
  convolutions on GPU/TPU) while its parameters, their gradients, the optimizers and
  the aggregation stay float32.

  The cast sits inside `apply`, so differentiating through it returns float32
  gradients of the float32 master weights; logits come back as float32 so that
  the softmax and the loss are computed at full precision.
  """
  dtype = jnp.dtype(compute_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    # An integer or boolean compute dtype made every gradient zero, silently.
    raise ValueError(f"mixed_precision: compute_dtype must be a floating dtype (bfloat16, "
                     f"float16...), got {dtype}")
  base = model.apply
  vocab_size = getattr(base, "token_vocab_size", None)

  def cast(a):
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

  def apply(params: Params, x: jax.Array) -> jax.Array:
    # Token ids stay as they are: bfloat16 holds integers exactly only up to 256.
    inputs = x if vocab_size is not None else cast(x)
    return base(jax.tree_util.tree_map(cast, params), inputs).astype(jnp.float32)

  _mark_tokens(apply, vocab_size)
  return Model(apply, model.params)


def _check_size(model: str, name: str, value, minimum: int = 1) -> None:
  """An architecture's size argument must be an integer >= minimum (not a bool)."""
  if not checks.is_count(value, minimum):
    raise ValueError(f"{model}: {name} must be an integer >= {minimum}, got {value!r}")


def num_params(params: Params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


class Conv(nnx.Module):
  """A 'SAME' 2-D convolution over NHWC inputs that batches well over clients;
  `impl` is one of `conv.IMPLS` ("auto": the fastest measured on this backend)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               impl: str = "auto", rngs: nnx.Rngs):
    conv_lib.resolve(impl)  # raises for an unknown impl
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.kernel_size = kernel_size
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    # One dtype for both, as nnx.Conv does: lax.conv takes no uint8 images beside a
    # float kernel (the "patches" impl did, so a model ran on GPU and failed on CPU).
    kernel = self.kernel[...]
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    return add_bias(conv_lib.conv2d_same(x.astype(dtype), kernel.astype(dtype), self.impl),
                    self.bias[...])


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis. Its bias gradient is a matrix-vector product of the
  materialized output gradient: left to autodiff it was a reduction that XLA:CPU fused
  with the recomputed ReLU and pooling gradients, 32 outputs striding over every
  activation (a fifth of the CNN's local step on a 2-core CPU)."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, bias  # kept for its dtype


def _add_bias_bwd(bias, g):
  # The barrier materializes g, so XLA cannot fuse its producers into the sum again.
  flat = jax.lax.optimization_barrier(g).reshape(-1, g.shape[-1])
  ones = jnp.ones((flat.shape[0],), flat.dtype)
  # Summed in float32 at least, whatever the compute dtype (bfloat16 in mixed precision),
  # and at full precision: a default-precision float32 dot rounds g to TensorFloat-32 on
  # recent NVIDIA GPUs, where autodiff's sum would not.
  summed = jnp.matmul(ones, flat, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.promote_types(flat.dtype, jnp.float32))
  return g, summed.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, over NHWC; an odd last row or column is dropped (as
  'VALID' pooling and PyTorch's default do).

  Written as the maximum of the four strided slices of each window's corners: one
  elementwise fusion that batches trivially under vmap. As a reshape and a `max` over
  the window axes, XLA:CPU's reduction took 4.7x longer (0.61 against 0.13 ms for the
  CNN's first pooling, batch 20; with its gradient and the ReLU 1.21 against 0.75 ms:
  benchmarks/results/cnn_layers_cpu.md), and `lax.reduce_window` longer still.

  Its gradient goes to the first maximum of each window (row by row), as in PyTorch and
  XLA's select-and-scatter; autodiff of a `max` splits it between tied maxima, with a
  count and a division that made it 2.5x slower on CPU. The two agree wherever a
  window's maximum is unique, and where ties are at 0 after a ReLU (whose gradient
  there is 0)."""
  return _pool(x)


def _corners(x):
  """The four corners of every 2x2 window, row by row: [top left, top right, bottom
  left, bottom right], each [N, H // 2, W // 2, C]."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return [x[:, i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)]


def _pool(x):
  a, b, c, d = _corners(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _pool_fwd(x):
  y = _pool(x)
  return y, (x, y)


def _pool_bwd(residuals, g):
  x, y = residuals
  t00, t01, t10, t11 = (corner == y for corner in _corners(x))
  first = [t00, t01 & ~t00, t10 & ~(t00 | t01), t11 & ~(t00 | t01 | t10)]
  d00, d01, d10, d11 = (jnp.where(m, g, 0) for m in first)
  # Interleave the corners back into rows and columns: [N, H/2, 2, W/2, 2, C].
  dx = jnp.stack([jnp.stack([d00, d01], 3), jnp.stack([d10, d11], 3)], 2)
  n, h2, _, w2, _, c = dx.shape
  dx = dx.reshape(n, 2 * h2, 2 * w2, c)
  # Zeros for an odd last row or column (a no-op pad where there is none).
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - 2 * h2), (0, x.shape[2] - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`lax.dot_general` for `nnx.Linear(dot_general=...)`: on CPU, a dense layer's
  `x @ kernel` whose input gradient is computed as `(kernel @ g.T).T`.

  Autodiff writes that gradient as `g @ kernel.T`, a product whose large right operand
  is contracted on its minor axis, which XLA:CPU's Eigen kernel runs slowly: for the
  CNN's 3136x512 layer, batch 20, 2.14 ms against 0.81 ms this way, in a client step of
  about 15 ms (benchmarks/results/cnn_layers_session8_cpu.md). With YNNPACK's dots
  (jaxlib 0.12) the MLP's rounds take 0.93-0.94x the wall time with it, for the same CPU
  time (the two cores kept busier), and 0.97-1.03x on jaxlib 0.10 and 0.11, to the same
  bits (benchmarks/compile_options.py --option dense). The barrier keeps XLA from
  rewriting the product back. Other products, and other backends, are left to
  `lax.dot_general`. The MLP's and the CNN's dense layers use it; pass it to your own
  `nnx.Linear` layers the same way."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  if (jax.default_backend() != "cpu" or precision is not None or rhs.ndim != 2
      or any(batch) or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,)
      or any(v is not None for v in kwargs.values())):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
  return _matmul(lhs, rhs)


@jax.custom_vjp
def _matmul(x, kernel):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  rows = g.reshape(-1, g.shape[-1])
  dx = jax.lax.optimization_barrier(kernel @ rows.T).T.reshape(x.shape)
  return dx.astype(x.dtype), (x.reshape(-1, x.shape[-1]).T @ rows).astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class LogisticRegression(nnx.Module):
  """Multinomial logistic regression: one linear layer to class logits."""

  def __init__(self, num_features: int, num_classes: int, *, rngs: nnx.Rngs):
    _check_size("logistic_regression", "num_features", num_features)
    _check_size("logistic_regression", "num_classes", num_classes)
    self.linear = nnx.Linear(num_features, num_classes, kernel_init=nnx.initializers.zeros,
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
  """The 2NN of McMahan et al. 2017: 784-200-200-10 with ReLU (199,210 parameters)."""

  def __init__(self, num_features: int = 784, num_classes: int = 10, hidden: int = 200, *,
               rngs: nnx.Rngs):
    for name, value in (("num_features", num_features), ("num_classes", num_classes),
                        ("hidden", hidden)):
      _check_size("mlp", name, value)
    dense = functools.partial(nnx.Linear, dot_general=linear_dot_general, rngs=rngs)
    self.fc1 = dense(num_features, hidden)
    self.fc2 = dense(hidden, hidden)
    self.out = dense(hidden, num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.out(x)


class CNN(nnx.Module):
  """The CNN of McMahan et al. 2017: two 5x5 convs (32, 64) each with 2x2 max pooling,
  a 512-unit dense layer, and the output layer (1,663,370 parameters for 28x28x1, 10 classes).

  Takes images (image_size, image_size, in_channels), channels last, or flat vectors of
  as many values."""

  # Two 2x2 poolings leave image_size // 4 rows: below 4, none (an empty dense layer).
  MIN_IMAGE_SIZE = 4

  def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    _check_size("cnn", "num_classes", num_classes)
    _check_size("cnn", "in_channels", in_channels)
    _check_size("cnn", "image_size", image_size, self.MIN_IMAGE_SIZE)
    self.conv1 = Conv(in_channels, 32, 5, impl=conv_impl, rngs=rngs)
    self.conv2 = Conv(32, 64, 5, impl=conv_impl, rngs=rngs)
    flat = (image_size // 4) ** 2 * 64
    self.fc = nnx.Linear(flat, 512, dot_general=linear_dot_general, rngs=rngs)
    self.out = nnx.Linear(512, num_classes, rngs=rngs)
    self.in_channels = in_channels
    self.image_size = image_size

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.image_size, self.image_size, self.in_channels)
    readable = {shape}
    if self.in_channels == 1:  # one channel, first or last, moves no pixel in the reshape
      readable.add((1, self.image_size, self.image_size))
    if x.ndim == 4 and tuple(x.shape[1:]) not in readable:
      # The reshape below would take any image of as many values, its pixels scrambled.
      got = tuple(x.shape[1:])
      note = ("channels first? transpose them to (height, width, channels), e.g. "
              "x.transpose(0, 2, 3, 1)" if sorted(got) == sorted(shape) and got[0] == shape[2]
              else f"images go (height, width, channels), or flat ({int(np.prod(shape))} "
                   f"values)")
      raise ModelInputError(shape, got, note)
    x = x.reshape(x.shape[0], *shape)
    x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
    x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return self.out(x)


class GRU(nnx.Module):
  """A gated recurrent unit layer (Cho et al. 2014) over `[batch, time, features]`.

  The input projections of all steps are one matmul before the `lax.scan`; inside
  it each step is `h @ U`, which under `vmap` over per-client weights is a batched
  matmul, so the layer batches like a dense one.
  """

  def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
    self.input = nnx.Linear(in_features, 3 * hidden, rngs=rngs)
    self.recurrent = nnx.Param(
        jax.nn.initializers.orthogonal(column_axis=-1)(rngs.params(), (hidden, 3 * hidden)))
    self.recurrent_bias = nnx.Param(jnp.zeros((3 * hidden,)))
    self.hidden = hidden

  def __call__(self, x: jax.Array) -> jax.Array:
    u, bias = self.recurrent[...], self.recurrent_bias[...]
    inputs = self.input(x).swapaxes(0, 1)  # [time, batch, 3 * hidden]

    def step(h, x_t):
      xz, xr, xn = jnp.split(x_t, 3, axis=-1)
      hz, hr, hn = jnp.split(h @ u + bias, 3, axis=-1)
      z, r = jax.nn.sigmoid(xz + hz), jax.nn.sigmoid(xr + hr)
      h = (1.0 - z) * jnp.tanh(xn + r * hn) + z * h
      return h, h

    h0 = jnp.zeros((x.shape[0], self.hidden), inputs.dtype)
    return jax.lax.scan(step, h0, inputs)[1].swapaxes(0, 1)


class CharRNN(nnx.Module):
  """Next-character model: embedding, GRU layers, per-position logits over the vocabulary.

  The shape of the Shakespeare model of McMahan et al. 2017 (an 8-dimensional
  embedding, then recurrent layers; theirs: two 256-unit LSTMs) with GRU cells.
  Inputs are token ids `[batch, time]`; outputs `[batch, time, vocab_size]`. The
  embedding is a one-hot matmul rather than a gather: its gradient is then a
  matmul too, not a scatter-add, which batches better over per-client weights.
  """

  def __init__(self, vocab_size: int, embed_dim: int = 8, hidden: int = 256,
               num_layers: int = 2, *, rngs: nnx.Rngs):
    for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                        ("hidden", hidden), ("num_layers", num_layers)):
      _check_size("char_rnn", name, value)
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (vocab_size, embed_dim)))
    sizes = [embed_dim] + [hidden] * num_layers
    self.layers = nnx.List([GRU(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(hidden, vocab_size, rngs=rngs)
    self.vocab_size = vocab_size

  @property
  def token_vocab_size(self) -> int:
    """Inputs are token ids in [0, this): `checks` refuses data with others."""
    return self.vocab_size

  def __call__(self, x: jax.Array) -> jax.Array:
    # Ids arrive as floats (from_clients stores float32; mixed precision casts to its
    # compute dtype): one_hot of floats is deprecated in jax.
    ids = x.astype(jnp.int32)
    h = jax.nn.one_hot(ids, self.vocab_size, dtype=self.embed[...].dtype) @ self.embed[...]
    for layer in self.layers:
      h = layer(h)
    return self.out(h)


def logistic_regression(num_features: int, num_classes: int, seed: int = 0) -> Model:
  return build(LogisticRegression, num_features, num_classes, seed=seed)


def mlp(num_features: int = 784, num_classes: int = 10, seed: int = 0) -> Model:
  return build(MLP, num_features, num_classes, seed=seed)


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, seed: int = 0,
        conv_impl: str = "auto") -> Model:
  return build(CNN, num_classes, in_channels, image_size, conv_impl=conv_impl, seed=seed)


def char_rnn(vocab_size: int, embed_dim: int = 8, hidden: int = 256, num_layers: int = 2,
             seed: int = 0) -> Model:
  return build(CharRNN, vocab_size, embed_dim, hidden, num_layers, seed=seed)
