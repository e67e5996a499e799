"""Issue 15 item 6: DP noise that dwarfs the clipped signal is warned about, in `fs.run`
(privacy.DPNoiseWarning) and in `fedjax-sim run` (one line), with the rule and the number of
clients per round that would bring it down."""

import warnings

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli, privacy

from conftest import ragged_clients


def test_noise_warning_rule():
  assert privacy.noise_warning(1.0, 10) is None          # z/m = 0.1: at the limit
  assert privacy.noise_warning(0.0, 1) is None           # clipping alone
  text = privacy.noise_warning(16.0, 10, num_clients=30)
  assert "z*C/m = 16*C/10 = 1.6*C per coordinate" in text
  assert "160 clients per round would bring it to 0.1*C" in text
  assert "more than the 30 clients there are" in text
  # Under adaptive clipping the update gets z_delta = (0.95^-2 - (2 * 10/20)^-2)^-1/2 =
  # 3.04 of a total 0.95: 0.30*C on the average, which the total's 0.095 did not warn of.
  adaptive = privacy.AdaptiveClipping()
  assert privacy.noise_warning(0.95, 10) is None
  text = privacy.noise_warning(0.95, 10, adaptive=adaptive)
  assert "z_delta*C/m = 3.042*C/10 = 0.304*C per coordinate" in text
  # More clients shrink z_delta too (their count noise grows): at 14 it is 1.293 and
  # 1.293/14 = 0.092 passes, 13's 1.392/13 = 0.107 does not (ceil(10 z_delta) said 31).
  assert "14 clients per round" in text
  assert privacy.noise_warning(0.95, 14, adaptive=adaptive) is None
  assert privacy.noise_warning(0.95, 13, adaptive=adaptive) is not None


def test_fs_run_warns_when_the_noise_dwarfs_the_signal(small_mlp):
  xs, ys = ragged_clients()
  train = fs.from_clients(xs, ys, num_classes=3)
  def run(z):
    algorithm = fs.fedavg(small_mlp.apply, client_optimizer=optax.sgd(0.1), clients_per_round=2,
                          batch_size=4, steps=1, aggregator=privacy.dp_mean(1.0, z))
    state = algorithm.init(small_mlp.params, jax.random.key(0))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      fs.run(algorithm, state, train, rounds=1, progress=False)
    return [w for w in caught if issubclass(w.category, privacy.DPNoiseWarning)]
  (warned,) = run(4.0)
  assert "z*C/m = 4*C/2 = 2*C per coordinate" in str(warned.message)
  assert "40 clients per round" in str(warned.message)
  assert "more than the 6 clients there are" in str(warned.message)
  assert run(0.1) == []


def test_cli_prints_one_warning_line(capsys, tmp_path):
  argv = ["run", "--rounds", "1", "--no-progress", "--output", str(tmp_path / "run"),
          "--clip", "1", "--noise-multiplier", "3"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert cli.main(argv) == 0
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if line.startswith("fedjax-sim: warning:")]
  assert len(lines) == 1 and "z*C/m = 3*C/10 = 0.3*C" in lines[0]
  assert "30 clients per round would bring it to 0.1*C" in lines[0]
  assert not any(issubclass(w.category, privacy.DPNoiseWarning) for w in caught)
  quiet = ["run", "--rounds", "1", "--no-progress", "--output", str(tmp_path / "quiet"),
           "--clip", "1", "--noise-multiplier", "0.5"]
  assert cli.main(quiet) == 0
  assert "fedjax-sim: warning" not in capsys.readouterr().out
