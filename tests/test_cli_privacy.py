"""`fedjax-sim run` with privacy, compression, robustness and attack flags."""

import json
import re

import pytest

from fedjax_sim import aggregation_options, cli, privacy


def rows(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dp_run_with_backdoor_and_quantization(tmp_path, capsys):
  # 30 clients, 5 per round, delta 0.1 / 30; the PLD bound (no amplification) is quick.
  accountant = privacy.DPAccountant(3.0, 5, 30, 0.1 / 30, accountant="pld")
  last = accountant.max_rounds(3.5)
  assert last == 3
  out = tmp_path / "dp"
  code = cli.main(["run", "--rounds", "6", "--eval-every", "3", "--clients-per-round", "5",
                   "--clip", "0.5", "--noise-multiplier", "3", "--target-epsilon", "3.5",
                   "--accountant", "pld", "--attack", "backdoor", "--malicious-fraction", "0.2",
                   "--quantize-bits", "8", "--rotate", "--output", str(out), "--no-progress"])
  assert code == 0
  got = rows(out)
  # Stopped where the budget ends, with the epsilon spent in every row.
  assert [r["round"] for r in got] == list(range(1, last + 1))
  assert [r["epsilon"] for r in got] == [accountant.epsilon(r) for r in range(1, last + 1)]
  assert got[-1]["epsilon"] <= 3.5 and all(r["clip_norm"] == 0.5 for r in got)
  assert 0.0 <= got[-1]["backdoor_accuracy"] <= 1.0
  d = 60 * 10 + 10  # logistic regression on Synthetic: padded to 1024 by the rotation
  assert got[0]["uplink_bytes"] == 5 * (8 * 1024 + 64) / 8
  assert got[0]["downlink_bytes"] == 5 * d * 4
  printed = capsys.readouterr().out
  assert f"is spent after {last} rounds: stopping there" in printed
  assert "6 of 30 clients are malicious (backdoor)" in printed
  config = json.loads((out / "config.json").read_text())
  assert config["attack"] == "backdoor" and config["noise_multiplier"] == 3.0
  assert config["dp_noise_multiplier"] == 3.0  # what ran: the flag's, or calibrated
  # What DP ran with, defaults and the rounds --target-epsilon left, and the weighting
  # DP's mean uses whatever --weighting says (it counts every client once).
  assert (config["dp_delta"], config["dp_accountant"], config["dp_rounds"]) == (
      0.1 / 30, "pld", last)
  assert config["weighting"] == "examples" and config["weighting_used"] == "uniform"
  assert "DP's mean counts every client once: the weighting is uniform" in printed


def test_target_epsilon_alone_calibrates_the_noise():
  args = cli.build_parser().parse_args(
      ["run", "--rounds", "20", "--clients-per-round", "30", "--clip", "1", "--target-epsilon",
       "4", "--accountant", "pld"])
  setup = aggregation_options.build(args, num_clients=30, num_classes=10, train_x=[0.0],
                                    rounds=20)
  assert setup.rounds == 20 and "reaches epsilon 4.0" in setup.notes[0]
  assert setup.accountant.epsilon(20) <= 4.0 < privacy.DPAccountant(
      setup.noise_multiplier - 0.01, 30, 30, 0.1 / 30, "pld").epsilon(20)


def test_krum_without_an_attack_says_what_it_tolerates():
  args = cli.build_parser().parse_args(["run", "--aggregator", "krum"])
  setup = aggregation_options.build(args, num_clients=30, num_classes=10, train_x=[0.0],
                                    rounds=2)
  assert "Krum tolerates no Byzantine client (f = 0)" in setup.notes[0]


@pytest.mark.parametrize("flags,match", [
    (["--noise-multiplier", "1"], "needs a clipping norm: give --clip"),
    (["--noise-multiplier", "-1", "--clip", "1"], "--noise-multiplier must be >= 0, got -1.0"),
    (["--noise-multiplier", "1", "--clip", "0"], "--clip must be positive, got 0.0"),
    (["--clip", "1", "--noise-multiplier", "1", "--aggregator", "median"],
     "calibrated to the mean"),
    (["--attack", "sign_flip", "--malicious-fraction", "0.4", "--aggregator", "krum"],
     "krum with num_byzantine=4 needs at least 2\\*4\\+3 = 11 clients per round, got 10"),
    (["--attack", "sign_flip"], "needs --malicious-fraction in \\(0, 1\\)"),
    (["--malicious-fraction", "0.2"],
     "--malicious-fraction has no effect here: it applies with an --attack or --aggregator "
     "krum/multi_krum"),
    # Without an attack --malicious-fraction sizes Krum's f (0.4 of 10 clients: 4); with
    # f = 0 Multi-Krum averaged every client, the plain mean.
    (["--malicious-fraction", "0.4", "--aggregator", "multi_krum"],
     "krum with num_byzantine=4 needs at least 2\\*4\\+3 = 11 clients per round, got 10"),
    (["--aggregator", "multi_krum"], "multi_krum needs --malicious-fraction"),
    (["--aggregator", "multi_krum", "--malicious-fraction", "0"],
     "multi_krum tolerating f = 0 clients .* averages all of them"),
    (["--aggregator", "krum", "--malicious-fraction", "1"],
     "--malicious-fraction must be in \\[0, 1\\), got 1.0"),
    (["--rotate"], "--rotate has no effect here: it applies with --quantize-bits"),
    # NaN made a NaN model in a run reported as completed; a sign flip by -1 no attack.
    (["--attack", "scaling", "--malicious-fraction", "0.3", "--attack-scale", "nan"],
     "scaling's factor must be a finite number, got nan"),
    (["--attack", "sign_flip", "--malicious-fraction", "0.3", "--attack-scale", "-1"],
     "--attack-scale: sign_flip's scale must be a finite number > 0, got -1.0"),
    # A factor of 1 is the honest update; fractions rounding to no client or to every one.
    (["--attack", "scaling", "--malicious-fraction", "0.3", "--attack-scale", "1"],
     "--attack-scale: scaling's factor 1 sends the honest update: no attack"),
    (["--attack", "sign_flip", "--malicious-fraction", "0.01"],
     "--malicious-fraction 0.01 of 30 clients makes 0 malicious"),
    (["--attack", "sign_flip", "--malicious-fraction", "0.99"],
     "--malicious-fraction 0.99 of 30 clients makes 30 malicious"),
    (["--data-seed", "-1"], "--data-seed must be an integer >= 0, got -1"),
])
def test_bad_flag_combinations_are_clear_errors(tmp_path, capsys, flags, match):
  code = cli.main(["run", "--rounds", "2", "--output", str(tmp_path / "x"), "--no-progress",
                   *flags])
  assert code == 2
  assert re.search(match, capsys.readouterr().err)
