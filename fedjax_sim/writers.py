"""Metric writers for TensorBoard and Weights & Biases: `fs.run(..., callbacks=[...])`.

    writer = writers.TensorBoardWriter("runs/a/tensorboard", config={"client_lr": 0.1})
    fs.run(algorithm, state, train, rounds=100, callbacks=[writer])

Each writer logs every round's scalar metrics at step = the round, the configuration as
hyperparameters, and the final summary (status, rounds, wall time, final metrics). The
runner calls them between compiled chunks (`on_rounds(rows)`, then `on_end(summary)`,
also when a run fails or is interrupted), so the round program never waits on them.
`fedjax-sim run --tensorboard [DIR] --wandb PROJECT` builds them (`from_args`).

TensorBoard goes through tensorboardX (`pip install 'fedjax_sim[tensorboard]'`): it writes
event files with numpy and protobuf only, no TensorFlow or PyTorch, keeps the SummaryWriter
API, and writes the hparams plugin's records. clu's metric writers, the JAX-side choice,
write TensorBoard summaries only through TensorFlow (`tf.summary`, plus the `tensorboard`
package) or PyTorch, several hundred MB that a JAX simulator has no other use for.

Weights & Biases goes through `wandb` (`pip install 'fedjax_sim[wandb]'`); `mode="offline"`
writes the run under `dir`/wandb/ without a network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from typing import Any

EXTRAS = {"tensorboardX": "tensorboard", "wandb": "wandb"}


def require(module: str, what: str):
  """Imports `module`, or raises ImportError naming the pip extra that installs it."""
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"{what} needs {module}: pip install 'fedjax_sim[{EXTRAS[module]}]'")
  return importlib.import_module(module)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """The row's scalar metrics (numbers, not the round itself, not per-client arrays)."""
  return {k: float(v) for k, v in row.items()
          if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _hparam(value: Any) -> Any:
  """A configuration value as a TensorBoard hyperparameter: number, string or bool."""
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value)


def _summary_text(summary: Mapping[str, Any]) -> str:
  lines = ["| | |", "|---|---|"]
  for key, value in summary.items():
    if key == "final":
      lines += [f"| final {k} | {v:.6g} |" if isinstance(v, float) else f"| final {k} | {v} |"
                for k, v in value.items()]
    elif not isinstance(value, (dict, list)):
      lines.append(f"| {key} | {value} |")
  return "\n".join(lines)


class TensorBoardWriter:
  """Writes TensorBoard event files with tensorboardX.

  Args:
    logdir: the folder of the event files (one TensorBoard run).
    config: the run's configuration, logged as hyperparameters (the HParams dashboard)
      and as a text table.
    flush_secs: how often the background thread flushes.

  Raises:
    ImportError: tensorboardX is not installed (naming the extra).
  """

  def __init__(self, logdir: str | os.PathLike, config: Mapping[str, Any] | None = None,
               flush_secs: int = 5):
    self._tbx = require("tensorboardX", "the TensorBoard writer")
    self.logdir = os.fspath(logdir)
    self.config = dict(config or {})
    self.flush_secs = flush_secs
    self._writer = None
    self._metrics: list[str] = []

  def _open(self, first_round: int):
    # A resumed run starts after round 1: purge_step hides the events the first session
    # wrote past its last checkpoint.
    # The suffix keeps a resumed session's file apart from the first's (the file name
    # otherwise has only the second and the host).
    self._writer = self._tbx.SummaryWriter(
        self.logdir, flush_secs=self.flush_secs, filename_suffix=f".from_round{first_round}",
        purge_step=first_round if first_round > 1 else None)
    if self.config:
      self._writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str)
                            + "\n```", global_step=first_round)

  def on_rounds(self, rows: list[dict]) -> None:
    if not rows:
      return
    if self._writer is None:
      self._open(rows[0]["round"])
    for row in rows:
      for name, value in scalars(row).items():
        if name not in self._metrics:
          self._metrics.append(name)
        self._writer.add_scalar(name, value, global_step=row["round"])

  def on_end(self, summary: Mapping[str, Any]) -> None:
    from tensorboardX.proto import api_pb2, plugin_hparams_pb2, summary_pb2
    from tensorboardX.summary import hparams

    if self._writer is None:
      self._open(1)
    step = summary.get("final", {}).get("round", summary.get("rounds", 0))
    config = {k: _hparam(v) for k, v in self.config.items() if v is not None}
    experiment, session_start, _ = hparams(config, {m: 0.0 for m in self._metrics})
    # The session's end with the run's status (tensorboardX's own always says success).
    status = api_pb2.Status.Value("STATUS_SUCCESS" if summary.get("status") == "completed"
                                  else "STATUS_FAILURE")
    content = plugin_hparams_pb2.HParamsPluginData(
        session_end_info=plugin_hparams_pb2.SessionEndInfo(status=status), version=0)
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="hparams", content=content.SerializeToString()))
    session_end = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag="_hparams_/session_end_info", metadata=metadata)])
    for record in (experiment, session_start, session_end):
      self._writer.file_writer.add_summary(record, global_step=step)
    self._writer.add_text("summary", _summary_text(summary), global_step=step)
    self.close()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class WandbWriter:
  """Logs to Weights & Biases.

  Args:
    project: the W&B project.
    config: the run's configuration (W&B's run config).
    dir: the folder under which W&B writes (its wandb/ subfolder); default the current.
    name: the W&B run's name.
    mode: "online", "offline" (no network; `wandb sync` later) or "disabled"; default
      W&B's own (the WANDB_MODE variable, else online).
    **init_kwargs: more arguments of `wandb.init` (entity, group, tags...).

  Raises:
    ImportError: wandb is not installed (naming the extra).
  """

  def __init__(self, project: str, config: Mapping[str, Any] | None = None, *,
               dir: str | os.PathLike | None = None, name: str | None = None,
               mode: str | None = None, **init_kwargs):
    wandb = require("wandb", "the W&B writer")
    os.environ.setdefault("WANDB_SILENT", "true")  # no banner between the CLI's lines
    if dir is not None:
      os.makedirs(dir, exist_ok=True)
    settings = wandb.Settings(console="off", silent=True)  # the CLI prints its own output
    self.run = wandb.init(project=project, config=dict(config or {}),
                          dir=None if dir is None else os.fspath(dir), name=name, mode=mode,
                          settings=settings, **init_kwargs)
    self._ended = False

  def on_rounds(self, rows: list[dict]) -> None:
    for row in rows:
      self.run.log(scalars(row), step=int(row["round"]))

  def on_end(self, summary: Mapping[str, Any]) -> None:
    values = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    values.update({f"final/{k}": v for k, v in summary.get("final", {}).items()
                   if isinstance(v, (int, float, str)) and not (isinstance(v, float)
                                                              and math.isnan(v))})
    self.run.summary.update(values)
    self._ended = True
    self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)

  def close(self) -> None:
    if not self._ended:
      self._ended = True
      self.run.finish()


def check(args) -> None:
  """Raises ImportError (one line naming the pip extra) if a writer the flags ask for
  (`--tensorboard`, `--wandb`) is not installed, ValueError if W&B would log online
  without an API key. Before the run folder is cleared: a writer failing to start there
  lost a finished run. (The CLI checks a `--tensorboard DIR` can be written.)"""
  if getattr(args, "tensorboard", None) is not None:
    require("tensorboardX", "--tensorboard")
  if getattr(args, "wandb", None) is not None:
    wandb = require("wandb", "--wandb")
    mode = getattr(args, "wandb_mode", None) or os.environ.get("WANDB_MODE", "online")
    if mode == "online":
      try:
        wandb.Api()  # reads the API key (a login, WANDB_API_KEY), contacts nothing
      except Exception as e:  # wandb's UsageError: no API key configured
        raise ValueError(f"--wandb: W&B cannot log online here ({e}); run `wandb login`, "
                         f"set WANDB_API_KEY, or give --wandb-mode offline") from None


def from_args(args, output: str, config: Mapping[str, Any]) -> list:
  """The writers `fedjax-sim run`'s flags ask for (`--tensorboard [DIR]`, `--wandb
  PROJECT`, `--wandb-mode`), built before anything compiles; [] without them.

  Raises:
    ImportError: a writer's package is missing (one line naming the pip extra).
  """
  check(args)  # both first: a missing package is reported before any writer starts
  tensorboard = getattr(args, "tensorboard", None)
  project = getattr(args, "wandb", None)
  out = []
  if tensorboard is not None:
    out.append(TensorBoardWriter(tensorboard or os.path.join(output, "tensorboard"), config))
  if project is not None:
    # One W&B run per run folder: a resumed run continues it (config.json keeps its id).
    resume = {"id": config["wandb_id"], "resume": "allow"} if config.get("wandb_id") else {}
    out.append(WandbWriter(project, config, dir=output,
                           name=os.path.basename(os.path.normpath(output)),
                           mode=getattr(args, "wandb_mode", None), **resume))
  return out
