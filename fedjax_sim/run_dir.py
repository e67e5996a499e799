"""Run folders of `fedjax-sim run`: their names, the checks before anything is written,
resuming, and the persistent compilation cache.

- The default folder is `runs/<task>-<algorithm or server optimizer>-seed<seed>-<hash>`,
  where `<hash>` is 8 hex digits of a SHA-256 of every flag that changes the results
  (`config_hash`), so runs whose configurations differ never share a folder.
- `check_output(path)` says, in one line naming the path, why a folder cannot be
  written (a file, under a file, not writable), before anything loads or compiles.
- `check_folder(path, ...)`: an existing folder holding a run of another
  configuration, an unfinished run, or files that are not a run, is an error that
  offers `--resume` and `--overwrite`; nothing is written until every check passed.
- `enable_compile_cache()`: XLA's persistent compilation cache in a user cache folder,
  for every program however quick to compile, so the same command run again skips
  compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import shlex
import shutil
from typing import Any

# Flags that change where and how a run is written or shown, not its results: left out
# of the configuration's hash and of the comparison with an existing folder. (Metric
# writers such as --tensorboard and --wandb too: any flag starting with these.)
NOT_CONFIG = ("command", "output", "no_progress", "resume", "overwrite", "checkpoint_every",
              "keep_checkpoints", "no_compile_cache", "save_params")
NOT_CONFIG_PREFIXES = ("tensorboard", "wandb")
CHECKPOINTS = "checkpoints"
# The writers' logs in a run folder (--tensorboard without a folder, --wandb's wandb/).
LOG_FOLDERS = ("tensorboard", "wandb")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


class RunDirError(ValueError):
  """A run folder or output path that cannot be used (the CLI exits 2)."""


def add_flags(parser: argparse.ArgumentParser) -> None:
  """`fedjax-sim run`'s run folder, checkpoint and compilation cache flags."""
  g = parser.add_argument_group(
      "run folder, checkpoints and compilation cache",
      "a run folder is never silently replaced; SIGINT/SIGTERM stop a run at the next "
      "chunk, checkpoint it and print the command that resumes it")
  g.add_argument("--resume", default=None, metavar="RUN_DIR",
                 help="continue the run in RUN_DIR from its last checkpoint, with the flags "
                      "of its config.json (give no others but --no-progress, "
                      "--checkpoint-every, --keep-checkpoints, --no-compile-cache); its "
                      "metrics and final parameters equal the uninterrupted run's")
  g.add_argument("--overwrite", action="store_true",
                 help="replace the run (config, metrics, summary, checkpoints) already in "
                      "the output folder")
  g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                 help="checkpoint every N rounds (rounded up to whole --eval-every chunks); "
                      "default about once a minute of wall time (a preempted run loses at "
                      "most about a minute, saving costs under 5%%); 0: only at the end and "
                      "when interrupted")
  g.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                 help="keep the last K checkpoints")
  g.add_argument("--no-compile-cache", action="store_true",
                 help="do not use XLA's persistent compilation cache (kept in "
                      "$FEDJAX_SIM_COMPILE_CACHE, else $XDG_CACHE_HOME/fedjax_sim/jax or "
                      "~/.cache/fedjax_sim/jax)")


def check_flags(args: argparse.Namespace) -> None:
  if args.checkpoint_every is not None and args.checkpoint_every < 0:
    raise RunDirError(f"--checkpoint-every must be an integer >= 0, got {args.checkpoint_every}")
  if args.keep_checkpoints <= 0:
    raise RunDirError(f"--keep-checkpoints must be a positive integer, got "
                      f"{args.keep_checkpoints}")
  if args.resume is not None and args.overwrite:
    raise RunDirError("--resume continues a run and --overwrite replaces it: give one")


def _is_config_key(name: str) -> bool:
  return name not in NOT_CONFIG and not name.startswith(NOT_CONFIG_PREFIXES)


def flag_config(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
  """The flags that define a run's results (name -> value)."""
  items = vars(args) if isinstance(args, argparse.Namespace) else args
  return {k: v for k, v in sorted(items.items()) if _is_config_key(k)}


# Flags that name an input file: the file's contents are part of the configuration.
FILE_FLAGS = ("init_params", "profiles")
# Flags that name a path: a relative one is relative to the folder the run started in
# (config.json's `cwd`), where `--resume` reads it from while that folder exists; URLs
# (gs://...) stay as given.
PATH_FLAGS = FILE_FLAGS + ("save_params", "data_dir", "tensorboard")


def file_digests(args: argparse.Namespace | dict[str, Any]) -> dict[str, str]:
  """flag -> SHA-256 of the file it names, for the `FILE_FLAGS` given (a file changed
  behind the same path makes another run)."""
  items = vars(args) if isinstance(args, argparse.Namespace) else args
  out = {}
  for name in FILE_FLAGS:
    path = items.get(name)
    if path and os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = hashlib.file_digest(f, "sha256").hexdigest()
  return out


def config_hash(args: argparse.Namespace | dict[str, Any]) -> str:
  """8 hex digits of the SHA-256 of `flag_config(args)` and the `file_digests`."""
  config, digests = flag_config(args), file_digests(args)
  if digests:  # (runs without input files keep the hashes they always had)
    config["file_sha256"] = digests
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_output(args: argparse.Namespace) -> str:
  name = args.server_optimizer if args.algorithm == "fedavg" else args.algorithm
  return os.path.join("runs", f"{args.task}-{name}-seed{args.seed}-{config_hash(args)}")


def check_output(path: str, flag: str = "--output") -> None:
  """Raises RunDirError, naming `path`, if a folder cannot be made or written there."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise RunDirError(f"{flag} {path!r} is a file, not a folder")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if not os.path.isdir(existing):
    raise RunDirError(f"{flag} {path!r}: cannot make a folder under {existing!r}, a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise RunDirError(f"{flag} {path!r}: {existing!r} is not writable")


def is_sweep(path: str) -> bool:
  """Whether `path` holds a finished sweep's results (`fedjax-sim sweep`)."""
  return (os.path.isfile(os.path.join(path, "results.csv"))
          or os.path.isfile(os.path.join(path, "curves.npz")))


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None where it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  names = sorted(set(old) | set(new))
  flag = lambda n: "--" + n.replace("_", "-")
  return [f"{flag(n)} {old.get(n)!r} -> {new.get(n)!r}" for n in names
          if old.get(n) != new.get(n)]


def check_folder(path: str, args: argparse.Namespace,
                 parser: argparse.ArgumentParser) -> None:
  """Raises RunDirError if `path` holds something a new run must not replace: a run of
  another configuration, an unfinished run (which `--resume` continues), or files that
  are not a run. `--overwrite` allows the first two; a finished run of the same
  configuration is simply run again (runs are deterministic)."""
  check_output(path)
  if not os.path.isdir(path) or not os.listdir(path):
    return
  config = read_json(os.path.join(path, "config.json"))
  resume = f"fedjax-sim run --resume {shlex.quote(path)}"
  if not isinstance(config, dict):
    raise RunDirError(f"--output {path!r} is not empty and holds no fedjax-sim run (no "
                      f"readable config.json): choose another --output")
  if "grid" in config or is_sweep(path):
    # Not under --overwrite either: clearing a run's files left the sweep's beside them.
    raise RunDirError(f"--output {path!r} holds a sweep (`fedjax-sim sweep`), not a run: "
                      f"choose another --output")
  if args.overwrite:
    return
  if not isinstance(config.get("argv"), list):
    raise RunDirError(f"--output {path!r} holds a run whose config.json does not record its "
                      f"command line (an older fedjax-sim): replace it with --overwrite, or "
                      f"choose another --output")
  try:  # its flags as this version parses them (a flag added since has its default)
    old = flag_config(parser.parse_args(config["argv"]))
  except SystemExit:
    old = {"argv": config["argv"]}
  new = flag_config(args)
  changed = [f"--{n.replace('_', '-')}" for n in FILE_FLAGS
             if config.get("file_sha256", {}).get(n) != file_digests(args).get(n)]
  if old == new and changed:
    raise RunDirError(f"--output {path!r} holds a run whose input file behind "
                      f"{', '.join(changed)} has changed since: replace the run with "
                      f"--overwrite, or choose another --output")
  if old != new:
    diff = _differences(old, new)
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise RunDirError(f"--output {path!r} holds a run of another configuration ({shown}): "
                      f"continue it with `{resume}`, replace it with --overwrite, or choose "
                      f"another --output")
  summary = read_json(os.path.join(path, "summary.json"))
  status = summary.get("status") if isinstance(summary, dict) else None
  if status != "completed":
    rounds = summary.get("rounds") if isinstance(summary, dict) else None
    where = f" ({status}, {rounds} rounds)" if status else ""
    raise RunDirError(f"--output {path!r} holds an unfinished run of this configuration"
                      f"{where}: continue it with `{resume}`, or start over with --overwrite")


def clear(path: str) -> None:
  """Removes a run's own files from `path` (config, metrics, summary, checkpoints, the
  TensorBoard and W&B logs), and nothing else."""
  for name in RUN_FILES:
    try:
      os.remove(os.path.join(path, name))
    except FileNotFoundError:
      pass
  for folder in (CHECKPOINTS, *LOG_FOLDERS):
    shutil.rmtree(os.path.join(path, folder), ignore_errors=True)


def given_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: list[str]) -> set[str]:
  """The names of the flags `argv` gives to `parser`'s `run` command, whatever their
  values: `--seed 0` too, which a comparison with the defaults misses. Falls back to
  that comparison where `argv` is not the command line of `args` (a call from Python)."""
  suppressed = copy.deepcopy(parser)
  commands = next(a for a in suppressed._actions
                  if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
  for action in commands.choices["run"]._actions:  # noqa: SLF001
    action.default = argparse.SUPPRESS
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage line, not ours
      given = vars(suppressed.parse_args(argv))
  except SystemExit:
    given = {}
  if given.get("resume") == args.resume:
    return set(given) - {"command"}
  defaults = parser.parse_args(["run"])
  return {n for n, v in vars(args).items() if getattr(defaults, n, None) != v}


def resume_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: list[str]) -> argparse.Namespace:
  """`fedjax-sim run --resume RUN_DIR`: the flags of RUN_DIR/config.json, with this
  command's (`argv`) --no-progress, --checkpoint-every, --keep-checkpoints and
  --no-compile-cache; any other flag given is an error, even at its default value."""
  path = args.resume
  allowed = {"resume", "no_progress", "checkpoint_every", "keep_checkpoints",
             "no_compile_cache", "command"}
  given = sorted(given_flags(parser, args, argv) - allowed)
  if given:
    raise RunDirError(f"--resume {path} takes the run's flags from its config.json: drop "
                      + ", ".join("--" + n.replace("_", "-") for n in given))
  if not os.path.isdir(path):
    raise RunDirError(f"--resume {path!r}: no such folder")
  config = read_json(os.path.join(path, "config.json"))
  if not isinstance(config, dict) or "argv" not in config:
    raise RunDirError(f"--resume {path!r}: no config.json written by `fedjax-sim run` (with "
                      f"its flags) in this folder")
  resumed = parser.parse_args(config["argv"])
  for name in allowed - {"command"}:
    setattr(resumed, name, getattr(args, name))
  resumed.output = path
  resumed.overwrite = False
  started_in = config.get("cwd")
  if started_in and os.path.isdir(started_in):  # else moved: paths as given, from here
    for name in PATH_FLAGS:  # as the run read them, wherever it is resumed from
      value = getattr(resumed, name, None)
      if value and not os.path.isabs(value) and "://" not in value:  # not gs://...
        setattr(resumed, name, os.path.join(started_in, value))
  missing = [f"--{n.replace('_', '-')} {getattr(resumed, n)}" for n in FILE_FLAGS
             if n in config.get("file_sha256", {}) and not os.path.isfile(getattr(resumed, n))]
  if missing:
    raise RunDirError(f"--resume {path!r}: the run's input file is missing: "
                      f"{', '.join(missing)}")
  changed = [f"--{n.replace('_', '-')}" for n in FILE_FLAGS
             if config.get("file_sha256", {}).get(n) != file_digests(resumed).get(n)]
  if changed:  # the rounds to come would read other data than the rounds so far
    raise RunDirError(f"--resume {path!r}: the input file behind {', '.join(changed)} has "
                      f"changed since the run started: restore it, or start over with "
                      f"--overwrite")
  return resumed


def resume_command(output: str) -> str:
  return f"fedjax-sim run --resume {shlex.quote(output)}"


# --- The persistent compilation cache. ---


def compile_cache_dir() -> str:
  """$FEDJAX_SIM_COMPILE_CACHE, else $XDG_CACHE_HOME/fedjax_sim/jax, else
  ~/.cache/fedjax_sim/jax."""
  explicit = os.environ.get("FEDJAX_SIM_COMPILE_CACHE")
  if explicit:
    return explicit
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_sim", "jax")


def enable_compile_cache(directory: str | None = None) -> str | None:
  """Turns on jax's persistent compilation cache in `directory` (default
  `compile_cache_dir()`) for every program: jax caches only programs that took over
  a second to compile by default, while a simulation's chunks often take less on a
  CPU and are compiled on every run. Leaves a cache the process already set alone.
  Returns the folder, or None when it cannot be used (then nothing is cached)."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = directory or compile_cache_dir()
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  if not os.access(directory, os.W_OK | os.X_OK):
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
