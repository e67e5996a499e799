"""Issue 15 item 5: a model that does not fit its data, and non-finite inputs, are refused on
the host before anything compiles, with a message naming both sides (not a flax
`dot_general` error, nor "Try a smaller learning rate" at round 1)."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import checks, cli, tasks

RNG = np.random.default_rng(0)
XS = [RNG.normal(size=(4, 6)).astype(np.float32) for _ in range(4)]
YS = [RNG.integers(0, 3, 4).astype(np.int32) for _ in range(4)]
YS[2][1] = 4  # labels 0..4: a model needs 5 outputs


@pytest.fixture(scope="module")
def models():
  return {"six": fs.mlp(6, 5, seed=0), "five": fs.mlp(5, 5, seed=0),
          "three_outputs": fs.mlp(6, 3, seed=0)}


def algorithm(model, name="fedavg"):
  return fs.build_algorithm(name, model.apply, client_lr=0.1, clients_per_round=2,
                            batch_size=2, steps=1, num_clients=4)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedbuff"])
def test_input_shape_mismatch_names_both_shapes(models, name, count_compiles):
  data, model = fs.from_clients(XS, YS), models["five"]
  if name == "fedbuff":
    alg = fs.fedbuff(model.apply, client_optimizer=optax.sgd(0.1), batch_size=2, steps=1,
                     profiles=fs.systems.sample_profiles(4, seed=0), concurrency=2,
                     buffer_size=1)
  else:
    alg = algorithm(model, name)
  state = alg.init(model.params, jax.random.key(0), 4)
  before = count_compiles()
  with pytest.raises(ValueError, match=r"^the model expects inputs of shape \(5,\) but the "
                                       r"data's examples have shape \(6,\)$"):
    fs.run(alg, state, data, rounds=1, progress=False)
  assert count_compiles() == before


def test_image_model_names_the_shape_it_reshapes_to():
  with pytest.raises(ValueError, match=r"the model expects inputs of shape \(8, 8, 1\) \(64 "
                                       r"values\) but the data's examples have shape \(8, 8, 3\)"):
    checks.model_output(fs.cnn(3, image_size=8).apply, fs.cnn(3, image_size=8).params,
                        (8, 8, 3), np.float32, "the data's examples")


def test_test_set_of_another_shape_is_refused_before_training(models, count_compiles):
  data = fs.from_clients(XS, YS)
  evaluate = fs.make_evaluator(models["six"].apply,
                               test=(np.zeros((3, 5), np.float32), np.zeros(3, np.int32)))
  alg = algorithm(models["six"])
  state = alg.init(models["six"].params, jax.random.key(0), 4)
  before = count_compiles()
  with pytest.raises(ValueError, match=r"expects inputs of shape \(6,\) but the test set's "
                                       r"examples have shape \(5,\)"):
    fs.run(alg, state, data, rounds=1, evaluate=evaluate, progress=False)
  assert count_compiles() == before


def test_fewer_outputs_than_classes_names_both(models, count_compiles):
  data, model = fs.from_clients(XS, YS), models["three_outputs"]
  alg = algorithm(model)
  state = alg.init(model.params, jax.random.key(0), 4)
  # (Building the central evaluator puts its padded batches on the device: compiles.)
  evaluate = fs.make_evaluator(model.apply, test=(XS[0], np.array([0, 1, 2, 7], np.int32)))
  before = count_compiles()
  with pytest.raises(ValueError, match=r"the model has 3 outputs but the data's labels go up to 4 "
                                       r"\(client 2's\): build the model for at least 5 classes"):
    fs.run(alg, state, data, rounds=1, progress=False)
  # The central test set and per-client test splits, through the evaluators.
  ok = fs.from_clients(XS, [np.minimum(y, 2) for y in YS])
  with pytest.raises(ValueError, match="the model has 3 outputs but the test set's labels go up "
                                       "to 7"):
    fs.run(alg, state, ok, rounds=1, evaluate=evaluate, progress=False)
  personal = fs.make_personalized_evaluator(model.apply, data)
  stacked = jax.tree_util.tree_map(lambda a: np.stack([a] * 4), model.params)
  with pytest.raises(ValueError, match="the model has 3 outputs but the client test splits' "
                                       r"labels go up to 4 \(client 2's\)"):
    personal(stacked)
  assert count_compiles() == before


def test_non_finite_features_are_named_by_client(models, count_compiles):
  bad = [x.copy() for x in XS]
  bad[3][2, 1] = np.nan
  with pytest.raises(ValueError, match=r"client 3's features contain NaN \(example 2"):
    fs.from_clients(bad, YS)
  # Data built directly (not through from_clients) are checked by validate.
  data = fs.from_clients(XS, [np.minimum(y, 2) for y in YS])
  x = np.array(data.x)
  x[1, 0, 4] = np.inf
  alg = algorithm(models["six"])
  state = alg.init(models["six"].params, jax.random.key(0), 4)
  before = count_compiles()
  with pytest.raises(ValueError, match=r"client 1's features contain inf \(example 0\)"):
    fs.run(alg, state, data._replace(x=x), rounds=1, progress=False)
  # Test data: the central test set and per-client test splits.
  test_x = np.zeros((3, 6), np.float32)
  test_x[1, 0] = np.nan
  with pytest.raises(ValueError, match=r"the test set's features contain NaN \(example 1"):
    fs.make_evaluator(models["six"].apply, test=(test_x, np.zeros(3, np.int32)))
  with pytest.raises(ValueError, match="the client test splits: client 1's features contain inf"):
    fs.make_evaluator(models["six"].apply, client_test=data._replace(x=x))
  assert count_compiles() == before


@pytest.mark.parametrize("block", [1, 48, 1 << 20])
def test_non_finite_features_are_found_in_any_block_of_clients(monkeypatch, block):
  """The host check goes through the clients a block at a time (checks._FINITE_BLOCK
  elements): a NaN in the last client, in a block of its own or not, is still named."""
  from fedjax_sim import checks
  monkeypatch.setattr(checks, "_FINITE_BLOCK", block)
  data = fs.from_clients(XS, YS)
  checks.check_finite_features(data)
  x = np.array(data.x)
  x[-1, 1, 0] = np.nan
  with pytest.raises(ValueError, match=rf"client {len(XS) - 1}'s features contain NaN "
                                       r"\(example 1\); 1 client"):
    checks.check_finite_features(data._replace(x=x))


def test_non_finite_parameters_are_refused(models):
  data = fs.from_clients(XS, [np.minimum(y, 2) for y in YS])
  params = jax.tree_util.tree_map(lambda a: np.array(a), models["six"].params)
  leaf = jax.tree_util.tree_leaves(params)[0]
  leaf.reshape(-1)[0] = np.nan
  alg = algorithm(models["six"])
  with pytest.raises(ValueError, match="the state's model parameters contain NaN"):
    fs.run(alg, alg.init(params, jax.random.key(0), 4), data, rounds=1, progress=False)


def test_cli_reports_a_model_that_does_not_fit_the_task(monkeypatch, capsys, tmp_path):
  def mismatched(seed: int = 0):
    train = fs.from_clients(XS, [np.minimum(y, 2) for y in YS])
    return tasks.Task(train, (np.zeros((2, 6), np.float32), np.zeros(2, np.int32)), None, 3,
                      lambda name, seed: fs.mlp(5, 3, seed), "mlp")
  monkeypatch.setitem(tasks._TASKS, "mismatched", mismatched)
  code = cli.main(["run", "--task", "mismatched", "--rounds", "1", "--clients-per-round", "2",
                   "--no-progress", "--output", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2
  assert "the model expects inputs of shape (5,) but the data's examples have shape (6,)" in err


def test_cnn_refuses_channels_first_images_and_takes_flat_vectors(count_compiles):
  # A reshape to (8, 8, 3) took (3, 8, 8) images too, their pixels scrambled.
  model = fs.cnn(2, in_channels=3, image_size=8, conv_impl="lax")
  first = [RNG.normal(size=(4, 3, 8, 8)).astype(np.float32) for _ in range(4)]
  ys = [np.zeros(4, np.int32)] * 4
  alg = algorithm(model)
  state = alg.init(model.params, jax.random.key(0), 4)
  before = count_compiles()
  with pytest.raises(ValueError, match=r"^the model expects inputs of shape \(8, 8, 3\) \(192 "
                                       r"values\) but the data's examples have shape \(3, 8, 8\): "
                                       r"channels first\? transpose them"):
    fs.run(alg, state, fs.from_clients(first, ys), rounds=1, progress=False)
  assert count_compiles() == before
  for shape in [(8, 8, 3), (192,)]:
    assert checks.model_output(model.apply, model.params, shape, np.float32, "x").shape == (1, 2)
  # One channel first is read right (the reshape moves no pixel): not refused.
  gray = fs.cnn(2, in_channels=1, image_size=8, conv_impl="lax")
  x = RNG.normal(size=(2, 8, 8)).astype(np.float32)
  np.testing.assert_array_equal(gray.apply(gray.params, x[:, None]),
                                gray.apply(gray.params, x[..., None]))
  with pytest.raises(ValueError, match=r"shape \(8, 8, 3\) \(192 values\) but the test set's "
                                       r"examples have shape \(8, 4, 6\): images go"):
    checks.model_output(model.apply, model.params, (8, 4, 6), np.float32,
                        "the test set's examples")


def test_token_ids_outside_the_vocabulary_are_refused(count_compiles):
  # one_hot made an id >= vocab_size, negative or fractional a zero vector: trained on nothing.
  model = fs.char_rnn(vocab_size=5, hidden=8, num_layers=1)
  ys = [np.zeros((3, 4), np.int32)] * 2

  def data(token):
    xs = [np.ones((3, 4)), np.ones((3, 4))]
    xs[1][2, 3] = token
    return fs.from_clients(xs, ys)  # stored as float32, from_clients' default

  checks.check_labels(model.apply, model.params, data(4))  # whole floats below 5 are ids
  alg = algorithm(model)
  state = alg.init(model.params, jax.random.key(0), 2)
  before = count_compiles()
  with pytest.raises(ValueError, match=r"^the model reads token ids in \[0, 5\) \(vocab_size 5\) "
                                       r"but the data's token ids go up to 49 \(client 1's\): "
                                       r"build the model for at least 50 tokens"):
    fs.run(alg, state, data(49), rounds=1, progress=False)
  assert count_compiles() == before
  for token, match in [(-1, r"go down to -1 \(client 1's\)$"),
                       (2.5, r"hold 2.5 \(client 1's\), not a whole number")]:
    with pytest.raises(ValueError, match=match):
      checks.check_labels(model.apply, model.params, data(token))
  mixed = fs.models.mixed_precision(model)
  with pytest.raises(ValueError, match="go up to 5"):
    checks.check_labels(mixed.apply, mixed.params, data(5), "the client test splits")
  # Past a client's count the slots are padding, not ids.
  padded = data(0)._replace(x=np.asarray(data(0).x).copy())
  padded.x[0, 2, 0] = 99
  checks.check_labels(model.apply, model.params, padded._replace(counts=np.array([2, 3])))
