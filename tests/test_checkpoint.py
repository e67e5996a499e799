"""Checkpoints and exact resume: CLI runs killed (SIGKILL), interrupted (SIGINT, SIGTERM)
at a random round and resumed equal the uninterrupted run, metrics line for line and
final parameters bit for bit (FedAvg with DP, whose epsilon continues; SCAFFOLD, with
per-client state, in a systems run, whose simulated time continues); the persistent
compilation cache is hit
by the second run; fs.run's checkpoints from Python (typed keys, the last K kept, a
corrupt checkpoint skipped for the previous one, callbacks told of an interruption).

Each CLI run is a subprocess (~3-5 s of jax import and compiling); the runs of one
configuration share one compilation cache folder, and each scenario's runs are made
once (module fixtures) for all of its assertions."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint as checkpoint_lib
from fedjax_sim import runner

REPO = pathlib.Path(__file__).parents[1]
# The CLI in a subprocess, counting persistent-cache hits and misses (compilations) into
# $COUNTS (jax.monitoring: jax 0.10 and 0.12 both record these events).
RUN_CLI = """
import json, os, sys, jax
counts = {"cache_hits": 0, "cache_misses": 0}
def event(name, **kw):
  for kind in counts:
    if name == "/jax/compilation_cache/" + kind:
      counts[kind] += 1
jax.monitoring.register_event_listener(event)
from fedjax_sim import cli
code = cli.main(sys.argv[1:])
with open(os.environ["COUNTS"], "w") as f:
  json.dump(counts, f)
sys.exit(code)
"""
# Random rounds to stop at, drawn once per session but reproducibly (printed on failure).
SEED = int(os.environ.get("FEDJAX_SIM_TEST_KILL_SEED", "14"))
# 6 chunks of 2 rounds, a checkpoint every other chunk (a SIGKILL loses the rounds since
# the last one: the resumed run rewrites them); a stop lands mid-run.
ROUNDS = 12


class Cli:
  def __init__(self, tmp: pathlib.Path):
    self.tmp = tmp
    self.env = {**os.environ, "PYTHONPATH": str(REPO),
                "FEDJAX_SIM_COMPILE_CACHE": str(tmp / "compile-cache"), "JAX_PLATFORMS": "cpu"}
    self.runs = 0

  def start(self, argv):
    self.runs += 1
    counts = self.tmp / f"counts{self.runs}.json"
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *argv], cwd=self.tmp,
                            env={**self.env, "COUNTS": str(counts)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.counts_path = counts
    return proc

  def finish(self, proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    counts = json.loads(proc.counts_path.read_text()) if proc.counts_path.exists() else None
    return proc.returncode, out, err, counts

  def stop_at(self, proc, output: pathlib.Path, lines: int, sig: int):
    """Sends `sig` to the CLI run `proc` once its metrics file has `lines` lines."""
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      if metrics.exists() and metrics.read_bytes().count(b"\n") >= lines:
        proc.send_signal(sig)
        break
      time.sleep(0.005)
    result = self.finish(proc)
    summary = output / "summary.json"
    return dict(result=result, metrics=metrics.read_bytes(),
                summary=json.loads(summary.read_text()) if summary.exists() else None,
                lines=lines, output=output)


def params_of(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def run_args(flags, output, tmp):
  return ["run", "--rounds", str(ROUNDS), "--eval-every", "2", "--clients-per-round", "5",
          "--checkpoint-every", "4", "--no-progress", *flags, "--output", str(tmp / output),
          "--save-params", str(tmp / f"{output}.npz")]


def stop_round(name):
  """A random number of metrics lines to stop at (mid-run), reproducible from SEED."""
  return random.Random(f"{SEED}-{name}").randint(2, ROUNDS - 4)


def scenario(tmp, flags, stops, reference_flags=()):
  """The uninterrupted run and, beside it, runs stopped by each signal of `stops` at a
  random round, then their resumes. Runs that do not depend on each other overlap."""
  cli = Cli(tmp)
  reference = cli.start(run_args([*flags, *reference_flags], "full", tmp))
  stopped, pending = {}, None
  for name, sig in stops.items():
    proc = cli.start(run_args(flags, name, tmp))
    stopped[name] = cli.stop_at(proc, tmp / name, stop_round(name), sig)
    if pending is not None:
      stopped[pending]["resumed"] = cli.finish(stopped[pending].pop("resume"))
    stopped[name]["resume"] = cli.start(["run", "--resume", str(tmp / name), "--no-progress"])
    pending = name
    if not isinstance(reference, tuple):
      reference = cli.finish(reference)
      assert reference[0] == 0, reference[2]
  stopped[pending]["resumed"] = cli.finish(stopped[pending].pop("resume"))
  return dict(tmp=tmp, full=tmp / "full", reference=reference, **stopped)


def assert_identical(s, name):
  run = s[name]
  assert run["resumed"][0] == 0, run["resumed"][2]
  cut = run["output"]
  assert (cut / "metrics.jsonl").read_bytes() == (s["full"] / "metrics.jsonl").read_bytes(), \
      f"stopped at {run['lines']} lines (FEDJAX_SIM_TEST_KILL_SEED={SEED})"
  a, b = params_of(s["tmp"] / "full.npz"), params_of(s["tmp"] / f"{name}.npz")
  assert a.keys() == b.keys()
  for leaf in a:
    np.testing.assert_array_equal(a[leaf], b[leaf])  # bit for bit
  full = json.loads((s["full"] / "summary.json").read_text())
  resumed = json.loads((cut / "summary.json").read_text())
  assert resumed["status"] == "completed" and resumed["rounds"] == ROUNDS
  assert resumed["final"] == full["final"]


DP = ["--noise-multiplier", "0.5", "--clip", "1.0"]


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
  """FedAvg with DP (the accountant's epsilon), stopped by SIGKILL and by SIGINT."""
  return scenario(tmp_path_factory.mktemp("fedavg"), DP,
                  {"killed": signal.SIGKILL, "interrupted": signal.SIGINT})


def test_sigkill_at_a_random_round_then_resume_equals_the_uninterrupted_run(fedavg):
  killed = fedavg["killed"]
  assert killed["result"][0] == -signal.SIGKILL  # killed mid-run, not finished
  # Never half a line: every line the kill left is a whole JSON row.
  text = killed["metrics"].decode()
  assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
  assert_identical(fedavg, "killed")


def test_sigint_stops_at_a_chunk_with_one_line_and_exit_130_then_resumes(fedavg):
  run = fedavg["interrupted"]
  code, out, err, _ = run["result"]
  assert code == 130, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert f"--resume {run['output']}" in err
  assert run["summary"]["status"] == "interrupted"
  rows = [json.loads(line) for line in run["metrics"].decode().splitlines()]
  stopped_round = int(err.split("after round ")[1].split()[0])
  # Every finished round was written, up to the chunk boundary it stopped at.
  assert [r["round"] for r in rows] == list(range(1, stopped_round + 1))
  assert stopped_round % 2 == 0 and "test_accuracy" in rows[-1]
  assert run["summary"]["rounds"] == stopped_round
  assert_identical(fedavg, "interrupted")


def test_dp_epsilon_continues_after_resume(fedavg):
  # Identical lines (above) include epsilon; here: it grows through the resumed rounds.
  rows = [json.loads(line) for line in (fedavg["killed"]["output"] / "metrics.jsonl")
          .read_text().splitlines()]
  epsilon = [r["epsilon"] for r in rows]
  assert len(epsilon) == ROUNDS and all(b > a for a, b in zip(epsilon, epsilon[1:]))


def test_compilation_cache_is_hit_by_the_second_run(fedavg):
  first, later = fedavg["reference"][3], fedavg["interrupted"]["result"][3]
  # The first runs (side by side) fill a fresh cache folder; the SIGINT run, started after
  # the first finished, finds every program there and compiles none.
  assert first["cache_misses"] > 0, first
  assert later["cache_hits"] >= 3 and later["cache_misses"] == 0, later
  assert os.listdir(fedavg["tmp"] / "compile-cache")


@pytest.fixture(scope="module")
def scaffold_systems(tmp_path_factory):
  """SCAFFOLD (per-client control variates) with a deadline (the simulated clock),
  stopped by SIGTERM; its reference run without the compilation cache."""
  return scenario(tmp_path_factory.mktemp("scaffold_systems"),
                  ["--algorithm", "scaffold", "--deadline", "0.5"],
                  {"terminated": signal.SIGTERM}, reference_flags=["--no-compile-cache"])


def test_scaffold_systems_run_stopped_by_sigterm_resumes_and_sim_time_continues(
    scaffold_systems):
  code, _, err, _ = scaffold_systems["terminated"]["result"]
  assert code == 143 and "Traceback" not in err and "SIGTERM" in err, err
  assert_identical(scaffold_systems, "terminated")
  rows = [json.loads(line) for line in (scaffold_systems["terminated"]["output"]
                                        / "metrics.jsonl").read_text().splitlines()]
  sim_time = [r["sim_time_s"] for r in rows]
  assert len(sim_time) == ROUNDS and all(b > a for a, b in zip(sim_time, sim_time[1:]))
  assert all("control_variate_norm" in r for r in rows)
  # --no-compile-cache: the cache is not even looked at.
  assert scaffold_systems["reference"][3] == {"cache_hits": 0, "cache_misses": 0}


# --- fs.run from Python. ---


@pytest.fixture(scope="module")
def setup():
  task = fs.load_task("synthetic", seed=0)
  model = task.make_model("logreg", 0)
  algorithm = fs.build_algorithm("fedbuff", model.apply, client_optimizer="sgd",
                                 server_optimizer="fedavg", clients_per_round=3, batch_size=10,
                                 epochs=1, num_clients=task.train.num_clients, client_lr=0.05)
  state = algorithm.init(model.params, jax.random.key(0), task.train.num_clients)
  return algorithm, state, task.train, fs.make_evaluator(model.apply, test=task.test)


def leaves(state):
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree_util.tree_leaves(state)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, reading
def test_python_checkpoints_keys_keep_and_corrupt_fallback(setup, tmp_path, capsys):
  algorithm, state, train, evaluate = setup
  kw = dict(rounds=8, rounds_per_chunk=2, evaluate=evaluate, progress=False)
  full, history = fs.run(algorithm, state, train, metrics_path=tmp_path / "full.jsonl", **kw)
  ckpt = tmp_path / "ckpt"
  fs.run(algorithm, state, train, metrics_path=tmp_path / "cut.jsonl", checkpoint_dir=ckpt,
         checkpoint_every=2, keep_checkpoints=3, **kw)
  assert sorted(int(p) for p in os.listdir(ckpt)) == [4, 6, 8]  # the last 3 kept
  # Typed keys (FedBuff's state holds a key per client in flight) come back typed.
  restored, record = fs.restore(ckpt, state)
  assert record["round"] == 8 and restored.key.dtype == state.key.dtype
  assert restored.algorithm_state.keys.dtype == state.algorithm_state.keys.dtype
  for a, b in zip(leaves(restored), leaves(full)):
    np.testing.assert_array_equal(a, b)
  # The newest checkpoint's largest file truncated (orbax cannot read it), and one byte
  # of the one before flipped (it reads, but not the bytes saved: the SHA-256 tells):
  # both are skipped with a message, round 4 is used.
  def largest(step):
    return max((p for p in (ckpt / str(step)).rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim = largest(8)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  victim = largest(6)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  capsys.readouterr()
  resumed, resumed_history = fs.run(algorithm, state, train, metrics_path=tmp_path / "cut.jsonl",
                                    checkpoint_dir=ckpt, resume=True, checkpoint_every=2,
                                    keep_checkpoints=3, **kw)
  err = capsys.readouterr().err
  assert "8 is corrupt or partial" in err and "previous one (round 6)" in err, err
  assert "6 is corrupt or partial (its arrays do not match" in err, err
  assert "previous one (round 4)" in err, err
  assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
  for a, b in zip(leaves(resumed), leaves(full)):
    np.testing.assert_array_equal(a, b)
  assert [r["round"] for r in resumed_history] == list(range(1, 9))
  # The resumed run wrote its rounds 6 and 8 over the corrupt ones (orbax refused any
  # round below the corrupt 8, silently, while it was there).
  assert sorted(int(p) for p in os.listdir(ckpt)) == [4, 6, 8]
  for step in (6, 8):
    assert checkpoint_lib.Checkpoints(str(ckpt)).restore(state, step)[1]["round"] == step
  # A checkpoint folder is continued only on purpose, with the same chunks.
  with pytest.raises(ValueError, match="resume=True to continue it"):
    fs.run(algorithm, state, train, checkpoint_dir=ckpt, **kw)
  with pytest.raises(ValueError, match="rounds_per_chunk=2"):
    fs.run(algorithm, state, train, checkpoint_dir=ckpt, resume=True,
           **{**kw, "rounds_per_chunk": 4})


def test_python_interrupt_checkpoints_and_tells_callbacks(setup, tmp_path):
  algorithm, state, train, _ = setup
  # Python's handler, as in a foreground process (a shell's background job ignores SIGINT).
  before = signal.signal(signal.SIGINT, signal.default_int_handler)

  class Stop:
    ended = None

    def on_rounds(self, rows):
      if rows[-1]["round"] == 4:
        signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, mid-run

    def on_end(self, summary):
      Stop.ended = summary

  try:
    with pytest.raises(fs.Interrupted) as info:
      fs.run(algorithm, state, train, rounds=8, rounds_per_chunk=2, progress=False,
             checkpoint_dir=tmp_path / "c", checkpoint_every=0, callbacks=[Stop()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
  finally:
    signal.signal(signal.SIGINT, before)
  assert info.value.round == 4 and info.value.exit_code == 130
  assert Stop.ended["status"] == "interrupted" and Stop.ended["rounds"] == 4
  assert checkpoint_lib.Checkpoints(tmp_path / "c").steps() == [4]
  _, history = fs.run(algorithm, state, train, rounds=8, rounds_per_chunk=2, progress=False,
                      checkpoint_dir=tmp_path / "c", resume=True)
  assert [r["round"] for r in history] == list(range(1, 9))


def test_an_ignored_sigint_stays_ignored(setup):
  algorithm, state, train, _ = setup

  class CtrlC:
    def on_rounds(self, rows):
      if rows[-1]["round"] == 2:
        signal.raise_signal(signal.SIGINT)

  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    _, history = fs.run(algorithm, state, train, rounds=4, rounds_per_chunk=2,
                        progress=False, callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  except fs.Interrupted:  # a KeyboardInterrupt: left alone, it would stop pytest itself
    pytest.fail("the run obeyed a SIGINT the process ignores")
  finally:
    signal.signal(signal.SIGINT, before)
  assert [r["round"] for r in history] == [1, 2, 3, 4]  # the run went on


def test_reading_a_run_s_checkpoints_leaves_its_unfinished_save_and_names_a_mismatch(
    setup, tmp_path):
  algorithm, state, train, _ = setup
  ckpt = tmp_path / "ckpt"
  fs.run(algorithm, state, train, rounds=2, rounds_per_chunk=2, progress=False,
         checkpoint_dir=ckpt, checkpoint_every=2)
  # A live run's save in progress: fs.restore's manager deleted it, and the run failed.
  saving = ckpt / "4.orbax-checkpoint-tmp-1760000000000000"
  saving.mkdir()
  assert fs.restore(ckpt, state)[1]["round"] == 2 and saving.is_dir()
  # Another dtype or shape was "every checkpoint is corrupt" (a user might delete them).
  wider = state._replace(params=jax.tree_util.tree_map(
      lambda a: jnp.zeros((a.shape[0] + 1, *a.shape[1:]), a.dtype), state.params))
  bf16 = state._replace(params=jax.tree_util.tree_map(
      lambda a: a.astype(jnp.bfloat16), state.params))
  for template, what in ((wider, r"shape \(10,\) and dtype float32, this run's has "
                                 r"\(11,\) float32"),
                         (bf16, r"shape \(10,\) and dtype float32, this run's has \(10,\) "
                                r"bfloat16")):
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"the state's \.params\[.* was saved "
                                                             r"with " + what):
      fs.restore(ckpt, template)


def test_a_session_s_summary_says_running_and_a_failed_evaluation_keeps_its_rounds(
    setup, tmp_path):
  algorithm, state, train, evaluate = setup
  summary_path = tmp_path / "summary.json"
  seen, calls = [], [0]

  class Peek:  # what a reader of the folder sees mid-run
    def on_rounds(self, rows):
      seen.append(json.loads(summary_path.read_text())["status"])

  def failing(params):  # the second evaluation fails, after the chunk's rounds trained
    calls[0] += 1
    if calls[0] == 2:
      raise MemoryError("evaluation ran out of memory")
    return evaluate(params)

  with pytest.raises(MemoryError):
    fs.run(algorithm, state, train, rounds=6, rounds_per_chunk=2, progress=False,
           evaluate=failing, metrics_path=tmp_path / "m.jsonl", summary_path=summary_path,
           callbacks=[Peek()])
  rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4] and "test_accuracy" not in rows[3]
  summary = json.loads(summary_path.read_text())
  assert summary["status"].startswith("failed: MemoryError") and summary["rounds"] == 4
  assert seen == ["running", "running"]
