"""`fedjax-sim runs [DIR]`: a table of the runs under a folder.

One row per run folder and per sweep row: the folder, the configuration keys whose
values differ between the runs, the seed, the status (completed, failed, diverged,
interrupted, or running/killed where summary.json says it runs or is missing), the
rounds done, final and best test accuracy, final and best training loss, and the wall time (a
sweep's rows share the sweep's). Sortable by any column; `--csv` writes it for a
spreadsheet.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

from fedjax_sim import results

METRICS = ("test_accuracy", "train_loss")


def table(runs: Sequence[results.Run], root: str | None = None) -> tuple[list[str], list[dict]]:
  """(columns, rows) of the runs' table; folders relative to `root`."""
  keys = results.differences(runs)
  names = [m for m in METRICS if any(m in run.series for run in runs)]
  # rounds done: not "rounds", the configured number, a key column where runs differ in it
  columns = ["run", *keys, "seed", "status", "rounds_done"]
  for name in names:
    columns += [f"final_{name}", f"best_{name}"]
  columns.append("seconds")
  rows = []
  for run in runs:
    folder = os.path.relpath(run.path, root) if root else run.path
    name = folder if run.kind == "run" else f"{folder}{run.name[run.name.rindex('['):]}"
    row: dict[str, Any] = {"run": name, **{k: run.config.get(k) for k in keys},
                           # one line: an exception's message may span several
                           "seed": run.seed, "status": " ".join(run.status.split()),
                           "rounds_done": run.rounds}
    for metric in names:
      row[f"final_{metric}"] = run.final(metric)
      row[f"best_{metric}"] = run.best(metric)
    row["seconds"] = run.seconds
    rows.append(row)
  return columns, rows


def sort_rows(rows: list[dict], columns: Sequence[str], by: str) -> list[dict]:
  """Rows sorted by column `by` (a bare metric name means its final value): accuracies
  from the highest, the rest from the lowest, rows without a value last."""
  if by not in columns and f"final_{by}" in columns:
    by = f"final_{by}"
  if by not in columns:
    raise ValueError(f"--sort: no column {by!r}; choose from {', '.join(columns)}")
  descending = "accuracy" in by

  def key(row):
    value = row.get(by)
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return (1, 0, "")
    if isinstance(value, (int, float)):
      return (0, -value if descending else value, "")
    return (0, 0, str(value))

  return sorted(rows, key=key)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def format_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
  """The table as aligned text: text columns to the left, numbers to the right."""
  cells = [[_cell(row.get(c)) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
            for i, c in enumerate(columns)]
  numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
             for c in columns]
  lines = ["  ".join(c.rjust(w) if num else c.ljust(w)
                     for c, w, num in zip(columns, widths, numeric)).rstrip()]
  for r in cells:
    lines.append("  ".join(v.rjust(w) if num else v.ljust(w)
                           for v, w, num in zip(r, widths, numeric)).rstrip())
  return "\n".join(lines)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows([{c: row.get(c) for c in columns} for row in rows])
