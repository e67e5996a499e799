"""LEAF's JSON format (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"),
read from a directory the user downloaded and preprocessed with LEAF's scripts.

LEAF writes `data/train/*.json` and `data/test/*.json`; each file holds
`{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}`.
The split is natural: one client per user (a FEMNIST writer, a Shakespeare speaking
role, a Sent140 Twitter account), with the user's train and test examples aligned.

- `femnist`: x float32 [n, 28, 28, 1] (LEAF's values, 1.0 is background), y 0..61.
- `shakespeare`: per-token next-character examples (see `datasets.text`).
- `sent140`: tweets as word ids [n, max_len] (0 padding, 1 unknown), y 0/1.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import NamedTuple

import numpy as np

from fedjax_sim.datasets import text as text_lib


class LeafData(NamedTuple):
  """Per-user arrays, users in sorted order; `test_*` aligned with `train_*`."""

  users: list[str]
  train_x: list[np.ndarray]
  train_y: list[np.ndarray]
  test_x: list[np.ndarray]
  test_y: list[np.ndarray]


def split_dirs(root: str) -> tuple[str, str]:
  """The train and test folders of a LEAF data set: `root/{train,test}` or
  `root/data/{train,test}`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"LEAF directory {root!r} does not exist")
  for base in (root, os.path.join(root, "data")):
    train, test = os.path.join(base, "train"), os.path.join(base, "test")
    if os.path.isdir(train) and os.path.isdir(test):
      return train, test
  raise FileNotFoundError(
      f"LEAF directory {root!r} has no train/ and test/ folders (nor data/train, data/test); "
      f"run LEAF's preprocess.sh and point at the data set's folder")


def read_json_dir(directory: str) -> dict[str, dict]:
  """Merges the `user_data` of every .json file in `directory` (files in sorted order)."""
  names = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
  if not names:
    raise FileNotFoundError(f"no LEAF .json files in {directory!r}")
  users: dict[str, dict] = {}
  for name in names:
    with open(os.path.join(directory, name)) as f:
      blob = json.load(f)
    if "user_data" not in blob:
      raise ValueError(f"{os.path.join(directory, name)} is not in LEAF's format: "
                       f"no 'user_data' key")
    for user, d in blob["user_data"].items():
      merged = users.setdefault(user, {"x": [], "y": []})
      merged["x"].extend(d["x"])
      merged["y"].extend(d["y"])
  return users


def read(root: str, convert) -> LeafData:
  """Reads a LEAF data set and converts each user's raw (x, y) lists with `convert`.

  Args:
    root: the data set's folder (holding train/ and test/, or data/train, data/test).
    convert: `(x_list, y_list) -> (x array, y array)`.

  Returns:
    LeafData of the users that have training examples.
  """
  train_dir, test_dir = split_dirs(root)
  train, test = read_json_dir(train_dir), read_json_dir(test_dir)
  users = sorted(u for u in train if train[u]["x"])
  out = LeafData(users, [], [], [], [])
  for user in users:
    for split, xs, ys in ((train, out.train_x, out.train_y), (test, out.test_x, out.test_y)):
      d = split.get(user, {"x": [], "y": []})
      x, y = convert(d["x"], d["y"])
      xs.append(x)
      ys.append(y)
  return out


def _femnist(xs, ys):
  x = np.asarray(xs, dtype=np.float32).reshape(-1, 28, 28, 1)
  return x, np.asarray(ys, dtype=np.int32)


def femnist(root: str) -> LeafData:
  """LEAF FEMNIST: handwritten characters of 62 classes, one client per writer."""
  return read(root, _femnist)


def shakespeare(root: str) -> LeafData:
  """LEAF Shakespeare: next-character examples per speaking role; vocabulary
  `text.SHAKESPEARE_CHARS` (`text.vocab_size()` ids)."""
  return read(root, lambda xs, ys: text_lib.leaf_shakespeare_examples(xs, ys))


def _words(tweet: str) -> list[str]:
  return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", tweet.lower())


def sent140(root: str, *, max_len: int = 25, vocab_size: int = 10000
            ) -> tuple[LeafData, list[str]]:
  """LEAF Sent140: tweets as word ids, sentiment 0 (negative) or 1 (positive).

  The vocabulary is the `vocab_size - 2` most frequent words of the training tweets;
  id 0 pads, id 1 is an unknown word; tweets are cut or padded to `max_len` words.

  Returns:
    (LeafData with x int32 [n, max_len] and y int32 [n], the vocabulary: id i + 2
    is word i).
  """
  train_dir, _ = split_dirs(root)
  frequency = collections.Counter(
      w for d in read_json_dir(train_dir).values() for x in d["x"] for w in _words(x[-1]))
  vocab = [w for w, _ in frequency.most_common(vocab_size - 2)]
  ids = {w: i + 2 for i, w in enumerate(vocab)}

  def convert(xs, ys):
    x = np.zeros((len(xs), max_len), np.int32)
    for i, fields in enumerate(xs):  # LEAF keeps [id, date, query, user, text]
      words = [ids.get(w, text_lib.UNKNOWN_ID) for w in _words(fields[-1])][:max_len]
      x[i, : len(words)] = words
    return x, np.asarray(ys, dtype=np.int32).reshape(-1)

  return read(root, convert), vocab
