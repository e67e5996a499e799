"""client_chunk_size="auto" and local epochs that stop at the clients' own step counts."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim import cli, local, models
from fedjax_sim.algorithms import base, fedavg


def params_of_bytes(num_bytes):
  return {"w": jax.ShapeDtypeStruct((num_bytes // 4,), jnp.float32)}


@pytest.mark.parametrize("num_bytes, clients, want", [
    (796_840, 100, 10),    # the 2NN MLP: 8 MiB holds 10 of them
    (796_840, 7, 7),       # all 7 fit
    (796_840, 13, 1),      # 13 is prime and above 10: one at a time
    (31_400, 1000, 10),    # logistic regression: capped at CPU_MAX_CHUNK
    (6_653_480, 100, 1),   # the CNN: one model is most of the 8 MiB
    (3_000_000, 10, 2),    # two fit, and 2 divides 10
    (3_000_000, 9, 1),     # two fit, but 2 does not divide 9
])
def test_auto_chunk_size_on_cpu(num_bytes, clients, want):
  assert jax.default_backend() == "cpu"
  assert base.resolve_chunk_size("auto", clients, params_of_bytes(num_bytes)) == want


def test_explicit_chunk_sizes_pass_through():
  params = params_of_bytes(400)
  assert base.resolve_chunk_size(None, 100, params) is None
  assert base.resolve_chunk_size(25, 100, params) == 25


@pytest.mark.parametrize("bad", ["all", 0, -2, 2.0, True])
def test_bad_chunk_size_is_named(small_mlp, bad):
  with pytest.raises(ValueError, match="client_chunk_size"):
    fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=4,
           batch_size=4, steps=1, client_chunk_size=bad)


def test_cli_chunk_size_argument():
  assert cli.chunk_size_arg("auto") == "auto"
  assert cli.chunk_size_arg("all") is None
  assert cli.chunk_size_arg("5") == 5
  for bad in ("0", "-1", "two"):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
      cli.chunk_size_arg(bad)
  assert cli.build_parser().parse_args(["run"]).client_chunk_size == "auto"


def test_auto_round_equals_all_at_once(ragged, small_mlp, monkeypatch):
  """The default ("auto": chunks on this CPU) trains exactly what one vmap trains."""
  _, _, train = ragged
  # Room for two of these small models per chunk, so "auto" really splits the 4 clients.
  monkeypatch.setattr(base, "CPU_CHUNK_BYTES", 2 * base.model_bytes(small_mlp.params))
  assert base.resolve_chunk_size("auto", 4, small_mlp.params) == 2
  kwargs = dict(client_optimizer=optax.sgd(0.1), clients_per_round=4, batch_size=4, epochs=2)
  key = jax.random.key(0)
  auto = fedavg(small_mlp.apply, **kwargs)
  at_once = fedavg(small_mlp.apply, client_chunk_size=None, **kwargs)
  split = fedavg(small_mlp.apply, client_chunk_size=1, **kwargs)
  states = [jax.jit(a.round)(a.init(small_mlp.params, key), train)[0]
            for a in (auto, at_once, split)]
  for state in states[1:]:
    for got, want in zip(jax.tree_util.tree_leaves(state.params),
                         jax.tree_util.tree_leaves(states[0].params)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [2, None])
def test_a_round_traces_local_training_once(ragged, small_mlp, chunk):
  """Chunks or not, the model is traced once per local step body: the chunked round's
  accumulator takes its shapes from upload_like, not from a second trace."""
  _, _, train = ragged
  calls = []

  def apply(params, x):
    calls.append(1)
    return small_mlp.apply(params, x)

  algorithm = fedavg(apply, client_optimizer=optax.sgd(0.1), clients_per_round=4,
                     batch_size=4, epochs=2, client_chunk_size=chunk)
  jax.make_jaxpr(algorithm.round)(algorithm.init(small_mlp.params, jax.random.key(0)), train)
  assert len(calls) == 1


def test_epoch_loop_runs_only_the_steps_clients_need():
  """A client trained alone takes its own ceil(n / B) steps per epoch, not the padded
  count; clients trained together take as many as the largest of them."""
  model = models.logistic_regression(num_features=2, num_classes=2)
  calls = []

  def loss(params, x, y):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.sum((model.apply(params, x) - y[:, None]) ** 2, axis=-1)

  update = local.make_local_update(loss, optax.sgd(0.1), batch_size=5, epochs=2)
  x, y = jnp.ones((100, 2)), jnp.ones((100,))  # 100 padded slots: 20 batches
  key = jax.random.key(0)
  result = jax.jit(update)(model.params, x, y, jnp.int32(7), key)
  jax.effects_barrier()
  assert len(calls) == 4 and int(result.num_steps) == 4  # 2 epochs x ceil(7 / 5)

  calls.clear()
  stacked = lambda a: jnp.stack([a, a])
  params = jax.tree_util.tree_map(stacked, model.params)
  result = jax.jit(jax.vmap(update))(params, stacked(x), stacked(y), jnp.array([7, 12]),
                                     jax.random.split(key))
  jax.effects_barrier()
  # One callback per step for the whole batch: 2 epochs x ceil(12 / 5) = 6, not 2 x 20.
  assert len(calls) == 6
  np.testing.assert_array_equal(result.num_steps, [4, 6])


def test_one_client_runs_without_a_vmap_of_size_one():
  """vmap_clients and map_clients(chunk_size=1) give vmap's results, but one client's
  ops have no batch dimension of 1 (XLA:CPU transposed and copied the CNN's dense
  gradient every step under it)."""
  rng = np.random.default_rng(0)
  args = {"x": jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32),
          "w": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)}
  fn = lambda a: jnp.tanh(a["x"] @ a["w"])
  want = jax.vmap(fn)(args)
  for chunk_size in (1, 3, None):
    np.testing.assert_allclose(base.map_clients(fn, args, chunk_size), want, rtol=1e-6)
  first = jax.tree_util.tree_map(lambda a: a[:1], args)
  np.testing.assert_allclose(base.vmap_clients(fn, first), want[:1], rtol=1e-6)
  batched_dot = "f32[1,4,5] = dot_general"
  assert batched_dot in str(jax.make_jaxpr(jax.vmap(fn))(first))
  assert batched_dot not in str(jax.make_jaxpr(lambda a: base.vmap_clients(fn, a))(first))
  assert "dot_general" in str(jax.make_jaxpr(lambda a: base.map_clients(fn, a, 1))(args))
  assert batched_dot not in str(jax.make_jaxpr(lambda a: base.map_clients(fn, a, 1))(args))
