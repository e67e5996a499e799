"""`fedjax-sim plot` and `fedjax-sim runs`: look at what runs and sweeps left on disk.

    fedjax-sim plot runs/a runs/b runs/sweep-x --metric test_accuracy --x round --output fig.png
    fedjax-sim runs runs --sort best_test_accuracy --csv runs.csv

See `fedjax_sim.plots` and `fedjax_sim.run_table`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import warnings

from fedjax_sim import plots, results, run_table


def add_parsers(commands) -> None:
  """Adds the `plot` and `runs` subcommands to the CLI's subparsers."""
  plot = commands.add_parser(
      "plot", help="one figure comparing runs and sweeps",
      description="Plots a metric of run and sweep folders against rounds, simulated time or "
                  "cumulative uplink bytes, each line labelled by what differs between the "
                  "configurations; runs differing only by seed as a mean and a min-max band.")
  plot.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run or sweep folders")
  plot.add_argument("--metric", default="test_accuracy",
                    help="the metric to plot: test_accuracy (the default), train_loss, "
                         "test_loss...")
  plot.add_argument("--x", default="round", choices=plots.X_AXES,
                    help="the x axis: round (the default), simulated time, or bytes sent "
                         "summed over rounds")
  plot.add_argument("--seeds", default="band", choices=("band", "lines"),
                    help="runs differing only by seed: mean and min-max band (the default), "
                         "or a line each")
  plot.add_argument("--xscale", default=None, choices=("linear", "log"),
                    help="default: log where the runs' final x values differ tenfold")
  plot.add_argument("--yscale", default=None, choices=("linear", "log"),
                    help="default: log where the values span two decades (not accuracies)")
  plot.add_argument("--title", default=None, help="default: what the runs share")
  plot.add_argument("--output", default=None, metavar="FIG.png",
                    help="the figure file (default <metric>-vs-<x>.png here)")
  runs = commands.add_parser(
      "runs", help="a table of the runs and sweeps under a folder",
      description="Lists every run and sweep row under a folder: the configuration keys that "
                  "differ, seed, status, rounds, final and best metrics, wall time.")
  runs.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                    help="the folder to search (default runs)")
  runs.add_argument("--sort", default=None, metavar="METRIC",
                    help="sort by this column (test_accuracy means final_test_accuracy); "
                         "accuracies high to low, the rest low to high")
  runs.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")


def plot_command(args: argparse.Namespace):
  """Draws the figure and saves it to `args.output`; returns its Axes."""
  if importlib.util.find_spec("matplotlib") is None:
    raise ImportError("fedjax-sim plot needs matplotlib: pip install 'fedjax_sim[plot]'")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ax = plots.plot_runs(args.dirs, metric=args.metric, x=args.x, seeds=args.seeds,
                         title=args.title, xscale=args.xscale, yscale=args.yscale)
  for warning in caught:
    print(f"fedjax-sim: warning: {warning.message}")
  output = args.output or f"{args.metric}-vs-{args.x}.png"
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  ax.figure.savefig(output, dpi=120, bbox_inches="tight")
  print(f"fedjax-sim: {len(ax.get_legend().get_texts())} line(s) in {output}")
  return ax


def runs_command(args: argparse.Namespace) -> list[dict]:
  """Prints the table (and writes the CSV); returns its rows."""
  found = results.find(args.dir)
  if not found:
    print(f"fedjax-sim: no runs under {args.dir}")
    return []
  columns, rows = run_table.table(found, root=args.dir)
  if args.sort:
    rows = run_table.sort_rows(rows, columns, args.sort)
  print(run_table.format_table(columns, rows))
  if args.csv:
    run_table.write_csv(args.csv, columns, rows)
    print(f"fedjax-sim: {len(rows)} row(s) in {args.csv}")
  return rows
