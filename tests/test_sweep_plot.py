"""Issue 15 item 8: a sweep plot of many configurations gives each its own colour, each seed
its own line style, and a legend of configurations and seeds."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def result(num_configs, seeds=(0, 1), rounds=3):
  rows = [{"client_lr": 0.01 * (c + 1), "seed": s, "final_train_loss": 1.0, "diverged": False,
           "diverged_round": None} for c in range(num_configs) for s in seeds]
  curves = {"train_loss": np.arange(len(rows) * rounds, dtype=float).reshape(len(rows), rounds)}
  return fs.SweepResult(rows, curves, np.array([]), {}, [None] * len(rows), [0.0])


@pytest.mark.parametrize("num_configs", [18, 25])
def test_one_colour_per_configuration_one_style_per_seed(num_configs):
  sweep = result(num_configs)
  ax = Figure().subplots()
  sweep.plot("train_loss", ax=ax)
  lines = ax.get_lines()
  assert len(lines) == 2 * num_configs
  colour = {}
  for row, line in zip(sweep.rows, lines):
    colour.setdefault(row["client_lr"], set()).add(to_hex(line.get_color()))
    assert line.get_linestyle() == {0: "-", 1: "--"}[row["seed"]]
  assert all(len(c) == 1 for c in colour.values())              # seeds share the colour
  assert len({c.pop() for c in colour.values()}) == num_configs  # configurations do not
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert len(legend) == num_configs + 2 and legend[-2:] == ["seed=0", "seed=1"]
  assert legend[0] == "client_lr=0.01"
