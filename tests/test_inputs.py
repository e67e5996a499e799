"""Bad input gets a clear error before anything compiles; a failing run keeps what it wrote."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.algorithms import fedavg


def test_more_clients_per_round_than_clients(ragged, small_mlp, count_compiles):
  _, _, train = ragged
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=7,
                     batch_size=4, epochs=1)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  before = count_compiles()
  with pytest.raises(ValueError, match="clients_per_round=7 but the data has only 6 clients"):
    fs.run(algorithm, state, train, rounds=2, progress=False)
  assert count_compiles() == before


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": -3}, "batch_size must be a positive integer"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"epochs": 1, "steps": 2}, "exactly one of epochs= or steps="),
    ({"clients_per_round": 0}, "clients_per_round must be a positive integer"),
    ({"weighting": "median"}, "weighting must be"),
    ({"client_chunk_size": 3}, "positive divisor of clients_per_round=4"),
    # True counts as 1 in Python: one client a round, one example a batch, silently.
    ({"clients_per_round": True}, "clients_per_round must be a positive integer, got True"),
    ({"batch_size": True}, "batch_size must be a positive integer, got True"),
    ({"epochs": True}, "epochs must be a positive integer, got True"),
])
def test_bad_algorithm_arguments(small_mlp, kwargs, match):
  args = dict(client_optimizer=optax.sgd(0.1), clients_per_round=4, batch_size=4)
  if "steps" not in kwargs:
    args["epochs"] = 1
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fedavg(small_mlp.apply, **args)


def test_numpy_integers_are_integers(ragged, small_mlp):
  # np.int64 (what a numpy computation of a count gives) was refused as "not a positive
  # integer, got np.int64(3)".
  _, _, train = ragged
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1),
                     clients_per_round=np.int64(3), batch_size=np.int32(4), epochs=np.int64(1))
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  _, history = fs.run(algorithm, state, train, rounds=np.int64(2), progress=False)
  assert [r["round"] for r in history] == [1, 2]
  with pytest.raises(ValueError, match="rounds must be a positive integer, got True"):
    fs.run(algorithm, state, train, rounds=True, progress=False)
  with pytest.raises(ValueError, match="max_examples must be a positive integer, got True"):
    fs.from_clients([np.ones((3, 2))], [np.zeros(3, np.int32)], max_examples=True)


def test_hyperparameters_set_later_are_checked_as_those_built_with(ragged, small_mlp):
  # client_lr went into the state without its check: set_hparams(client_lr=-1) trained
  # by gradient ascent.
  _, _, train = ragged
  algorithm = fs.build_algorithm("fedprox", small_mlp.apply, clients_per_round=2,
                                 batch_size=4, epochs=1, client_lr=0.1, mu=0.1)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  for name in ("client_lr", "server_lr"):
    with pytest.raises(ValueError, match=f"{name} must be positive, got -1.0"):
      fs.run(algorithm, fs.set_hparams(state, **{name: -1.0}), train, rounds=1,
             progress=False)
  with pytest.raises(ValueError, match=r"hyperparameters \['mu'\] are None"):
    fs.fedprox(small_mlp.apply, mu=None, client_optimizer=optax.sgd(0.1), clients_per_round=2,
               batch_size=4, epochs=1)


@pytest.mark.parametrize("key", [0, np.uint32(7), "seed"])
def test_init_takes_a_jax_key_only(small_mlp, key):
  # An int passed init and failed while tracing the first round, in the key derivations.
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=4, epochs=1)
  with pytest.raises(ValueError, match="fedavg.init: key must be one jax random key"):
    algorithm.init(small_mlp.params, key)
  # Raw keys are keys too: the legacy kind, of any implementation, as jax or numpy.
  for raw in (jax.random.PRNGKey(0), jax.random.PRNGKey(0, impl="rbg"),
              np.asarray(jax.random.PRNGKey(0))):
    algorithm.init(small_mlp.params, raw)


def test_the_loop_reference_checks_its_arguments_as_fedavg_does(ragged, small_mlp):
  _, _, train = ragged
  kw = dict(client_optimizer=optax.sgd(0.1), batch_size=4, epochs=1)
  with pytest.raises(ValueError, match="weighting must be 'examples' or 'uniform'"):
    fs.ReferenceFedAvg(small_mlp.apply, clients_per_round=2, weighting="Examples", **kw)
  with pytest.raises(ValueError, match="clients_per_round must be a positive integer"):
    fs.ReferenceFedAvg(small_mlp.apply, clients_per_round=0, **kw)
  reference = fs.ReferenceFedAvg(small_mlp.apply, clients_per_round=7, **kw)
  with pytest.raises(ValueError, match="clients_per_round=7 but the data has only 6 clients"):
    reference.round(reference.init(small_mlp.params, jax.random.key(0)), train)


@pytest.mark.parametrize("make", [
    lambda: fs.client_optimizer("sgd", 0.0),
    lambda: fs.client_optimizer("sgd", -0.1),
    lambda: fs.server_optimizer("fedadam", -1.0),
])
def test_non_positive_learning_rate(make):
  with pytest.raises(ValueError, match="learning rate must be a positive number"):
    make()


def test_unknown_optimizer_names():
  with pytest.raises(ValueError, match="unknown client optimizer 'rmsprop'"):
    fs.client_optimizer("rmsprop")
  with pytest.raises(ValueError, match="unknown server optimizer 'fedsgd'"):
    fs.server_optimizer("fedsgd")


def test_x_and_y_of_different_lengths():
  with pytest.raises(ValueError, match="client 1: x has 4 examples but y has 3"):
    fs.from_clients([np.zeros((2, 3)), np.zeros((4, 3))], [np.zeros(2, int), np.zeros(3, int)])


def test_client_with_no_examples():
  with pytest.raises(ValueError, match="client 0 has no examples"):
    fs.from_clients([np.zeros((0, 3)), np.zeros((4, 3))], [np.zeros(0, int), np.zeros(4, int)])


def test_labels_out_of_range_at_construction():
  with pytest.raises(ValueError, match=r"client 1: labels must lie in \[0, 3\), found 0..3"):
    fs.from_clients([np.zeros((2, 3)), np.zeros((2, 3))], [np.array([0, 1]), np.array([0, 3])],
                    num_classes=3)


def test_labels_out_of_range_for_the_model(small_mlp, count_compiles):
  # The data were built without num_classes; the model has 3 outputs.
  train = fs.from_clients([np.zeros((2, 5)), np.zeros((2, 5))], [np.array([0, 1]), np.array([5, 0])])
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=2, epochs=1)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  before = count_compiles()
  with pytest.raises(ValueError, match=r"the model has 3 outputs but the data's labels go up to "
                                       r"5 \(client 1's\)"):
    fs.run(algorithm, state, train, rounds=1, progress=False)
  assert count_compiles() == before


def test_nan_features_of_ml_dtypes_and_stacked_clients():
  # numpy's issubdtype does not count bfloat16 as inexact: its NaN passed the check.
  for dtype in (jnp.bfloat16, jnp.float16):
    x = np.array([[0.0, 1.0], [np.nan, 1.0]], dtype)
    with pytest.raises(ValueError, match="client 0's features contain NaN \\(example 1"):
      fs.from_clients([x], [np.zeros(2, int)])
  # One array of equal clients [C, n, ...] is a sequence of clients, as in split_clients.
  data = fs.from_clients(np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.int32))
  assert data.x.shape == (4, 5, 3) and list(data.counts) == [5] * 4


def test_values_past_what_they_are_stored_as_are_refused():
  # int64 labels are stored as int32 (2**32 + 1 wrapped to 1); float64 features as
  # float32 (1e300 became inf, past the NaN/inf check).
  with pytest.raises(ValueError, match="client 0's labels go from 0 to 4294967297, beyond "
                                       "what they are stored as \\(int32"):
    fs.from_clients([np.zeros((2, 3))], [np.array([0, 2**32 + 1])])
  with pytest.raises(ValueError, match="client 0's features go from 0 to 1e\\+300"):
    fs.from_clients([np.array([[0.0], [1e300]])], [np.zeros(2, int)])
  # At the edge: float32's largest finite value and int32's largest label are kept.
  top = float(np.finfo(np.float32).max)
  data = fs.from_clients([np.array([[top]])], [np.array([2**31 - 1])])
  assert float(data.x[0, 0, 0]) == top and int(data.y[0, 0]) == 2**31 - 1


def test_hand_built_data_with_bad_counts_or_float_labels_is_refused(small_mlp, count_compiles):
  good = fs.from_clients([np.zeros((4, 5)), np.zeros((2, 5))], [np.zeros(4, int), np.zeros(2, int)])
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=2, epochs=1)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  with_counts = lambda c: good._replace(counts=jax.device_put(np.asarray(c)), count_range=None)
  float_labels = good._replace(y=jax.device_put(np.zeros(good.y.shape, np.float32)))
  evaluate = fs.make_evaluator(small_mlp.apply, test=(np.zeros((3, 5)), np.zeros(3, np.float32)))
  before = count_compiles()
  algorithm.validate(state, with_counts(np.int32([4, 4])))  # every client's 4 slots: allowed
  # A count past the 4 slots trained slot 0 again; a negative one skewed the weights.
  for counts, match in (([5, 2], "client 0's is 5"), ([4, -1], "client 1's is -1")):
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\] \(the padded slots "
                                         r"per client\); " + match):
      algorithm.validate(state, with_counts(np.int32(counts)))
  with pytest.raises(ValueError, match="counts must be integers, one per client"):
    algorithm.validate(state, with_counts(np.float32([4, 2])))
  with pytest.raises(ValueError, match="the data's labels must be integers \\(class indices\\), "
                                       "got float32"):
    algorithm.validate(state, float_labels)
  with pytest.raises(ValueError, match="the test set's labels must be integers"):
    evaluate.check(small_mlp.params)
  assert count_compiles() == before


def test_evaluation_with_no_test_example_is_refused():
  empty = fs.from_clients([np.zeros((0, 5))] * 2, [np.zeros(0, int)] * 2, allow_empty=True)
  with pytest.raises(ValueError, match="the client test splits hold no example"):
    fs.make_evaluator(lambda p, x: x, client_test=empty)
  # 20% of clients of 1-2 examples is no test example at all.
  with pytest.raises(ValueError, match="no client keeps a test example: 0.2 of clients of 1 "
                                       "to 2 examples rounds to none; use fewer clients"):
    fs.tasks.load_task("digits", num_clients=1000)
  with pytest.raises(ValueError, match="got inputs for 3 clients but labels for 2"):
    fs.split_clients([np.zeros((3, 2))] * 3, [np.zeros(3, int)] * 2, 0.2)
  with pytest.raises(ValueError, match="client 0: x has 5 examples but y has 7"):
    fs.split_clients([np.zeros((5, 2))], [np.zeros(7, int)], 0.2)


def test_mismatched_feature_shapes():
  with pytest.raises(ValueError, match="client 1: inputs of shape"):
    fs.from_clients([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros(2, int), np.zeros(2, int)])


def test_non_finite_loss_stops_with_round_and_keeps_earlier_rounds(tmp_path):
  # w grows by 0.1 per round (one SGD step on loss -w); the loss is NaN once w > 0.25,
  # i.e. from round 4 (which starts at w = 0.3).
  apply = lambda params, x: params["w"] * x[:, 0]
  def loss(params, x, y):
    w = params["w"]
    return -w * x[:, 0] + jnp.where(w > 0.25, jnp.nan, 0.0)
  train = fs.from_clients([np.ones((1, 1))], [np.zeros(1, int)])
  algorithm = fedavg(apply, loss=loss, client_optimizer=optax.sgd(0.1), clients_per_round=1,
                     batch_size=1, steps=1)
  state = algorithm.init({"w": jnp.zeros(())}, jax.random.key(0))
  metrics_path, summary_path = tmp_path / "metrics.jsonl", tmp_path / "summary.json"
  with pytest.raises(FloatingPointError, match="at round 4"):
    fs.run(algorithm, state, train, rounds=10, rounds_per_chunk=2, metrics_path=metrics_path,
           summary_path=summary_path, progress=False)
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["train_loss"]) for r in rows)
  summary = json.loads(summary_path.read_text())
  assert summary["rounds"] == 3 and "round 4" in summary["status"]


def test_run_does_not_consume_the_callers_state(ragged, small_mlp):
  _, _, train = ragged
  algorithm = fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                     batch_size=4, steps=1)
  state = algorithm.init(small_mlp.params, jax.random.key(0))
  fs.run(algorithm, state, train, rounds=1, progress=False)
  # Donation inside the run must not have deleted the caller's (or the model's) arrays.
  assert np.isfinite(np.asarray(jax.tree_util.tree_leaves(state.params)[0])).all()
  assert np.isfinite(np.asarray(jax.tree_util.tree_leaves(small_mlp.params)[0])).all()
