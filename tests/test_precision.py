"""No float32 dot of the simulator's own runs at an accelerator's default precision.

A default-precision float32 dot rounds its inputs on accelerators (to TensorFloat-32 on
recent NVIDIA GPUs, bfloat16 on TPUs), so a weighted mean or a geometric median written
as such a dot aggregated updates with 10 or 8 bits of mantissa there. CPU dots are
exact, so these tests read the jaxpr: with a model that has no dot of its own, every
dot in a round is the simulator's, and must be none or at full precision."""

import jax
import jax.numpy as jnp
import pytest

from fedjax_sim import aggregators, attacks, compression, models, privacy, robust
from fedjax_sim import secure_aggregation
from fedjax_sim.algorithms import features
from fedjax_sim.models import add_bias
from fedjax_sim.tree import weighted_sum

HIGHEST = jax.lax.Precision.HIGHEST


def dot_precisions(fn, *args):
  """The precision of every dot in `fn`'s jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            walk(getattr(sub, "jaxpr", sub))
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def default_precision_dots(fn, *args):
  return [p for p in dot_precisions(fn, *args) if p not in (HIGHEST, (HIGHEST, HIGHEST))]


def dot_free_model() -> models.Model:
  """features.tiny_mlp's parameters, applied by multiplies and sums."""
  tiny = features.tiny_mlp()

  def apply(params, x):
    dense = lambda x, layer: (x[..., :, None] * layer["w"]).sum(-2) + layer["b"]
    return dense(jax.nn.relu(dense(x, params["hidden"])), params["out"])
  return models.Model(apply, tiny.params)


def test_the_helpers_reductions():
  deltas = {"w": jnp.ones((3, 4, 5)), "b": jnp.ones((3, 5))}
  assert dot_precisions(weighted_sum, jnp.ones(3), deltas) == []  # multiplies and sums
  median = lambda d, w: robust.geometric_median().aggregate((), d, w, None, None)[0]
  assert default_precision_dots(median, deltas, jnp.ones(3)) == []
  # add_bias's bias gradient is a dot (see models.add_bias), at full precision.
  grad = jax.grad(lambda y, b: jnp.sum(add_bias(y, b) ** 2), argnums=1)
  precisions = dot_precisions(grad, jnp.ones((2, 4, 4, 3)), jnp.ones(3))
  assert precisions and default_precision_dots(grad, jnp.ones((2, 4, 4, 3)), jnp.ones(3)) == []


AGGREGATORS = {
    "DP mean": lambda: privacy.dp_mean(0.05, 1.0),
    "median": robust.coordinate_median,
    "trimmed mean": lambda: robust.trimmed_mean(num_trim=1),
    "multi-krum": lambda: robust.multi_krum(1),
    "geometric median": robust.geometric_median,
    "norm bound": lambda: aggregators.chain(robust.norm_bound(1.0), aggregators.mean()),
    "rotated 4-bit": lambda: aggregators.chain(compression.quantize(4, rotation=True),
                                               aggregators.mean()),
    "top-k": lambda: aggregators.chain(compression.top_k(fraction=0.5), aggregators.mean()),
    "secure mean": secure_aggregation.secure_mean,
    "sign flip": lambda: aggregators.chain(
        attacks.sign_flip(attacks.choose_malicious(16, count=2)), aggregators.mean()),
}


def round_dots(algorithm_name, **options):
  setup = features.default_setup()._replace(model=dot_free_model())
  algorithm = features.build(algorithm_name, setup=setup, **options)
  state = algorithm.init(setup.model.params, jax.random.key(0), setup.num_clients)
  return default_precision_dots(algorithm.round, state, setup.data)


def test_the_model_has_no_dot():  # else the tests below would see the model's
  model = dot_free_model()
  assert dot_precisions(jax.grad(lambda p: model.apply(p, jnp.ones((4, 5))).sum()),
                        model.params) == []


@pytest.mark.parametrize("name", features.ALGORITHMS)
def test_no_default_precision_dot_in_any_algorithms_round(name):
  assert round_dots(name) == []


@pytest.mark.parametrize("name", AGGREGATORS)
def test_no_default_precision_dot_in_any_aggregator(name):
  assert round_dots("fedavg", aggregator=AGGREGATORS[name]()) == []
