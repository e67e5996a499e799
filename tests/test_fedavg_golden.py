"""FedAvg's results did not change when the algorithms moved onto the round engine:
the README's default run (`fedjax-sim run`), 5 rounds, against the values the commit
before the engine (fbee7e2) wrote, to float32 rounding."""

import json

import numpy as np

from fedjax_sim import cli

# metrics.jsonl of `fedjax-sim run --rounds 5` at fbee7e2 (2-core CPU, jax 0.10.2).
TRAIN_LOSS = [0.6293567419052124, 1.3938928842544556, 1.3351037502288818, 0.8383457064628601,
              0.5202491879463196]
UPDATE_NORM = [0.3540940284729004, 0.5029941201210022, 0.5476646423339844, 0.2945079803466797,
               0.1997300237417221]
TEST_ACCURACY = 0.4317548871040344


def test_default_run_matches_the_pre_engine_commit(tmp_path):
  out = tmp_path / "run"
  assert cli.main(["run", "--rounds", "5", "--output", str(out), "--no-progress"]) == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([r["train_loss"] for r in rows], TRAIN_LOSS, rtol=1e-5)
  np.testing.assert_allclose([r["update_norm"] for r in rows], UPDATE_NORM, rtol=1e-5)
  np.testing.assert_allclose(rows[-1]["test_accuracy"], TEST_ACCURACY, rtol=1e-5)
