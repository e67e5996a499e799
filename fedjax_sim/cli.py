"""`fedjax-sim run`: train a federated task from the command line.

With no arguments it trains FedAvg on Synthetic(1,1) with logistic regression,
offline, and writes runs/<task>-<name>-seed<seed>-<hash>/{config.json,
metrics.jsonl, summary.json} (the name: the algorithm, for fedavg the server optimizer;
the hash: of the flags).

`fedjax-sim sweep --config FILE` runs a grid of hyperparameters x seeds from a JSON or
TOML file as one compiled program (see `fedjax_sim.sweep_config`) and writes
results.csv (one row per configuration and seed), curves.npz, summary.json and
optionally a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings

import jax

from fedjax_sim import aggregation_options, aggregators, evaluation, optimizers, privacy
from fedjax_sim import checkpoint as checkpoint_lib
from fedjax_sim import run_dir
from fedjax_sim import run_options
from fedjax_sim import cli_results  # fedjax-sim plot, fedjax-sim runs
from fedjax_sim import writers as writers_lib  # --tensorboard, --wandb
from fedjax_sim.run_options import TASK_OPTIONS, add_run_flags, chunk_size_arg  # noqa: F401
from fedjax_sim import runner, systems, tasks, warm_start
from fedjax_sim.sweep import sweep as run_sweep  # the package exports the function as `sweep`
from fedjax_sim import sweep_config
from fedjax_sim.algorithms import build_algorithm, registry
from fedjax_sim.algorithms.fedrep import personalized_evaluator as fedrep_personalized_evaluator


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except None (such a flag's help says what leaving it out means)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="train one federated task",
                            formatter_class=_HelpFormatter)
  add_run_flags(run)
  run_dir.add_flags(run)
  sweep = commands.add_parser(
      "sweep", help="run a grid of hyperparameters x seeds from a config file as one program",
      description="Runs the grid x seeds of a JSON or TOML config as one compiled program per "
                  "shape; see fedjax_sim/sweep_config.py for the keys and "
                  "benchmarks/sweep_example.json for an example.",
      formatter_class=_HelpFormatter)
  sweep.add_argument("--config", required=True, help="the sweep's JSON or TOML file")
  sweep.add_argument("--output", default=None,
                     help="output directory (default: the config's 'output', else "
                          "runs/sweep-<config file name>)")
  sweep.add_argument("--plot", default=None, metavar="METRIC",
                     help="plot this metric per round for every row (overrides the config's "
                          "'plot'; 'none' for no plot)")
  sweep.add_argument("--no-compile-cache", action="store_true",
                     help="do not use XLA's persistent compilation cache")
  sweep.add_argument("--resume", action="store_true",
                     help="continue the interrupted sweep in the output folder from its "
                          "checkpoints (each static group from its last chunk checkpointed; "
                          "finished groups are not run again)")
  sweep.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="checkpoint every N rounds (whole eval_every chunks); default about "
                          "once a minute; 0: at the end of each group and when interrupted")
  cli_results.add_parsers(commands)
  return parser


def _print_table(rows: list[dict], columns: list[str]) -> None:
  cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
           for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def sweep_command(args: argparse.Namespace) -> dict:
  """Checks the config, loads the task, runs `fs.sweep` and writes the results."""
  if args.checkpoint_every is not None and args.checkpoint_every < 0:
    raise run_dir.RunDirError(f"--checkpoint-every must be an integer >= 0, got "
                              f"{args.checkpoint_every}")
  config = sweep_config.load_config(args.config)
  if args.plot is not None:
    config.plot = None if args.plot.lower() in ("none", "false", "") else args.plot
  if config.plot and importlib.util.find_spec("matplotlib") is None:
    raise sweep_config.ConfigError(f"{config.source}: plot needs matplotlib "
                                   "(pip install matplotlib), or set \"plot\": false")
  settings = config.settings
  try:
    task = tasks.load_task(config.task, seed=settings["init_seed"], **config.task_options)
  except (ValueError, TypeError) as e:
    raise sweep_config.ConfigError(f"{config.source}: task {config.task!r}: {e}") from None
  builder = sweep_config.Builder(config, None, task)
  try:
    model = run_options.make_model(task, builder.namespace({}, calibrate=False))
  except (ValueError, TypeError) as e:
    raise sweep_config.ConfigError(f"{config.source}: model: {e}") from None
  builder.apply = model.apply
  for note in builder.check(model.params):
    print(f"fedjax-sim: {note}")
  evaluate = evaluation.make_evaluator(model.apply, test=task.test, client_test=task.client_test)
  if "backdoor" in (settings.get("attack"), *config.static.get("attack", ())):
    # every row then reports backdoor accuracy, as `fedjax-sim run` does (the rows without
    # the attack: the clean model's, a baseline)
    evaluate = aggregation_options.with_backdoor(
        evaluate, model.apply, task.test, aggregation_options.backdoor_trigger(task.train.x))
  if config.plot:
    metrics = ["train_loss", *evaluate(model.params)]
    if config.plot not in metrics:
      raise sweep_config.ConfigError(f"{config.source}: plot: no metric {config.plot!r}; "
                                     f"choose from {', '.join(metrics)}")
  stem = os.path.splitext(os.path.basename(config.source))[0]
  output = args.output or config.output or os.path.join("runs", f"sweep-{stem}")
  run_dir.check_output(output)
  checkpoint_dir = os.path.join(output, run_dir.CHECKPOINTS)
  config_path = os.path.join(output, "config.json")
  resume = f"fedjax-sim sweep --config {shlex.quote(args.config)} --resume" + (
      f" --output {shlex.quote(args.output)}" if args.output else "")
  if os.path.exists(os.path.join(output, "metrics.jsonl")):
    raise run_dir.RunDirError(f"{output!r} holds a run of `fedjax-sim run`, not a sweep: "
                              f"give the sweep another --output")
  without_plot = lambda c: {k: v for k, v in c.items() if k != "plot"}  # no result's
  same_config = lambda: without_plot(run_dir.read_json(config_path) or {}) == without_plot(
      json.loads(json.dumps(config.to_json())))
  if args.resume:
    if not os.path.isdir(checkpoint_dir):
      raise run_dir.RunDirError(f"--resume: {output!r} holds no checkpoints of a sweep")
    if not same_config():
      raise run_dir.RunDirError(f"--resume: {config_path} is not {args.config}'s sweep (the "
                                f"config changed since): run it without --resume elsewhere")
  elif run_dir.is_sweep(output) and not same_config():
    # Its results were deleted before the new sweep had produced any.
    raise run_dir.RunDirError(f"{output!r} holds the results of another sweep: give this one "
                              f"another --output, or remove them")
  elif os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
    raise run_dir.RunDirError(f"{output!r} holds an unfinished sweep: continue it with "
                              f"`{resume}`, or remove {checkpoint_dir!r} to start over")
  else:  # a finished sweep's results go before the new config.json: never read as its own
    for name in SWEEP_RESULTS:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output, name))
    for name in glob.glob(os.path.join(glob.escape(output), "*.png")):
      os.remove(name)
  os.makedirs(output, exist_ok=True)
  checkpoint_lib.write_json_atomic(config_path, config.to_json())
  configurations = math.prod(len(v) for v in [*config.grid.values(), *config.static.values()])
  groups = math.prod(len(v) for v in config.static.values())
  print(f"fedjax-sim: sweeping {configurations} configuration(s) x {len(config.seeds)} seed(s) "
        f"for {settings['rounds']} rounds, {groups} compiled program(s)")
  start = time.perf_counter()
  try:
    result = run_sweep(
        builder.factory(), model.params, task.train,
        grid=config.grid, seeds=config.seeds, static=config.static or None,
        rounds=settings["rounds"], rounds_per_chunk=settings["eval_every"], evaluate=evaluate,
        num_clients=task.train.num_clients, checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume)
  except runner.Interrupted as e:
    e.resume_command = resume
    raise
  seconds = time.perf_counter() - start
  for row in result.rows:
    epsilon = builder.epsilon(row)
    if epsilon is not None:
      row["final_epsilon"] = epsilon
  summary = sweep_config.write_results(
      result, config, output, {"seconds": round(seconds, 3), "device": str(jax.devices()[0]),
                               "jax": jax.__version__,
                               "model": settings["model"] or task.default_model})
  if config.plot:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    figure = Figure(figsize=(8, 4.5))
    ax = figure.subplots()
    result.plot(config.plot, ax=ax)  # a colour per configuration, a line style per seed
    ax.set_title(f"{config.task}, {config.label}: {len(result.rows)} rows")
    figure.savefig(os.path.join(output, f"{config.plot}.png"), dpi=120, bbox_inches="tight")
  # Only now, with the results written (a stop while epsilon is computed for every row
  # lost a finished sweep): they hold what a rerun needs; the checkpoints served a resume.
  shutil.rmtree(checkpoint_dir, ignore_errors=True)
  keys = [*config.static, *config.grid, "seed"]
  shown = [c for c in ("final_test_accuracy", "best_test_accuracy", "final_train_loss",
                       "final_epsilon", "diverged") if c in result.rows[0]]
  _print_table(result.rows, keys + shown)
  best = summary.get("best")
  best_text = ""
  if best:
    best_text = "; best " + ", ".join(f"{k}={best[k]}" for k in keys) + \
        f": {best['by']} {best[best['by']]:.4f}"
  diverged = [i for i, r in enumerate(result.rows) if r.get("diverged")]
  if diverged:
    print(f"fedjax-sim: {len(diverged)} row(s) diverged ({runner.DIVERGENCE_RULE}): "
          + ", ".join(f"{i} at round {result.rows[i]['diverged_round']}" for i in diverged)
          + " (rows counting from 0; column 'diverged' in results.csv)")
  print(f"done: {len(result.rows)} rows x {settings['rounds']} rounds in {seconds:.1f} s"
        f"{best_text}; results in {output}")
  return summary


def _format_seconds(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds:.1f} s ({seconds / 3600:.2f} h)"
  if seconds >= 60:
    return f"{seconds:.1f} s ({seconds / 60:.1f} min)"
  return f"{seconds:.2f} s"


# What a finished sweep writes besides config.json (and its plot, METRIC.png).
SWEEP_RESULTS = ("results.csv", "curves.npz", "summary.json")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
                argv: list[str] | None = None) -> dict:
  parser = parser or build_parser()
  run_dir.check_flags(args)
  resuming = args.resume is not None
  if resuming:  # the flags of the run's config.json
    args = run_dir.resume_args(parser, args, sys.argv[1:] if argv is None else argv)
  # The folder and its checks use the flags as given (the checks below fill in defaults).
  output = args.output or run_dir.default_output(args)
  identity = run_dir.config_hash(args)
  run_dir.check_output(output)
  if not resuming:  # a folder that cannot be written, or holds another run: before loading
    run_dir.check_folder(output, args, parser)
  run_options.check_flags(args)  # flag values and combinations, before loading anything
  writers_lib.check(args)  # a missing writer package: one line naming its extra
  if args.tensorboard:  # its own folder, written from the first chunk
    run_dir.check_output(args.tensorboard, "--tensorboard")
  epochs = args.epochs if args.epochs is not None or args.steps is not None else 1
  options = {name: getattr(args, name) for name in TASK_OPTIONS
             if getattr(args, name) is not None}
  task = tasks.load_task(args.task, seed=args.seed, **options)
  train = task.train
  run_options.check_with_data(args, train.num_clients)
  server_data = None
  if args.server_examples is not None:
    train, *server_data = run_options.hold_out_server_examples(
        train, args.server_examples, seed=args.data_seed or 0)
  model = run_options.make_model(task, args)
  params = model.params
  if args.init_params is not None:
    try:
      params = warm_start.load_params(args.init_params, params)
    except (ValueError, OSError, KeyError) as e:
      raise ValueError(f"--init-params: {e}") from None
  setup = aggregation_options.build(args, num_clients=train.num_clients,
                                    num_classes=task.num_classes, train_x=train.x,
                                    rounds=args.rounds)
  profiles = run_options.build_profiles(args, train.num_clients)
  systems_config = run_options.build_systems(args, profiles, setup.aggregator)
  # Every synchronous algorithm takes every feature; the engine's refusals (a reducer that
  # ignores the weights under a ratio rule or systems) are ValueErrors before compiling.
  algorithm = build_algorithm(
      args.algorithm, model.apply, client_optimizer=args.client_optimizer,
      server_optimizer=args.server_optimizer, clients_per_round=args.clients_per_round,
      batch_size=args.batch_size, epochs=epochs, steps=args.steps, weighting=args.weighting,
      client_chunk_size=args.client_chunk_size, aggregator=setup.aggregator,
      client_data_transform=setup.client_data_transform, concurrency=args.concurrency,
      staleness=args.staleness, profiles=profiles if args.algorithm == "fedbuff" else None,
      num_clients=train.num_clients, systems=systems_config,
      **registry.algorithm_hparams(args))
  evaluate = aggregation_options.with_backdoor(
      evaluation.make_evaluator(model.apply, test=task.test, client_test=task.client_test),
      model.apply, task.test, setup.backdoor)
  key = jax.random.key(args.seed)
  # The run's checks (which fs.run makes again), before the warm start compiles and before
  # anything is written to the run folder.
  algorithm.validate(algorithm.init(params, key, train.num_clients), train)
  runner.check_evaluator(evaluate, params)
  notes = list(setup.notes)
  # A reducer that ignores the weights counts every client once, whatever --weighting says
  # (the engine's rule): say so, and record what ran.
  weighting_used = args.weighting
  if args.weighting == "examples" and aggregators.ignores_weights(setup.aggregator):
    weighting_used = "uniform"
    reducer = ("DP's mean" if setup.accountant is not None
               else f"--aggregator {args.aggregator}")
    notes.append(f"{reducer} counts every client once: the weighting is uniform, not by "
                 f"examples")
  for note in notes:
    print(f"fedjax-sim: {note}")
  if profiles is not None:
    speed = systems.describe(profiles)["examples_per_s"]
    source = args.profiles or f"drawn with seed {args.profiles_seed or 0}"
    print(f"fedjax-sim: client profiles ({source}): examples/s median {speed['median']:.4g}, "
          f"10th-90th percentile {speed['p10']:.4g}-{speed['p90']:.4g}")
  try:
    if not resuming:
      run_dir.clear(output)  # --overwrite, or a finished run of this configuration again
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise run_dir.RunDirError(f"--output {output!r}: {e.strerror or e}") from None
  config = {k: v for k, v in vars(args).items() if k != "command"}
  config.update(model=args.model or task.default_model, epochs=epochs,
                device=str(jax.devices()[0]), weighting_used=weighting_used)
  if setup.accountant is not None:  # what DP ran with: the defaults, the noise and the
    # rounds --target-epsilon leaves (config's rounds and noise_multiplier are the flags',
    # as a sweep's rows have them, so that `plot` and `runs` see the same configuration)
    config.update(dp_delta=setup.accountant.delta, dp_accountant=setup.accountant.accountant,
                  dp_rounds=setup.rounds, dp_noise_multiplier=setup.noise_multiplier)
  if profiles is not None:
    config["profiles_summary"] = systems.describe(profiles)
  # The command line itself: `--resume` parses it again.
  config.update(argv=list(sys.argv[1:] if argv is None else argv),
                config_hash=identity, file_sha256=run_dir.file_digests(args),
                cwd=os.getcwd())  # what relative paths in argv are relative to
  if args.wandb is not None:  # the W&B run of this folder, which a resumed run continues
    kept = run_dir.read_json(os.path.join(output, "config.json")) if resuming else None
    config["wandb_id"] = ((kept or {}).get("wandb_id")
                          or f"{identity}-{uuid.uuid4().hex[:8]}")
  if not resuming:  # a resumed run keeps the config.json it continues
    checkpoint_lib.write_json_atomic(os.path.join(output, "config.json"), config)
  warm = None
  if args.warm_start_steps is not None:
    lr = args.client_lr if args.warm_start_lr is None else args.warm_start_lr
    params, warm = warm_start.pretrain(
        params, model.apply, *server_data,
        optimizer=optimizers.client_optimizer(
            args.client_optimizer, lr, **({} if args.client_momentum is None
                                          else {"momentum": args.client_momentum})),
        batch_size=min(args.batch_size, args.server_examples), steps=args.warm_start_steps,
        key=run_options.warm_start_key(args.seed))
    warm.update(server_examples=args.server_examples, **evaluate(params))
    accuracy = (f", test accuracy {warm['test_accuracy']:.4f}" if "test_accuracy" in warm
                else "")
    print(f"fedjax-sim: warm start: {warm['server_steps']} steps on {args.server_examples} "
          f"server examples, training loss {warm['server_train_loss']:.4f}{accuracy}")
  state = algorithm.init(params, key, train.num_clients)
  summary_path = os.path.join(output, "summary.json")
  writers = writers_lib.from_args(args, output, config)  # started before compiling
  try:
    state, _ = runner.run(algorithm, state, train, rounds=setup.rounds,
                          rounds_per_chunk=args.eval_every, evaluate=evaluate,
                          metrics_path=os.path.join(output, "metrics.jsonl"),
                          summary_path=summary_path, progress=not args.no_progress,
                          round_metrics=setup.accountant,
                          checkpoint_dir=os.path.join(output, run_dir.CHECKPOINTS),
                          checkpoint_every=args.checkpoint_every,
                          keep_checkpoints=args.keep_checkpoints, resume=resuming,
                          callbacks=writers)
  except runner.Interrupted as e:
    e.resume_command = run_dir.resume_command(output)
    raise
  with open(summary_path) as f:
    summary = json.load(f)
  changed = False
  if warm is not None:
    summary["warm_start"] = warm
    changed = True
  if args.save_params is not None:
    warm_start.save_params(args.save_params, state.params)
    summary["saved_params"] = args.save_params
    changed = True
  if args.algorithm in ("ditto", "fedrep") and task.client_test is not None:
    if args.algorithm == "ditto":  # each client's own model
      personal = evaluation.make_personalized_evaluator(model.apply, task.client_test)(
          state.client_states)
    else:  # the shared body with each client's own head
      personal = fedrep_personalized_evaluator(model.apply, task.client_test)(state)
    summary["personalized"] = personal
    changed = True
    print(f"{args.algorithm}'s personalized models: client test accuracy "
          f"{personal['personal_client_test_accuracy']:.4f}")
  if changed:
    checkpoint_lib.write_json_atomic(summary_path, summary)
  final = summary.get("final", {})
  simulated = (f"; simulated time {_format_seconds(final['sim_time_s'])}"
               if "sim_time_s" in final else "")
  print(f"done: {summary['rounds']} rounds in {summary['seconds']:.1f} s{simulated}; "
        f"train loss {final.get('train_loss', float('nan')):.4f}, "
        f"test accuracy {final.get('test_accuracy', float('nan')):.4f}; "
        f"results in {output}")
  return summary


class _Terminated(KeyboardInterrupt):
  """SIGTERM before the rounds start (during them `runner.run` defers it)."""


def _terminate(signum, frame):
  raise _Terminated


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command in ("run", "sweep") and not args.no_compile_cache and \
      os.environ.get("FEDJAX_SIM_COMPILE_CACHE", "").lower() not in ("0", "off", "false"):
    run_dir.enable_compile_cache()
  in_main_thread = threading.current_thread() is threading.main_thread()
  # An ignored SIGTERM stays ignored, as fs.run keeps it.
  catch_term = in_main_thread and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
  previous_term = signal.signal(signal.SIGTERM, _terminate) if catch_term else None
  try:
    with warnings.catch_warnings():  # the CLI prints its own line for these
      warnings.simplefilter("ignore", privacy.DPNoiseWarning)
      if args.command == "run":
        run_command(args, parser, argv)
      elif args.command == "sweep":
        sweep_command(args)
      elif args.command == "plot":
        cli_results.plot_command(args)
      elif args.command == "runs":
        cli_results.runs_command(args)
  except (ValueError, FloatingPointError, FileNotFoundError, ImportError) as e:
    print(f"fedjax-sim: error: {e}", file=sys.stderr)
    return 2
  except runner.Interrupted as e:  # one line, no traceback
    name = signal.Signals(e.signum).name
    command = getattr(e, "resume_command", None)
    then = f"; resume with: {command}" if command else ""
    print(f"fedjax-sim: {name}: stopped after round {e.round}"
          f"{' (checkpointed)' if e.checkpoint else ''}{then}", file=sys.stderr)
    return e.exit_code
  except _Terminated:
    print("fedjax-sim: stopped by SIGTERM; files already written are kept", file=sys.stderr)
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    print("fedjax-sim: stopped by SIGINT; files already written are kept", file=sys.stderr)
    return 128 + signal.SIGINT
  finally:
    if previous_term is not None:
      signal.signal(signal.SIGTERM, previous_term)
  return 0


if __name__ == "__main__":
  sys.exit(main())
