"""Image classification data sets from TensorFlow Datasets (optional extra `tfds`).

Without TensorFlow, examples are read through `tfds.data_source` (random access
to ArrayRecord files, no TensorFlow needed); where TensorFlow is installed (Colab),
through `tfds.load(..., batch_size=-1)`. The first call downloads and prepares the
data set into `data_dir` (default ~/tensorflow_datasets); later calls read it there.

Any partitioner in `fedjax_sim.partition` then splits the arrays into clients.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

# name -> number of classes (EMNIST's default config is 'byclass': 62 classes).
DATASETS = {"mnist": 10, "fashion_mnist": 10, "emnist": 62, "cifar10": 10, "cifar100": 100}
_EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 37, "digits": 10,
                   "mnist": 10}


def num_classes(name: str) -> int:
  """Classes of a supported data set, e.g. 'mnist' or 'emnist/letters'."""
  base, _, config = name.partition("/")
  if base not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)} "
                     f"(EMNIST configs as 'emnist/<config>')")
  if base == "emnist" and config:
    if config not in _EMNIST_CLASSES:
      raise ValueError(f"unknown EMNIST config {config!r}; choose from {sorted(_EMNIST_CLASSES)}")
    return _EMNIST_CLASSES[config]
  if config:
    raise ValueError(f"dataset {base!r} has no config {config!r}")
  return DATASETS[base]


def to_arrays(images, labels) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [n, h, w, c] and integer labels as float32 in [0, 1] and int32."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:  # a data set without a channel axis
    images = images[..., None]
  return (images.astype(np.float32) / 255.0), labels.astype(np.int32)


# How to prepare a data set for an offline machine.
PREPARE = ("on a machine with a network (or in Colab): pip install 'fedjax_sim[tfds]', then "
           "python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
           "split='train')\" (prepares array_record files, readable without TensorFlow, in "
           "~/tensorflow_datasets); copy the folder ~/tensorflow_datasets/{base} into {root} "
           "on this machine")


def _root(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      os.path.join("~", "tensorflow_datasets"))


def _not_prepared(name: str, data_dir: str | None, reason: str) -> str:
  root = _root(data_dir)
  return (f"TFDS {name!r}: prepared data not found in DATA_DIR {root} (--data-dir, default "
          f"~/tensorflow_datasets) {reason}. To prepare it: "
          + PREPARE.format(name=name, base=name.partition("/")[0], root=root))


def _backend(backend: str) -> str:
  if backend == "auto":
    return "load" if importlib.util.find_spec("tensorflow") is not None else "data_source"
  if backend not in ("load", "data_source"):
    raise ValueError(f"backend must be 'auto', 'load' or 'data_source', got {backend!r}")
  return backend


def load(name: str, split: str = "train", *, data_dir: str | None = None,
         backend: str = "auto", download: bool = True, label_key: str = "label",
         ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of a TFDS image data set as host arrays.

  Args:
    name: one of `DATASETS` ('mnist', 'fashion_mnist', 'emnist', 'cifar10',
      'cifar100'), or 'emnist/<config>'.
    split: a TFDS split ('train', 'test', 'train[:10%]', ...).
    data_dir: where TFDS keeps prepared data.
    backend: 'data_source' (no TensorFlow), 'load' (needs TensorFlow) or 'auto'
      ('load' where TensorFlow is installed).
    download: download and prepare the data set if it is not in data_dir.
    label_key: the feature to use as label (CIFAR-100 also has 'coarse_label').

  Returns:
    x float32 [n, h, w, c] in [0, 1], y int32 [n].
  """
  num_classes(name)  # rejects unknown names before importing anything
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS data sets need tensorflow-datasets: "
                      "pip install 'fedjax_sim[tfds]'") from e
  backend = _backend(backend)
  # The real builder: is the data set prepared in data_dir? (Preparing it needs a network.)
  prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  if not prepared and not download:
    raise FileNotFoundError(_not_prepared(name, data_dir, "(download=False)"))
  try:
    if backend == "load":
      data = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1,
                                     download=download))
      return to_arrays(data["image"], data[label_key])
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except NotImplementedError as e:  # prepared as TFRecord, which needs TensorFlow to read
    raise ValueError(f"{name} in {_root(data_dir)} was prepared in a format that needs "
                     f"TensorFlow to read ({str(e).splitlines()[0]}): pip install tensorflow, "
                     f"or prepare it again with array_record files (see "
                     f"fedjax_sim.datasets.tfds.PREPARE)") from None
  except Exception as e:  # pylint: disable=broad-except
    if prepared or isinstance(e, ImportError):
      raise
    raise FileNotFoundError(_not_prepared(
        name, data_dir, f"and preparing it failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]})")) from e
  if len(source) == 0:
    raise ValueError(f"{name} split {split!r} has no examples")
  images, labels = [], []
  for i in range(len(source)):
    example = source[i]
    images.append(example["image"])
    labels.append(example[label_key])
  return to_arrays(np.stack(images), np.array(labels))
