"""The CNN's layers one by one: where a client's local step goes, and the formulations
fedjax_sim chose against the ones it replaced.

One process; every function jitted with fedjax_sim's compiler options, on one client's
batch of 20 (the peers' task) and, where marked, on ten clients under vmap (one kernel
per client, as in a round). Rows, medians of interleaved repetitions of 10 calls:

- pooling: 2x2 max pooling as a reshape and a `max` over the window axes (before c19a9e6)
  against `models.max_pool_2x2` (four strided slices), forward, and its gradient with
  the ReLU before it;
- first layer (28x28x1 -> 32, 5x5): Eigen's convolution (`conv._forward`) against the
  matmul of shifted copies (`conv._convolve`), the copies as one gather (kept) and as a
  concatenation of 25 slices (not kept: its kernels and compile time are counted too);
  the same two with two and three input channels (where `conv._convolve` keeps Eigen's);
- second layer (14x14x32 -> 64, 5x5): forward, input gradient and kernel gradient as the
  'sequential' VJP computes them;
- the dense layer (3136 -> 512): its input gradient as autodiff writes it, `g @ kernel.T`
  (what a plain `nnx.Linear` gives), against `models.linear_dot_general`'s `(kernel @ g.T).T`;
- the whole local step (loss, gradient, SGD update) of `models.cnn()`.

  python benchmarks/cnn_layers.py [--repeats 7] [--output PATH.json]

writes benchmarks/results/cnn_layers_<platform>.md and .json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import compile as compile_lib
from fedjax_sim import conv, models

BATCH, CLIENTS = 20, 10


@jax.custom_vjp
def reshape_pool(x):
  """max_pool_2x2 before c19a9e6: a reshape and a max, the same first-maximum gradient."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _reshape_pool_bwd(x, g):
  y = reshape_pool(x)
  b, h, w, c = x.shape
  tied = x.reshape(b, h // 2, 2, w // 2, 2, c) == y[:, :, None, :, None, :]
  t00, t01, t10, t11 = (tied[:, :, i, :, j] for i in (0, 1) for j in (0, 1))
  first = [t00, t01 & ~t00, t10 & ~(t00 | t01), t11 & ~(t00 | t01 | t10)]
  mask = jnp.stack([jnp.stack(first[:2], 3), jnp.stack(first[2:], 3)], 2)
  return (jnp.where(mask, g[:, :, None, :, None, :], 0).reshape(x.shape),)


reshape_pool.defvjp(lambda x: (reshape_pool(x), x), _reshape_pool_bwd)


def concatenated_copies(x, kernel):
  size, p = kernel.shape[0], kernel.shape[0] // 2
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  copies = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(size)
                            for j in range(size)], axis=3)
  return copies @ kernel.reshape(-1, kernel.shape[-1])


def relu_pool_grad(pool):
  return lambda x, g: jax.vjp(lambda x: pool(jax.nn.relu(x)), x)[1](g)[0]


def cases():
  key = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(key), shape)
  act1, act2 = normal(BATCH, 28, 28, 32), normal(BATCH, 14, 14, 32)
  image, kernel1 = normal(BATCH, 28, 28, 1), 0.2 * normal(5, 5, 1, 32)
  kernel2, grad2 = 0.05 * normal(5, 5, 32, 64), normal(BATCH, 14, 14, 64)
  image2, kernel12 = normal(BATCH, 28, 28, 2), 0.2 * normal(5, 5, 2, 32)
  image3, kernel13 = normal(BATCH, 32, 32, 3), 0.2 * normal(5, 5, 3, 32)
  copies = lambda x, k: conv._shifted_copies(x, 5) @ k.reshape(-1, k.shape[-1])
  model = models.cnn()
  y = jnp.arange(BATCH) % 10
  flat, kernel3 = normal(BATCH, 3136), 0.02 * normal(3136, 512)
  grad3 = normal(BATCH, 512)
  input_grad = lambda matmul: lambda x, k, g: jax.vjp(lambda x: matmul(x, k), x)[1](g)[0]

  def step(params, x):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean()
    return jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, params, jax.grad(loss)(params))

  flip = lambda k: jnp.flip(k, (0, 1)).swapaxes(2, 3)
  return {  # name: (function, arguments, also over ten clients)
      "pool 28x28x32: reshape and max (before)": (reshape_pool, (act1,), False),
      "pool 28x28x32: strided slices": (models.max_pool_2x2, (act1,), False),
      "relu + pool 28x28x32, gradient: reshape (before)":
          (relu_pool_grad(reshape_pool), (act1, act2), False),
      "relu + pool 28x28x32, gradient: strided slices":
          (relu_pool_grad(models.max_pool_2x2), (act1, act2), False),
      "first layer: convolution (before)": (conv._forward, (image, kernel1), True),
      "first layer: shifted copies, one gather": (conv._convolve, (image, kernel1), True),
      "first layer: shifted copies, 25 slices concatenated":
          (concatenated_copies, (image, kernel1), True),
      # Where the copies stop paying: conv._convolve takes them for one channel only.
      "first layer, 2 channels: convolution": (conv._forward, (image2, kernel12), True),
      "first layer, 2 channels: shifted copies": (copies, (image2, kernel12), True),
      "first layer, 3 channels, 32x32: convolution": (conv._forward, (image3, kernel13), True),
      "first layer, 3 channels, 32x32: shifted copies": (copies, (image3, kernel13), True),
      "second layer: forward": (conv._forward, (act2, kernel2), False),
      "second layer: input gradient": (lambda g, k: conv._forward(g, flip(k)),
                                       (grad2, kernel2), False),
      "second layer: kernel gradient": (conv._kernel_grad(5), (act2, grad2), False),
      "dense layer: input gradient, g @ kernel.T (before)":
          (input_grad(jnp.matmul), (flat, kernel3, grad3), True),
      "dense layer: input gradient, (kernel @ g.T).T":
          (input_grad(models._matmul), (flat, kernel3, grad3), True),
      "local step (loss, gradient, SGD update)": (step, (model.params, image), False),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--output", default=None, help="the .json to write (the .md beside it)")
  args = p.parse_args(argv)
  sys.path.insert(0, __file__.rsplit("/", 1)[0])
  import machine
  runs = {}  # (name, clients) -> [compiled, args, times, compile seconds, kernels]
  for name, (fn, fn_args, batched) in cases().items():
    for clients in (1, CLIENTS) if batched else (1,):
      if clients > 1:
        fn, fn_args = jax.vmap(fn), tuple(jnp.stack([a] * clients) for a in fn_args)
      lowered = jax.jit(fn).lower(*fn_args)
      start = time.process_time()
      compiled = lowered.compile(compiler_options=compile_lib.compiler_options())
      runs[name, clients] = [compiled, fn_args, [], time.process_time() - start,
                             compiled.as_text().count(" fusion(")]
  for _ in range(args.repeats):
    for run in runs.values():
      compiled, fn_args, times = run[:3]
      jax.block_until_ready(compiled(*fn_args))
      start = time.perf_counter()
      for _ in range(10):
        out = compiled(*fn_args)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - start) / 10)
  rows = [{"case": name, "clients": clients, "ms": statistics.median(run[2]) * 1e3,
           "compile_cpu_s": run[3], "fusions": run[4]} for (name, clients), run in runs.items()]
  dev = machine.device_info()
  info = machine.results_info(dev, "cnn_layers.py " + " ".join(argv or sys.argv[1:]),
                              repeats=args.repeats)
  lines = [f"# The CNN's layers one by one ({info['device']})", "",
           f"{info['when']}, commit {info['commit']}, jax {dev['jax_version']}: "
           f"`{info['command']}`. Batch {BATCH} a client; medians of {args.repeats} "
           "interleaved repetitions of 10 calls (benchmarks/cnn_layers.py says what each "
           "row runs). Compile: process CPU seconds; fusions: kernels XLA compiled.", "",
           "| case | clients | time | compile | fusions |", "| --- | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['case']} | {r['clients']} | {r['ms']:.2f} ms | {r['compile_cpu_s']:.2f} s "
            f"| {r['fusions']} |" for r in rows]
  machine.write_results(args.output, "cnn_layers", info, dev, rows, [], "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
