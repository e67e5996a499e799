"""`fs.plot_runs` and `fedjax-sim plot`: one figure comparing runs and sweeps.

Each line is labelled by the configuration keys whose values differ between the runs
(read from their config.json, not their folder names). Runs with the same configuration
and different seeds, a sweep's rows among them, are drawn as one line, the mean over the
seeds, with a band from their minimum to their maximum. The x axis is the round, the
simulated time (`sim_time_s`) or the cumulative uplink (`uplink_bytes`, an amount per
round summed). Axes say their units; an axis whose values span two decades or more
(a loss falling by 100x) is logarithmic, and so is an x axis of time or bytes where the
runs' totals differ tenfold (compressed against full uplinks); colour, line style and marker tell up to 20 lines
apart, and the legend sits outside the axes.

Uses matplotlib's object API (no pyplot state): it draws on `ax` when given, else on a
new `matplotlib.figure.Figure` (`ax.figure` to save it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim import results

X_AXES = ("round", "sim_time_s", "uplink_bytes", "downlink_bytes")
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_NAMES = {"test_accuracy": "test accuracy", "train_loss": "training loss",
          "test_loss": "test loss", "client_test_accuracy": "client test accuracy",
          "client_test_loss": "client test loss", "epsilon": "privacy epsilon spent",
          "update_norm": "update norm (L2)", "num_aggregated": "clients aggregated per round"}


def axis_label(name: str, scale: float = 1.0, unit: str = "", *, x: bool = False) -> str:
  """A metric's axis label with its unit; on the x axis bytes are summed over rounds."""
  if name == "round":
    return "round"
  if name == "sim_time_s":
    return f"simulated time ({unit or 's'})"
  if name in results.PER_ROUND_AMOUNTS:
    which = name.split("_")[0]
    return (f"cumulative {which} ({unit or 'bytes'})" if x
            else f"{which} per round ({unit or 'bytes'})")
  if name in _NAMES:
    text = _NAMES[name]
  else:
    text = name.replace("_", " ")
  if "accuracy" in name:
    return f"{text} (fraction correct)"
  if "loss" in name:
    return f"{text} (mean per example)"
  if name.endswith("_s"):
    return f"{text[:-2]} (s)"
  if name.endswith("_bytes"):
    return f"{text[:-6]} (bytes)"
  return text


def _unit(name: str, largest: float) -> tuple[float, str]:
  """(divisor, unit) that keep an axis's numbers short."""
  if name == "sim_time_s":
    for divisor, unit in ((3600.0, "h"), (60.0, "min")):
      if largest >= 2 * divisor:
        return divisor, unit
    return 1.0, "s"
  if name in results.PER_ROUND_AMOUNTS:
    for divisor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
      if largest >= divisor:
        return divisor, unit
    return 1.0, "bytes"
  return 1.0, ""


def spans_decades(values: np.ndarray, decades: float = 2.0) -> bool:
  """Whether positive `values` span `decades` orders of magnitude or more."""
  values = values[np.isfinite(values)]
  return bool(len(values)) and values.min() > 0 and values.max() / values.min() >= 10 ** decades


def style(i: int, n: int) -> dict[str, Any]:
  """Colour, line style and marker of line `i` of `n`: tab10 colours with a new line style
  for each ten lines up to 20 (and beyond, colours spread over turbo), and a marker each."""
  if n <= 20:
    colour = plot_colours(min(n, 10))[i % 10]
    line = STYLES[i // 10]
  else:
    colour = plot_colours(n)[i]
    line = STYLES[i % len(STYLES)]
  return {"color": colour, "linestyle": line, "marker": MARKERS[i % len(MARKERS)]}


def _groups(runs: Sequence[results.Run], keys: list[str]) -> dict[str, list[results.Run]]:
  """Runs by their label: those that differ only by seed share one."""
  groups: dict[str, list[results.Run]] = {}
  for run in runs:
    groups.setdefault(results.label(run, keys), []).append(run)
  return groups


def plot_runs(dirs: Sequence[str | os.PathLike] | str | os.PathLike,
              metric: str = "test_accuracy", x: str = "round", ax=None, *,
              seeds: str = "band", title: str | None = None, xscale: str | None = None,
              yscale: str | None = None):
  """Plots `metric` against `x` for the runs and sweeps in `dirs`.

  Args:
    dirs: run folders and sweep folders (a sweep's rows are runs); one folder alone too.
    metric: a per-round or evaluation metric of the runs' metrics (`test_accuracy`,
      `train_loss`, `test_loss`, `sim_time_s`...).
    x: "round", "sim_time_s" (the simulated clock; runs with a systems flag), or
      "uplink_bytes"/"downlink_bytes" (summed over rounds).
    ax: matplotlib Axes to draw on; default a new Figure's.
    seeds: "band": runs whose configurations differ only by seed are one line, the mean
      over the seeds at each point (x too), with a min-max band; "lines": a line each.
    title: the axes title (default: what is common to the runs, e.g. the task).
    xscale, yscale: "linear" or "log"; default: y log where its values span 2 decades
      (never for accuracies), x log where the runs' final x values span one.

  Returns:
    The Axes (`ax.figure.savefig(...)` to save it).

  Raises:
    FileNotFoundError: a folder is not a run or a sweep.
    ValueError: no run has the metric or x, or a bad argument.
  """
  if isinstance(dirs, (str, os.PathLike)):
    dirs = [dirs]
  if x not in X_AXES:
    raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
  if seeds not in ("band", "lines"):
    raise ValueError(f"seeds must be 'band' or 'lines', got {seeds!r}")
  runs = [run for d in dirs for run in results.load(d)]
  if not runs:
    raise ValueError("no runs to plot")
  keys = results.differences(runs)
  have = [run for run in runs if metric in run.series]
  if not have:
    names = sorted({n for run in runs for n in run.series})
    if not names:  # e.g. diverged in round 1, or a sweep before its results
      raise ValueError(f"no run has metric {metric!r}: no metrics were recorded ("
                       + "; ".join(f"{run.name}: {run.status}" for run in runs) + ")")
    raise ValueError(f"no run has metric {metric!r}; they have {', '.join(names)}")
  missing = [run.name for run in runs if metric not in run.series]
  if missing:
    warnings.warn(f"{', '.join(missing)}: no {metric!r}, left out", stacklevel=2)
  curves = {}
  for run in have:
    try:
      curves[id(run)] = run.curve(metric, x)
    except KeyError as e:
      raise ValueError(e.args[0]) from None
  # A configuration's seed once: a run and the sweep row it repeats (or one run in two
  # folders) overwrote each other's line, or counted twice in a band's mean and count.
  seen, unique, dropped = {}, [], []
  for run in have:
    key = (results.label(run, keys), run.seed)
    if key in seen:
      dropped.append(f"{run.name} (as {seen[key]})")
    else:
      seen[key] = run.name
      unique.append(run)
  if dropped:
    warnings.warn(f"the same configuration and seed again, left out: {', '.join(dropped)}",
                  stacklevel=2)
  have = unique
  if ax is None:
    from matplotlib.figure import Figure  # lazy: an optional extra; no pyplot state
    ax = Figure(figsize=(8, 4.5)).subplots()
  if seeds == "band":
    groups = _groups(have, keys)
  else:
    groups = {", ".join(filter(None, [results.label(run, keys), f"seed={run.seed}"])): [run]
              for run in have}
  lines = []
  for label, members in groups.items():
    xs = [curves[id(run)][0] for run in members]
    ys = [curves[id(run)][1] for run in members]
    n = min(len(v) for v in xs)  # runs cut short: their common rounds
    xs, ys = np.array([v[:n] for v in xs]), np.array([v[:n] for v in ys])
    if not label:
      first = members[0]
      label = f"{first.config.get('algorithm', first.kind)} on {first.config.get('task', '?')}"
    if len(members) > 1:
      label += f" (mean of {len(members)} seeds)"
    lines.append((label, xs, ys))
  all_x = np.concatenate([v.ravel() for _, v, _ in lines])
  all_y = np.concatenate([v.ravel() for _, _, v in lines])
  divisor, unit = _unit(x, float(np.nanmax(all_x)) if len(all_x) else 1.0)
  for i, (label, xs, ys) in enumerate(lines):
    kwargs = style(i, len(lines))
    x_mean = xs.mean(axis=0) / divisor
    if len(x_mean) > 40:
      kwargs["markevery"] = max(1, len(x_mean) // 20)
    ax.plot(x_mean, ys.mean(axis=0), label=label, markersize=4, linewidth=1.5, **kwargs)
    if len(ys) > 1:
      ax.fill_between(x_mean, ys.min(axis=0), ys.max(axis=0), color=kwargs["color"], alpha=0.2,
                      linewidth=0)
  ax.set_xlabel(axis_label(x, unit=unit, x=True))
  ax.set_ylabel(axis_label(metric))
  # x: log when the runs' totals differ by a decade (compressed against full uplinks, say);
  # one run's cumulative bytes always span decades from round 1, which log would stretch.
  finals = np.array([xs.mean(axis=0)[-1] for _, xs, _ in lines if xs.shape[1]])
  ax.set_xscale(xscale or ("log" if x != "round" and spans_decades(finals, 1.0) else "linear"))
  ax.set_yscale(yscale or ("log" if "accuracy" not in metric and spans_decades(all_y)
                           else "linear"))
  if title is None:
    common = [k for k in ("task", "model", "algorithm") if k not in keys
              and all(k in run.config for run in have)]
    title = ", ".join(f"{k} {results.format_value(have[0].config[k])}" for k in common)
  ax.set_title(title, fontsize="medium")
  if x == "round":
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
            ncol=1 if len(lines) <= 20 else 2, frameon=False)
  return ax


def plot_colours(n: int) -> list:
  """`n` distinct colours: tab10 up to 10, tab20 up to 20, evenly over turbo beyond."""
  from matplotlib import colormaps  # lazy: an optional extra

  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  if n <= 20:
    return [colormaps["tab20"](i) for i in range(n)]
  return [colormaps["turbo"](i / (n - 1)) for i in range(n)]
