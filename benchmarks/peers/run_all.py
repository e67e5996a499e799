"""Peers side by side: fedjax_sim, FedJAX 0.0.17, DrJAX 0.2.1, pfl-research 0.6.0, Flower 1.42.

The whole measurement is one command, from the repository root, with fedjax_sim
installed in the current python (`pip install -e .`) and the peers' environments made
once by `bash benchmarks/peers/setup_venvs.sh` (under $PEERS_VENVS, default ~/.venvs):

  python benchmarks/peers/run_all.py --repeats 3

It runs every case (per warm round and end to end: mlp600, mlp100, cnn100, scale1000;
time to a target accuracy: tta_mlp600) and writes benchmarks/results/peers_cpu.json,
.md and .png.

Each simulator runs in its own process (the peers in their own virtual environments,
see benchmarks/README.md), started one after another and interleaved, every other
repetition in reverse order and the order rotated every two (A, B, C, C, B, A, B, C, A,
A, C, B, ...: `run_order`), for `--repeats` repetitions, so that load from other work on
the machine, and the memory each worker's predecessor freed, fall on all of them alike;
before each worker the driver waits (at most 30 s) until the CPUs are nearly idle, since
Flower's Ray processes outlive its run and slowed whichever worker came next. Before
the first repetition every worker runs once untimed (`warm_up`; `--no-warm-up` skips it),
so that no timed run reads its packages from a cold disk, and every run records the
CPUs' disk and hypervisor waits while it ran (`waits_during`). The tables report
medians over repetitions, and ratios to fedjax_sim are taken within a repetition.

The task (common.py): the 2NN MLP or the FedAvg CNN on MNIST-shaped synthetic data,
`--num-clients` clients of `examples-per-client` examples, `--clients-per-round`
sampled per round (the scale case: 100 of 1,000), `--epochs` local epochs of batch
`--batch-size`, client SGD `--client-lr`, server FedAvg (learning rate 1,
example-weighted). Every simulator trains its own model from its own initialization on
exactly the same per-client examples.

Per run it records seconds per round after warm-up (median over rounds 2..R), the first
round (compilation, actor start-up), and end to end: from the launch of the process to
the end of round R, interpreter start, imports, data, model and compilation included;
in the time-to-accuracy case, the time from launch to the first round whose held-out
accuracy reaches the target (evaluated after every round by every simulator).

`--fedjax-python`, `--flower-python`, `--drjax-python`, `--pfl-python` (or
$FEDJAX_PYTHON, ... $PFL_PYTHON) point at other environments; `--cases` and
`--simulators` run a subset, `--merge` adds to an existing results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

# The time-to-accuracy case's target (accuracy on the 2,000 held-out examples of the
# teacher task) and its cap on rounds.
TTA_TARGET = 0.4
TTA_MAX_ROUNDS = 80
# pfl runs with torch at 1 thread (pfl_1thread) in every MLP case, and also at torch's
# default (one thread per core: pfl) in mlp100 and cnn100 only: at the default its MLP
# rounds slowed 5-25x whenever other processes shared the 2 cores (compare the two pfl
# rows of mlp100), which left a run's length unbounded on a busy machine (minutes per
# worker). fedjax_sim_scan (fedjax_sim at R/2 rounds per call) runs in mlp100 only.
# Cases: the task variants; rounds are fewer for the CNN, whose local training is
# ~100x the MLP's FLOPs and takes seconds per round on a small CPU.
# The CNN's compute-bound rounds gain nothing from more rounds per call or an
# epoch-jitted Flower client, so those rows are skipped for it.
CASES = {
    "mlp600": dict(model="mlp", examples_per_client=600, rounds=20,
                   skip=["fedjax_sim_scan", "flower_epoch", "pfl"]),
    "mlp100": dict(model="mlp", examples_per_client=100, rounds=20),
    # DrJAX's CNN (lax.conv vmapped over clients: a grouped convolution, which XLA:CPU
    # runs very slowly) takes minutes per round here: 2 rounds (the second timed), in
    # the first repetition only; its end to end is then not comparable.
    "cnn100": dict(model="cnn", examples_per_client=100, rounds=6,
                   skip=["fedjax_sim_scan", "flower_epoch", "pfl_1thread"],
                   sim_rounds={"drjax": 2, "drjax_opts": 2},
                   sim_repeats={"drjax": 1, "drjax_opts": 1}),
    # The scale case: 100 of 1,000 clients per round (10x the work of a round of mlp100).
    "scale1000": dict(model="mlp", examples_per_client=100, rounds=4, num_clients=1000,
                      clients_per_round=100,
                      skip=["fedjax_sim_scan", "flower_epoch", "pfl"]),
    # Time to a target accuracy (held-out set, evaluated after every round, inside the
    # timed loop, by every simulator alike): each run stops at the first round reaching
    # it, or after `rounds`. One round per call (no R/2-per-call variant).
    "tta_mlp600": dict(model="mlp", examples_per_client=600, rounds=TTA_MAX_ROUNDS,
                       eval_every=1, target_accuracy=TTA_TARGET,
                       skip=["fedjax_sim_scan", "flower_epoch", "pfl"]),
}
CASE_NAMES = {
    "mlp": "2NN MLP 784-200-200-10 (199,210 parameters)",
    "cnn": "FedAvg CNN, 5x5 conv 32/64, 512 dense (1,663,370 parameters)",
}
# Simulators: (label, which python, worker script, extra worker flags).
SIMULATORS = {
    "fedjax_sim": ("fedjax_sim", "fedjax_sim", "run_fedjax_sim.py", []),
    # Half the rounds per compiled call: the first call compiles, the second is timed.
    "fedjax_sim_scan": ("fedjax_sim, R/2 rounds per call", "fedjax_sim", "run_fedjax_sim.py",
                        lambda rounds: ["--rounds-per-call", str(rounds // 2)]),
    # The same worker with jax's persistent compilation cache (fs.enable_compile_cache)
    # filled by an untimed run of the same case first: what a repeated command, a sweep
    # of one configuration or a rerun notebook pays (the CLI turns the cache on).
    "fedjax_sim_cache": ("fedjax_sim, compilation cache filled by a run before",
                         "fedjax_sim", "run_fedjax_sim.py", []),
    "fedjax": ("FedJAX 0.0.17", "fedjax", "run_fedjax.py", []),
    "flower": ("Flower 1.42", "flower", "run_flower.py", []),
    "flower_epoch": ("Flower 1.42, epoch-jitted client", "flower", "run_flower.py",
                     ["--client-loop", "epoch"]),
    "drjax": ("DrJAX 0.2.1, plain jax.jit", "drjax", "run_drjax.py", []),
    "drjax_opts": ("DrJAX 0.2.1, fedjax_sim's CPU compiler options", "drjax", "run_drjax.py",
                   ["--compiler-options", "fedjax_sim"]),
    "pfl": ("pfl-research 0.6.0 (PyTorch)", "pfl", "run_pfl.py", []),
    "pfl_1thread": ("pfl-research 0.6.0, 1 torch thread", "pfl", "run_pfl.py",
                    ["--torch-threads", "1"]),
}
# flower_epoch (the fastest a Flower client can train; within a few % of `flower` in
# every run so far) is left out by default to keep the whole run within ~20 minutes.
DEFAULT_SIMULATORS = ["fedjax_sim", "fedjax_sim_scan", "fedjax_sim_cache", "fedjax", "drjax",
                      "drjax_opts", "pfl", "pfl_1thread", "flower"]
# Each environment's python: flag, environment variable, default under the venv root.
ENVS = ("fedjax", "flower", "drjax", "pfl")
VENV_ROOT = os.environ.get("PEERS_VENVS", "~/.venvs")
# The simulator that speedups are quoted against fedjax_sim for.
BASELINE = "fedjax_sim"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--simulators", nargs="+", default=DEFAULT_SIMULATORS, choices=list(SIMULATORS))
  p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
  p.add_argument("--rounds", type=int, default=None,
                 help="override every case's rounds but the time-to-accuracy case's cap "
                      "(an even number, for fedjax_sim_scan)")
  p.add_argument("--tta-target", type=float, default=TTA_TARGET,
                 help="the time-to-accuracy case's target held-out accuracy")
  p.add_argument("--tta-max-rounds", type=int, default=TTA_MAX_ROUNDS,
                 help="the time-to-accuracy case's cap on rounds")
  p.add_argument("--num-clients", type=int, default=common.DEFAULTS["num_clients"])
  p.add_argument("--clients-per-round", type=int, default=common.DEFAULTS["clients_per_round"])
  p.add_argument("--batch-size", type=int, default=common.DEFAULTS["batch_size"])
  p.add_argument("--epochs", type=int, default=common.DEFAULTS["epochs"])
  p.add_argument("--client-lr", type=float, default=common.DEFAULTS["client_lr"])
  p.add_argument("--seed", type=int, default=common.DEFAULTS["seed"])
  p.add_argument("--fedjax-sim-python", default=sys.executable,
                 help="python with fedjax_sim installed (default: this one)")
  for env in ENVS:
    p.add_argument(f"--{env}-python",
                   default=os.environ.get(f"{env.upper()}_PYTHON",
                                          os.path.join(VENV_ROOT, env, "bin", "python")),
                   help=f"python of {env}'s environment (default ${env.upper()}_PYTHON, "
                        f"else $PEERS_VENVS/{env}/bin/python, PEERS_VENVS defaulting to "
                        "~/.venvs; benchmarks/peers/setup_venvs.sh makes them)")
  p.add_argument("--uncapped", action="store_true",
                 help="run DrJAX's CNN for the case's rounds and repetitions like every "
                      "other simulator (its caps are for XLA:CPU's grouped convolution; "
                      "use on an accelerator)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
  p.add_argument("--output", default=os.path.join(HERE, "..", "results", "peers_cpu.json"))
  p.add_argument("--merge", action="store_true",
                 help="add this invocation's runs to those already in --output (same task "
                      "configuration) and summarize them all")
  p.add_argument("--first-repeat", type=int, default=None,
                 help="with --merge: number this run's repetitions from N (to pair a "
                      "re-run simulator with the file's runs of repetition N, N+1, ...)")
  p.add_argument("--readme-table", action="store_true",
                 help="print the README's compact table from --output and exit (no run)")
  p.add_argument("--no-warm-up", action="store_true",
                 help="skip the untimed run of every worker before the repetitions "
                      "(warm_up): the first repetition then reads packages from disk")
  p.add_argument("--log-dir", default=None,
                 help="where worker logs go (default: a fresh temporary folder)")
  return p.parse_args(argv)


def case_rounds(args, case: str, sim: str | None = None) -> int:
  c = CASES[case]
  if sim in c.get("sim_rounds", {}) and not args.uncapped:
    return c["sim_rounds"][sim]
  if args.rounds is not None and not is_tta(case):
    return args.rounds
  return c["rounds"]


def is_tta(case: str) -> bool:
  return "target_accuracy" in CASES[case]


def case_flags(args, case: str, sim: str, rounds: int | None = None) -> list[str]:
  c = dict(CASES[case], rounds=rounds or case_rounds(args, case, sim))
  flags = {"model": c["model"], "num-clients": c.get("num_clients", args.num_clients),
           "clients-per-round": c.get("clients_per_round", args.clients_per_round),
           "examples-per-client": c["examples_per_client"], "batch-size": args.batch_size,
           "epochs": args.epochs, "client-lr": args.client_lr, "server-lr": 1.0,
           "rounds": c["rounds"], "seed": args.seed}
  if is_tta(case):
    flags.update({"eval-every": c["eval_every"], "target-accuracy": c["target_accuracy"]})
  return [t for k, v in flags.items() for t in (f"--{k}", str(v))]


_PRIMED: set[tuple[str, str]] = set()  # (case, cache folder) filled by a primer run


def _cpu_jiffies() -> list[int] | None:
  """All CPUs' jiffies by state from /proc/stat's first line (user, nice, system, idle,
  iowait, irq, softirq, steal, ...; None where there is none)."""
  try:
    with open("/proc/stat") as f:
      return [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None


def _cpu_times() -> tuple[int, int] | None:
  """(idle, total) jiffies of all CPUs (None where there is no /proc/stat)."""
  values = _cpu_jiffies()
  return None if values is None else (values[3] + values[4], sum(values))  # idle + iowait


def waits_during(before: list[int] | None, after: list[int] | None) -> dict:
  """CPU seconds that all CPUs spent waiting on the disk (iowait) or on the hypervisor
  (steal) between two `_cpu_jiffies()` readings: on a VM, a worker whose packages are
  read from a cold disk, or whose CPUs were taken away, shows here and not in its load."""
  if before is None or after is None or len(after) < 8:
    return {}
  hz = os.sysconf("SC_CLK_TCK")
  return {"iowait_s": round((after[4] - before[4]) / hz, 2),
          "steal_s": round((after[7] - before[7]) / hz, 2)}


def wait_for_quiet(max_s: float = 30.0, busy_below: float = 0.15) -> dict:
  """Waits until the CPUs are nearly idle (busy below `busy_below` of all of them over
  half a second) or `max_s` passes: a worker that starts while the previous one's
  children still run (Ray's processes linger after Flower's run) would pay for them.
  Returns the wait and the last busy fraction, recorded with the run."""
  start, busy = time.time(), None
  while time.time() - start < max_s:
    a = _cpu_times()
    time.sleep(0.5)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
      break
    busy = 1.0 - (b[0] - a[0]) / (b[1] - a[1])
    if busy < busy_below:
      break
  return {"quiet_wait_s": round(time.time() - start, 2),
          "cpu_busy_before": None if busy is None else round(busy, 3)}


def worker_command(args, sim: str, case: str, output: str, extra=(),
                   rounds: int | None = None) -> list[str]:
  """The command line of `sim`'s worker on `case` (its own python), writing to `output`."""
  _, env_name, script, _ = SIMULATORS[sim]
  python = os.path.expanduser(getattr(args, f"{env_name}_python"))
  return [python, os.path.join(HERE, script), *case_flags(args, case, sim, rounds), *extra,
          "--output", output]


def run_untimed(args, cmd: list[str], log: str) -> int:
  """Runs a worker whose timings are not kept (a primer, a warm-up); its exit code."""
  with open(log, "w") as f:
    return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                          timeout=args.timeout).returncode


def run_worker(args, case: str, sim: str, rep: int, log_dir: str) -> dict:
  label, _, _, extra = SIMULATORS[sim]
  out = os.path.join(log_dir, f"{case}-{sim}-{rep}.json")
  log = os.path.join(log_dir, f"{case}-{sim}-{rep}.log")
  if callable(extra):
    extra = extra(case_rounds(args, case, sim))
  if sim == "fedjax_sim_cache":
    cache = os.path.join(log_dir, "compile_cache")
    extra = [*extra, "--compile-cache", cache]
    if (case, cache) not in _PRIMED:  # fill the cache: an untimed run of the same case
      run_untimed(args, worker_command(args, sim, case, os.path.join(
          log_dir, f"{case}-{sim}-{rep}-primer.json"), extra),
                  os.path.join(log_dir, f"{case}-{sim}-primer.log"))
      _PRIMED.add((case, cache))
  cmd = worker_command(args, sim, case, out, extra)
  quiet = wait_for_quiet()
  load_before = list(os.getloadavg())
  env = dict(os.environ)
  env[common.LAUNCH_ENV] = repr(time.time())
  jiffies = _cpu_jiffies()
  start = time.time()
  try:
    with open(log, "w") as f:
      proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            timeout=args.timeout)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    rc = "timeout"
  wall = time.time() - start
  waits = waits_during(jiffies, _cpu_jiffies())
  if rc == 0 and os.path.exists(out):
    with open(out) as f:
      res = json.load(f)
  else:
    with open(log) as f:
      tail = f.read()[-3000:]
    res = {"simulator": label, "error": f"exit {rc}", "log_tail": tail}
    print(f"    FAILED ({rc}); log tail:\n{tail}", flush=True)
  res.update(case=case, key=sim, label=label, repeat=rep, process_wall_s=wall,
             loadavg_before=load_before, **quiet, **waits)
  return res


def warm_up(args, log_dir: str) -> None:
  """One untimed 2-round run of the first case by every worker (every environment and
  script) before the timed repetitions: the first process to import a package reads it
  from disk, which on a VM took 6-55 s where the same worker took 3-6 s from the page
  cache, and that fell on the first repetition's workers alone."""
  done = set()
  for sim in args.simulators:
    cmd = worker_command(args, sim, args.cases[0], os.path.join(log_dir, f"warm-up-{sim}.json"),
                         rounds=2)
    if tuple(cmd[:2]) in done:  # the same python and script as a simulator before
      continue
    done.add(tuple(cmd[:2]))
    start = time.time()
    rc = run_untimed(args, cmd, os.path.join(log_dir, f"warm-up-{sim}.log"))
    print(f"[warm-up] {sim}: {time.time() - start:.1f} s" + (f" (exit {rc})" if rc else ""),
          flush=True)


def fixed_cost(run: dict) -> float:
  """A run's end to end less its rounds at the warm rate: launch, imports, setup and the
  first round's compilation (end to end ~ fixed + rounds x per round)."""
  t = run["timings"]
  rounds = len(t["per_round_s"]) * run.get("rounds_per_call", 1)
  return t["end_to_end_s"] - rounds * t["per_round_warm_median_s"]


def break_even(mine: dict, peer: dict) -> float | None:
  """Where fedjax_sim's end to end is the shorter, from the two runs' fixed costs and
  warm rates: 0 from the start on (never behind); x > 0 from round x on (it catches
  up); inf never; -x until round x (ahead at first, then the peer's faster rounds
  overtake it). None without warm rates."""
  rate = lambda run: run["timings"]["per_round_warm_median_s"]
  if not (rate(mine) and rate(peer)):
    return None
  extra, gain = fixed_cost(mine) - fixed_cost(peer), rate(peer) - rate(mine)
  if extra <= 0:
    if gain >= 0:
      return 0.0
    return -extra / gain if extra < 0 else float("inf")  # (both negative: > 0 rounds)
  return extra / gain if gain > 0 else float("inf")


def ahead(values: list) -> str:
  """The repetitions' break-even points (`break_even`) in words, by kind: "always",
  "after N rounds", "never", "until N rounds" (then behind), N the median of its kind,
  with counts where the repetitions differ in kind (a median across kinds, as this
  column took before, turned "always" and "never" into either, and dropped "until")."""
  values = [v for v in values if v is not None]
  kinds = {"always": [v for v in values if v == 0],
           "after": [v for v in values if 0 < v < math.inf],
           "never": [v for v in values if v == math.inf],
           "until": [-v for v in values if v < 0]}
  words = {"always": lambda xs: "always", "never": lambda xs: "never",
           "after": lambda xs: f"after {math.ceil(statistics.median(xs))} rounds",
           "until": lambda xs: f"until {math.ceil(statistics.median(xs))} rounds"}
  seen = [(k, xs) for k, xs in kinds.items() if xs]
  if not seen:
    return "-"
  if len(seen) == 1:
    return words[seen[0][0]](seen[0][1])
  return ", ".join(f"{words[k](xs)} ({len(xs)} of {len(values)})"
                   for k, xs in sorted(seen, key=lambda kv: -len(kv[1])))


def median(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def summarize(runs: list[dict], cases, sims) -> list[dict]:
  """One row per (case, simulator): medians over repetitions, and speedups of fedjax_sim
  as the median of per-repetition ratios (each pair from one repetition)."""
  rows = []
  for case in cases:
    base = {r["repeat"]: r for r in runs
            if r["case"] == case and r["key"] == BASELINE and "timings" in r}
    for sim in sims:
      mine = [r for r in runs if r["case"] == case and r["key"] == sim]
      ok = [r for r in mine if "timings" in r]
      if not mine:
        continue
      t = lambda name: [r["timings"][name] for r in ok]
      row = {"case": case, "simulator": sim, "label": SIMULATORS[sim][0],
             "runs": len(mine), "failed": len(mine) - len(ok)}
      if ok:
        row.update(
            model=ok[0]["task"]["model"], task=ok[0]["task"],
            steps_per_client=ok[0]["steps_per_client"], device=ok[0]["device"],
            packages=ok[0]["packages"],
            per_round_s=median(t("per_round_warm_median_s")),
            per_round_s_all=t("per_round_warm_median_s"),
            first_round_s=median(t("first_call_s")),
            imports_and_setup_s=median([r["timings"]["startup_s"]
                                        + r["timings"]["imports_and_setup_s"] for r in ok]),
            end_to_end_s=median(t("end_to_end_s")),
            end_to_end_s_all=t("end_to_end_s"),
            eval_loss_initial=median([r.get("eval_loss_initial") for r in ok]),
            eval_loss_final=median([r.get("eval_loss_final") for r in ok]),
        )
        if is_tta(case):
          reached = [r for r in ok if r.get("target_reached")]
          row.update(
              target_accuracy=CASES[case]["target_accuracy"], reached=len(reached),
              time_to_target_s=median([r["time_to_target_s"] for r in reached]),
              time_to_target_s_all=[r.get("time_to_target_s") for r in ok],
              rounds_to_target=median([r["rounds_to_target"] for r in reached]),
              rounds_to_target_all=[r.get("rounds_to_target") for r in ok])
          pairs = [(r, base[r["repeat"]]) for r in reached if r["repeat"] in base
                   and base[r["repeat"]].get("target_reached")]
          if pairs:
            row["time_to_target_over_fedjax_sim"] = median(
                [r["time_to_target_s"] / b["time_to_target_s"] for r, b in pairs])
        pairs = [(r, base[r["repeat"]]) for r in ok if r["repeat"] in base]
        if pairs:
          row["over_fedjax_sim_per_round"] = median(
              [r["timings"]["per_round_warm_median_s"] / b["timings"]["per_round_warm_median_s"]
               for r, b in pairs if r["timings"]["per_round_warm_median_s"]
               and b["timings"]["per_round_warm_median_s"]])
          if not is_tta(case):
            row["fedjax_sim_ahead_after_rounds_all"] = [break_even(b, r) for r, b in pairs]
          # Only between runs of the same number of rounds.
          row["over_fedjax_sim_end_to_end"] = median(
              [r["timings"]["end_to_end_s"] / b["timings"]["end_to_end_s"] for r, b in pairs
               if r["task"]["rounds"] == b["task"]["rounds"] and not is_tta(case)])
      rows.append(row)
  return rows


def _s(x):
  if x is None:
    return "-"
  return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def _x(x):
  return "-" if x is None else f"{x:.1f}x"


def _rounds(row: dict) -> str:
  if row["simulator"].startswith(BASELINE):  # fedjax_sim itself
    return "-"
  if "fedjax_sim_ahead_after_rounds_all" in row:
    return ahead(row["fedjax_sim_ahead_after_rounds_all"])
  x = row.get("fedjax_sim_ahead_after_rounds")  # a results file of before ahead()
  if x is None:
    return "-"
  return "always" if x == 0 else "never" if x == math.inf else f"{math.ceil(x)} rounds"


def waits_note(runs: list[dict]) -> list[str]:
  """The markdown's paragraph on the CPUs' disk and hypervisor waits during the workers
  (runs recorded before these were kept have none)."""
  measured = [r for r in runs if "iowait_s" in r]
  if not measured:
    return []
  span = lambda k: f"{min(r[k] for r in measured):.2f} to {max(r[k] for r in measured):.2f} s"
  note = (f"Waits: while each worker ran, the CPUs waited on the disk {span('iowait_s')} "
          f"(iowait) and on the hypervisor {span('steal_s')} (steal), all CPUs together; ")
  slow = [r for r in measured if r["iowait_s"] + r["steal_s"] > 1.0]
  if slow:
    worst = max(slow, key=lambda r: r["iowait_s"] + r["steal_s"])
    note += (f"{len(slow)} of {len(measured)} runs above 1 s together, the most {worst['case']} "
             f"{worst['label']} (repetition {worst['repeat'] + 1}: {worst['iowait_s']:.2f} s "
             f"iowait, {worst['steal_s']:.2f} s steal); the medians include them.")
  else:
    note += "no run above 1 s together."
  return [note, ""]


def markdown(result: dict) -> str:
  meta = result["meta"]
  cfg = meta["config"]
  loads = [r["loadavg_before"][0] for r in result["runs"]]
  reps = {}
  for r in result["runs"]:
    reps.setdefault(r["case"], set()).add(r["repeat"])
  accelerators = sorted({r["device"] for r in result["runs"]
                         if r.get("device", "cpu").split(":")[0] != "cpu"})
  where = (f"{', '.join(accelerators)}, with {meta['cpu_count']} CPUs ({meta['cpu_model']}); "
           "every JAX simulator on the accelerator" if accelerators else
           f"{meta['cpu_count']} CPUs ({meta['cpu_model']}), no accelerator; every "
           "simulator on the CPU")
  lines = [
      "# Peers side by side: fedjax_sim, FedJAX, DrJAX, pfl-research, Flower "
      f"({'GPU' if accelerators else 'CPU'})",
      "",
      f"Device: {where}. Invocations: " + "; ".join(
          f"{inv['date']}, commit {inv['git_commit']}: `{inv['command']}`"
          for inv in meta["invocations"]) + ".",
      "",
      f"Task: FedAvg, {cfg['num_clients']} clients, {cfg['clients_per_round']} per round, "
      f"{cfg['epochs']} local epoch(s) of batch {cfg['batch_size']}, client SGD lr "
      f"{cfg['client_lr']}, server FedAvg (lr 1), example-weighted; synthetic MNIST-shaped "
      "data (common.py: per-client numpy generators seeded by (seed, client), labels from "
      "a fixed random linear teacher), the same examples for every simulator"
      + ("; the scale case scale1000: 100 of 1,000 clients per round. "
         if "scale1000" in reps else ". ") +
      "Interleaved repetitions per case: " + ", ".join(
          f"{c} {len(v)}" for c, v in reps.items()) + "; each figure is the median over them.",
      "",
  ]
  if any(not is_tta(row["case"]) for row in result["summary"]):
    lines += [
        "| case | simulator | s/round (warm) | first round | imports + setup | end to end "
        "| per round / fedjax_sim | end to end / fedjax_sim | fedjax_sim ahead "
        "| eval loss | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
  for row in result["summary"]:
    if is_tta(row["case"]):
      continue
    c = CASES[row["case"]]
    task = row.get("task", {})
    rounds = task.get("rounds", c["rounds"])
    clients = (f"{task.get('clients_per_round', c.get('clients_per_round', '?'))} of "
               f"{task.get('num_clients', c.get('num_clients', '?'))} clients, "
               if "num_clients" in c else "")
    case = (f"{row['case']}: {c['model']}, {clients}{c['examples_per_client']} ex/client "
            f"({row.get('steps_per_client', '?')} steps), {rounds} rounds")
    if "per_round_s" not in row:
      lines.append(f"| {case} | {row['label']} | failed | | | | | | | | {row['runs']} |")
      continue
    loss = (f"{row['eval_loss_initial']:.3f} -> {row['eval_loss_final']:.3f}"
            if row.get("eval_loss_final") is not None else "-")
    fails = f" ({row['failed']} failed)" if row["failed"] else ""
    lines.append(
        f"| {case} | {row['label']} | {_s(row['per_round_s'])} | {_s(row['first_round_s'])} "
        f"| {_s(row['imports_and_setup_s'])} | {_s(row['end_to_end_s'])} "
        f"| {_x(row.get('over_fedjax_sim_per_round'))} "
        f"| {_x(row.get('over_fedjax_sim_end_to_end'))} "
        f"| {_rounds(row)} "
        f"| {loss} | {row['runs']}{fails} |")
  tta = [row for row in result["summary"] if is_tta(row["case"])]
  if tta:
    c = CASES[tta[0]["case"]]
    lines += [
        "",
        f"## Time to {c['target_accuracy']} held-out accuracy ({tta[0]['case']})",
        "",
        f"The {c['model']} case with {c['examples_per_client']} examples per client "
        f"({tta[0].get('steps_per_client', '?')} local steps), evaluated on the 2,000 "
        f"held-out examples after every round inside the timed loop; each run stops at "
        f"the first round whose accuracy reaches {c['target_accuracy']} (at most "
        f"{c['rounds']} rounds). Time: from the launch of the process (interpreter, "
        "imports, data, model, compilation, every round and evaluation before it).",
        "",
        "| simulator | time to target | rounds to target | reached | per round (warm) "
        "| time to target / fedjax_sim | every run: s (rounds) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in tta:
      if "per_round_s" not in row:
        lines.append(f"| {row['label']} | failed | | | | | |")
        continue
      runs = ", ".join("not reached" if t is None else f"{t:.1f} ({n})" for t, n in zip(
          row["time_to_target_s_all"], row["rounds_to_target_all"]))
      rounds = "-" if row["rounds_to_target"] is None else f"{row['rounds_to_target']:g}"
      lines.append(
          f"| {row['label']} | {_s(row['time_to_target_s'])} | {rounds} "
          f"| {row['reached']} of {row['runs']} | {_s(row['per_round_s'])} "
          f"| {_x(row.get('time_to_target_over_fedjax_sim'))} | {runs} |")
  lines += [
      "",
      "s/round (warm): median over rounds 2..R of one run, then median over runs (for "
      "'R/2 rounds per call': the second call's time / (R/2)). First round (first call "
      "for R/2 per call): "
      "compilation, Ray start-up of actors and first client steps included. Imports + "
      "setup: from process launch to the first round (interpreter, imports, data, "
      "model, simulator objects; for Flower, to its first round hook, Ray start-up "
      "included). End to end: process launch to the end of the last round. "
      "x / fedjax_sim: how many times longer than fedjax_sim (one round per call) in "
      "the same repetition, median over repetitions; above 1 fedjax_sim is faster. "
      "fedjax_sim ahead: where fedjax_sim's end to end is the shorter, from each "
      "repetition's warm rates and fixed costs (end to end less its rounds at the warm "
      "rate: launch, imports, setup, compilation): 'always' (never behind), 'after N "
      "rounds' (it catches up), 'until N rounds' (ahead at first, then overtaken), "
      "'never'; N the median over the repetitions of that kind, with counts where "
      "repetitions differ in kind. "
      "Eval loss: cross-entropy on 2,000 held-out examples of the teacher task, before "
      "and after training (each simulator's own initialization), a check that all "
      "simulators do the same training.",
      "",
      f"Load: the 1-minute load average before each worker run was {min(loads):.1f} to "
      f"{max(loads):.1f} on {meta['cpu_count']} CPUs (in the JSON per run; the previous "
      "worker's own load counts in it). "
      # A worker keeps every CPU busy, so the load reaches about the CPU count by itself.
      + ("Well above the CPU count, other work shared the machine: timings are slowed and "
         "noisy; the interleaving spreads the load over all simulators, and the ratios are "
         "taken within a repetition." if max(loads) > meta["cpu_count"] + 1 else
         "No other work ran; the ratios are still taken within a repetition."),
      "",
      *waits_note(result["runs"]),
      "Implementations:",
      "",
  ]
  seen = set()
  for r in result["runs"]:
    if "implementation" in r and (r["key"], r["task"]["model"]) not in seen:
      seen.add((r["key"], r["task"]["model"]))
      lines.append(f"- {r['label']}, {r['task']['model']}: {r['implementation']}")
  lines += [
      "",
      "Versions: " + "; ".join(
          f"{label}: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v)
          for label, pk in meta["packages"].items()) + ".",
  ]
  return "\n".join(lines) + "\n"


def readme_table(result: dict) -> str:
  """The compact table of the README: a row per case, a column per simulator; per warm
  round (its ratio to fedjax_sim's) and end to end, or the time to the target."""
  short = {"fedjax_sim": "fedjax_sim", "fedjax_sim_scan": "fedjax_sim, R/2 rounds per call",
           "fedjax_sim_cache": "fedjax_sim, compilation cache", "fedjax": "FedJAX", "drjax": "DrJAX, plain jit",
           "drjax_opts": "DrJAX, fedjax_sim's options", "pfl": "pfl, torch default threads",
           "pfl_1thread": "pfl, 1 thread", "flower": "Flower",
           "flower_epoch": "Flower, epoch-jitted client"}
  rows = [r for r in result["summary"] if "per_round_s" in r]
  order = DEFAULT_SIMULATORS + [k for k in SIMULATORS if k not in DEFAULT_SIMULATORS]
  sims = [k for k in order if any(r["simulator"] == k for r in rows)]
  cases = list(dict.fromkeys(r["case"] for r in rows))
  out = ["| case | " + " | ".join(short[k] for k in sims) + " |",
         "| --- |" + " ---: |" * len(sims)]
  for case in cases:
    c = CASES[case]
    if is_tta(case):
      name = f"time to {c['target_accuracy']} accuracy (MLP, 30 steps), s (rounds)"
    else:
      clients = (f"{c.get('clients_per_round', 10)} of {c.get('num_clients', 100)} clients, ")
      name = (f"{case}: {c['model'].upper()}, {clients}"
              f"{c['examples_per_client'] // 20} steps")
    cells = []
    for k in sims:
      r = next((r for r in rows if r["case"] == case and r["simulator"] == k), None)
      if r is None:
        cells.append("")
      elif is_tta(case):
        cells.append("not reached" if r.get("time_to_target_s") is None else
                     f"{r['time_to_target_s']:.1f} ({r['rounds_to_target']:g})"
                     + (f", {r['time_to_target_over_fedjax_sim']:.2f}x"
                        if k != BASELINE and r.get("time_to_target_over_fedjax_sim") else ""))
      else:
        ratio = r.get("over_fedjax_sim_per_round")
        cells.append(_s(r["per_round_s"])
                     + (f" ({ratio:.2f}x)" if ratio and k != BASELINE else "")
                     + f"; {r['end_to_end_s']:.1f} s"
                     + (f" ({r['task']['rounds']} rounds)"
                        if r["task"]["rounds"] != c["rounds"] else ""))
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rows = [r for r in result["summary"] if "per_round_s" in r and not is_tta(r["case"])]
  if not rows:
    return False
  cases = list(dict.fromkeys(r["case"] for r in rows))
  sims = list(dict.fromkeys(r["simulator"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / max(1, len(sims))
  for ax, key, title in ((axes[0], "per_round_s", "seconds per round (warm)"),
                         (axes[1], "end_to_end_s", "end to end (s)")):
    for i, sim in enumerate(sims):
      vals = [next((r[key] for r in rows if r["case"] == c and r["simulator"] == sim), 0)
              for c in cases]
      ax.bar([j + i * width for j in range(len(cases))], vals, width,
             label=SIMULATORS[sim][0])
    ax.set_xticks([j + width * (len(sims) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases)
    if key == "per_round_s":
      ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend(fontsize=8)
  meta = result["meta"]
  cpu = (meta.get("cpu_model") or "CPU").replace("(R)", "")
  jax_version = meta.get("packages", {}).get(BASELINE, {}).get("jax")
  fig.suptitle(f"FedAvg, {meta['config']['clients_per_round']} of "
               f"{meta['config']['num_clients']} clients per round; {cpu} "
               f"({meta['cpu_count']} cores)"
               + (f", fedjax_sim on jax {jax_version}" if jax_version else "")
               + "; medians of interleaved runs")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def command_line(argv: list[str]) -> str:
  """The command, without paths of this machine (log folder, python executables)."""
  out, skip = ["run_all.py"], False
  for token in argv:
    if skip:
      skip = False
      continue
    name = token.split("=", 1)[0]
    if name in ("--log-dir", "--output") or name.endswith("-python"):
      skip = "=" not in token
      continue
    out.append(token)
  return " ".join(out)


def _git_commit():
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, check=True, cwd=HERE).stdout.strip()
  except Exception:
    return None


def run_order(simulators: list[str], rep: int) -> list[str]:
  """The simulators' order in repetition `rep`: every other repetition reversed, and
  rotated by one every two, so that none always runs first in a case (after the previous
  case's last worker), last, or in the middle (where a worker first-touches the memory
  its predecessor just freed, which this VM backs slowly: benchmarks/dataset_setup.py)."""
  k = (rep // 2) % len(simulators)
  order = simulators[k:] + simulators[:k]
  return order if rep % 2 == 0 else order[::-1]


def prepare_bytecode(args) -> None:
  """Every environment's bytecode of the workers, and fedjax_sim's of this tree: what pip
  writes at install for the peers' packages (common.byte_compile)."""
  package = os.path.join(os.path.dirname(os.path.dirname(HERE)), "fedjax_sim")
  for env in sorted({SIMULATORS[sim][1] for sim in args.simulators}):
    python = os.path.expanduser(getattr(args, f"{env}_python"))
    common.byte_compile(python, HERE, *([package] if env == "fedjax_sim" else []))


def main(argv=None):
  args = parse_args(argv)
  started = time.time()
  CASES["tta_mlp600"].update(target_accuracy=args.tta_target, rounds=args.tta_max_rounds)
  if args.readme_table:
    with open(args.output) as f:
      print(readme_table(json.load(f)), end="")
    return None
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="peer-bench-")
  os.makedirs(log_dir, exist_ok=True)
  print(f"worker logs in {log_dir}", flush=True)
  out = os.path.abspath(args.output)
  old = None
  if args.merge and os.path.exists(out):
    with open(out) as f:
      old = json.load(f)
  first_rep = 1 + max((r["repeat"] for r in old["runs"]), default=-1) if old else 0
  if args.first_repeat is not None:
    first_rep = args.first_repeat
  prepare_bytecode(args)
  if not args.no_warm_up:
    warm_up(args, log_dir)
  runs = []
  for rep in range(first_rep, first_rep + args.repeats):
    for case in args.cases:
      for sim in run_order(args.simulators, rep):
        if sim in CASES[case].get("skip", ()):
          continue
        caps = {} if args.uncapped else CASES[case].get("sim_repeats", {})
        if rep - first_rep >= caps.get(sim, args.repeats):
          continue
        print(f"[repeat {rep + 1 - first_rep}/{args.repeats}] {case} {sim}", flush=True)
        res = run_worker(args, case, sim, rep, log_dir)
        if "timings" in res:
          t = res["timings"]
          print(f"    {t['per_round_warm_median_s'] or float('nan'):.4f} s/round, first "
                f"{t['first_call_s']:.2f} s, end to end {t['end_to_end_s']:.2f} s "
                f"(load {res['loadavg_before'][0]:.1f})", flush=True)
        runs.append(res)
  invocation = {
      "command": command_line(argv if argv is not None else sys.argv[1:]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": _git_commit(), "cases": args.cases, "simulators": args.simulators,
      "repeats": args.repeats, "rounds_override": args.rounds,
      "tta_target": args.tta_target, "tta_max_rounds": args.tta_max_rounds,
      "duration_s": time.time() - started}
  config = {"cases": {c: CASES[c] for c in CASES}, "num_clients": args.num_clients,
            "clients_per_round": args.clients_per_round, "batch_size": args.batch_size,
            "epochs": args.epochs, "client_lr": args.client_lr, "server_lr": 1.0,
            "seed": args.seed}
  invocations = [invocation]
  if old is not None:
    old_meta = old["meta"]
    if {k: old_meta["config"][k] for k in config if k != "cases"} != {
        k: v for k, v in config.items() if k != "cases"}:
      raise SystemExit(f"--merge: {out} was measured with another task configuration")
    invocations = old_meta.get("invocations") or [
        {k: old_meta[k] for k in ("command", "date", "git_commit")}]
    invocations = invocations + [invocation]
    # A re-measured (case, simulator) replaces its old runs; all others are kept.
    redone = {(r["case"], r["key"]) for r in runs}
    runs = [r for r in old["runs"] if (r["case"], r["key"]) not in redone] + runs
  packages = {}
  for r in runs:
    if "packages" in r:
      packages.setdefault(SIMULATORS[r["key"]][1], r["packages"])
  ok = [r for r in runs if "cpu_model" in r]
  meta = {
      "cpu_model": ok[0]["cpu_model"] if ok else None,
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "packages": packages,
      "config": config,
      "invocations": invocations,
  }
  cases = [c for c in CASES if any(r["case"] == c for r in runs)]
  sims = [k for k in SIMULATORS if any(r["key"] == k for r in runs)]
  result = {"meta": meta, "summary": summarize(runs, cases, sims), "runs": runs}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(result)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(table)
  plotted = plot(result, os.path.splitext(out)[0] + ".png")
  print()
  print(table)
  print(f"wrote {out}, .md" + (", .png" if plotted else "")
        + f" ({invocation['duration_s'] / 60:.1f} minutes)")
  return result


if __name__ == "__main__":
  main()
