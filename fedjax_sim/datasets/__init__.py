"""Loaders of real data: offline (shipped in packages), TFDS, LEAF, and text utilities.

Each loader returns host numpy arrays; `fedjax_sim.partition` splits centralized
arrays into clients and `fedjax_sim.from_clients` puts them on the device. Optional
dependencies (scikit-learn, mlxtend, tensorflow-datasets) are imported only when a
loader that needs them is called.
"""

from fedjax_sim.datasets import leaf, offline, text, tfds
from fedjax_sim.datasets.offline import load_digits, load_mnist5k

OFFLINE = {"digits": load_digits, "mnist5k": load_mnist5k}


def load_offline(name: str):
  """(x, y) of an offline data set by name: 'digits' or 'mnist5k'."""
  if name not in OFFLINE:
    raise ValueError(f"unknown offline dataset {name!r}; choose from {sorted(OFFLINE)}")
  return OFFLINE[name]()


__all__ = ["OFFLINE", "leaf", "load_digits", "load_mnist5k", "load_offline", "offline", "text",
           "tfds"]
