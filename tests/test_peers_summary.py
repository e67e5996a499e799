"""The peers benchmark's summary of where fedjax_sim's end to end is the shorter
(benchmarks/peers/run_all.py): per repetition, then in words by kind."""

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks" / "peers"))
import run_all  # noqa: E402


def run(end_to_end, per_round, rounds=20):
  return {"timings": {"end_to_end_s": end_to_end, "per_round_warm_median_s": per_round,
                      "per_round_s": [per_round] * rounds}}


def test_break_even_by_kind():
  # fixed costs: end to end less 20 rounds at the warm rate
  mine = run(3.0, 0.01)                                          # fixed 2.8
  assert run_all.break_even(mine, run(4.0, 0.02)) == 0.0          # never behind
  assert run_all.break_even(mine, run(2.6, 0.01)) == math.inf     # fixed 2.4, same rate
  assert math.isclose(run_all.break_even(mine, run(2.8, 0.02)), 40.0)   # 0.4 s / 0.01 s
  # Ahead at first (fixed 2.8 < 3.0), the peer's faster rounds overtake it after 200:
  # this kind was None and dropped from the median.
  assert math.isclose(run_all.break_even(mine, run(3.18, 0.009)), -200.0)


def test_ahead_names_each_kind_with_counts_where_they_differ():
  assert run_all.ahead([0.0, 0.0]) == "always"
  assert run_all.ahead([12.2, 30.0, 14.1]) == "after 15 rounds"  # median 14.1, up
  # The median of 0 and inf was "never"; of [None x 5, 0] "always".
  assert run_all.ahead([0.0, math.inf]) == "always (1 of 2), never (1 of 2)"
  assert run_all.ahead([-230.0] * 6 + [0.0]) == "until 230 rounds (6 of 7), always (1 of 7)"
  assert run_all.ahead([None]) == "-"
