"""'SAME' 2-D convolutions (NHWC inputs, HWIO kernels) that batch well over clients.

Per-client weights make every convolution of a round a convolution with a batch of
kernels. How that runs fastest depends on the backend (benchmarks/round_throughput.py):

- "patches": patches (im2col) then a matmul; under vmap a batched matmul. Fast on
  accelerators, memory-bound on CPU, where the patches are 25x the activations.
- "lax": `lax.conv_general_dilated` with XLA's own batching (a grouped convolution)
  and autodiff. Kept for comparison: on XLA:CPU (jaxlib 0.10) the kernel gradient it
  emits inside a `while` loop, i.e. inside the scan over local steps, has a layout
  that misses the fast convolution runtime (benchmarks/round_throughput.py, cnn_lax:
  the same FLOPs took 24.4 s in a scan and 1.2 s as separately jitted steps), and the
  grouped convolution of many clients is no faster.
- "sequential": the three convolutions of a training step (forward, input
  gradient, kernel gradient) written out in the canonical NHWC/HWIO layout by a
  custom VJP, so each one hits the fast runtime inside loops too; under vmap over
  clients they run one client after another (`lax.map`) instead of as a grouped
  convolution, while the rest of the model stays batched. On a 2-core CPU a round of
  ten clients took 0.98 s against the per-client loop's 1.21 s (cnn_seq; "lax": 12.9 s).
  A forward convolution of one input channel (a grayscale image's first layer) is
  instead the k*k shifted copies of the image times the kernel, a matmul that batches
  over clients: XLA:CPU's convolution contracts only k*k taps there, and took 1.6x as
  long (2.03 against 1.24 ms for the CNN's first layer, batch 20; 2.1x for ten clients;
  benchmarks/results/cnn_layers_cpu.md). With three input channels the convolution was
  2.2x the faster; two were in between (the convolution 1.1x faster for one client, the
  copies 1.4x for ten) and are left to the convolution until a round measures them.
- "auto": "sequential" on CPU, "patches" elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

IMPLS = ("auto", "patches", "lax", "sequential")
_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve(impl: str) -> str:
  """The implementation `impl` stands for on this process's default backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}: use one of {IMPLS}")
  if impl == "auto":
    return "sequential" if jax.default_backend() == "cpu" else "patches"
  return impl


def conv2d_same(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """Stride-1 'SAME' convolution of `x` [N, H, W, Cin] with `kernel` [k, k, Cin, Cout]
  (k odd)."""
  impl = resolve(impl)
  if impl == "lax":
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)
  if impl == "patches":
    kh, kw, cin, cout = kernel.shape
    patches = jax.lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "SAME",
                                                   dimension_numbers=_DIMS)
    # Patch features are ordered (in_channel, kh, kw); lay the kernel out to match.
    return patches @ kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
  if kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
    raise ValueError(f"the 'sequential' conv needs a square kernel of odd size, got "
                     f"{kernel.shape[:2]}")
  return _sequential_conv(x, kernel)


def _padded(x: jax.Array, kernel: jax.Array) -> jax.Array:
  p = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                      dimension_numbers=_DIMS)


@custom_batching.custom_vmap
def _forward(x, kernel):
  return _padded(x, kernel)


@_forward.def_vmap
def _forward_batched(axis_size, in_batched, x, kernel):
  x_batched, kernel_batched = in_batched
  if not kernel_batched:  # one kernel for every batch row: fold them into N
    y = _forward(x.reshape(-1, *x.shape[2:]), kernel)
    return y.reshape(axis_size, -1, *y.shape[1:]), True
  if not x_batched:
    x = jnp.broadcast_to(x, (axis_size, *x.shape))
  return jax.lax.map(lambda a: _forward(*a), (x, kernel)), True


@functools.cache
def _kernel_grad(size: int):
  """d(loss)/d(kernel) of a size x size kernel, as a canonical convolution: the input
  channels play the batch and the examples the features; the output [Cin, k, k, Cout]
  is transposed to HWIO."""

  @custom_batching.custom_vmap
  def kernel_grad(x, g):
    p = size // 2
    return jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), ((p, p), (p, p)),
        dimension_numbers=_DIMS).transpose(1, 2, 0, 3)

  @kernel_grad.def_vmap
  def batched(axis_size, in_batched, x, g):
    x, g = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip((x, g), in_batched))
    return jax.lax.map(lambda a: kernel_grad(*a), (x, g)), True

  return kernel_grad


def _shifted_copies(x: jax.Array, size: int) -> jax.Array:
  """[N, H, W, size * size * C]: every pixel's 'SAME'-padded size x size neighbourhood,
  ordered (row, column, channel) as an HWIO kernel's first three axes are.

  One gather with constant indices: as a concatenation of size * size slices XLA:CPU
  compiled each slice as its own kernel (24 kernels for a 5x5 kernel, 0.88 s of compile
  against 0.07 s) and ran 1.45x slower for ten clients (cnn_layers_cpu.md)."""
  p = size // 2
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).reshape(n, -1, c)
  rows = np.arange(h)[:, None, None, None] + np.arange(size)[None, None, :, None]
  cols = np.arange(w)[None, :, None, None] + np.arange(size)[None, None, None, :]
  index = jnp.asarray((rows * (w + 2 * p) + cols).reshape(-1), jnp.int32)
  return padded.at[:, index].get(mode="promise_in_bounds").reshape(n, h, w, size * size * c)


def _convolve(x, kernel):
  """The forward convolution: a matmul of shifted copies for one input channel, else
  the canonical convolution (one client at a time under vmap)."""
  if x.shape[-1] == 1:
    return _shifted_copies(x, kernel.shape[0]) @ kernel.reshape(-1, kernel.shape[-1])
  return _forward(x, kernel)


@jax.custom_vjp
def _sequential_conv(x, kernel):
  return _convolve(x, kernel)


def _sequential_fwd(x, kernel):
  return _convolve(x, kernel), (x, kernel)


def _sequential_bwd(residuals, g):
  x, kernel = residuals
  # The input gradient is the convolution of g with the flipped, transposed kernel.
  dx = _convolve(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  return dx, _kernel_grad(kernel.shape[0])(x, g)


_sequential_conv.defvjp(_sequential_fwd, _sequential_bwd)
