"""The local step before and after the unpadded fast path, side by side in one run.

Two long-lived worker processes, one importing this checkout's fedjax_sim and one a
copy of an older commit (`--before PATH`, e.g. made with
`git archive bcfbd36 | tar -x -C ../fedjax_sim_before`), build FedAvg on the peers
benchmark's task (benchmarks/peers/common.py: MNIST-shaped synthetic clients, 100
clients, 10 per round, batch 20, client SGD lr 0.1) through the public API both share,
compile one round in a `lax.scan` (`runner.make_chunk`, as `fs.run` does), check that
both give the same parameters after the first round, count XLA operations, then time
rounds round-robin (one round in the old process, one in the new, in turn, so both see
the same load). Medians of wall seconds per round.

Op counts, from the compiled (optimized) HLO: "step" is the instructions of the loop
body that holds the local step (the while body with the most dots), without the
bookkeeping ones (parameter, get-tuple-element, tuple, constant, bitcast); "kernels" is
the module's fusions and other kernels XLA:CPU compiles one by one (the first round's
compile time grows with their number); "stablehlo" is the lowered module's op count.

First round: `--first-round R` fresh processes per version and case (interleaved), each
timing trace + lower + compile + the first call, wall and process CPU seconds.

  python benchmarks/local_step.py --before ../fedjax_sim_before

writes benchmarks/results/local_step_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> (model, examples per client, schedule[, clients per round]); 100 clients,
# 10 per round unless given, batch 20.
CASES = {
    "mlp100_epochs1": ("mlp", 100, {"epochs": 1}),      # 5 steps
    "mlp100_steps5": ("mlp", 100, {"steps": 5}),
    "mlp600_epochs1": ("mlp", 600, {"epochs": 1}),      # 30 steps
    "mlp600_steps30": ("mlp", 600, {"steps": 30}),
    "mlp100_steps30": ("mlp", 100, {"steps": 30}),      # 6 reshuffled epochs
    "mlp100_epochs6": ("mlp", 100, {"epochs": 6}),      # the same 30 steps by epochs
    "mlp90_epochs1": ("mlp", 90, {"epochs": 1}),        # 4 full batches + one of 10
    "cnn100_epochs1": ("cnn", 100, {"epochs": 1}),
    "mlp_ragged_epochs1": ("mlp", -100, {"epochs": 1}),  # 50..100 examples: general path
    "mlp_ragged_steps5": ("mlp", -100, {"steps": 5}),
    # All 100 clients a round: on a CPU trained in chunks of 10, a scan over chunks.
    "mlp100_epochs1_all": ("mlp", 100, {"epochs": 1}, 100),
}
BOOKKEEPING = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def build(name):
  import jax
  import optax
  import fedjax_sim as fs
  sys.path.insert(0, os.path.join(HERE, "peers"))
  import common
  model_name, examples, schedule, *per_round = CASES[name]
  sizes = ([abs(examples)] * 100 if examples > 0
           else [50 + (7 * i) % 51 for i in range(100)])
  xs, ys = zip(*(common.client_data(0, i, n) for i, n in enumerate(sizes)))
  data = fs.from_clients(list(xs), list(ys), num_classes=10)
  model = fs.mlp(seed=0) if model_name == "mlp" else fs.cnn(seed=0)
  algorithm = fs.fedavg(model.apply, client_optimizer=optax.sgd(0.1),
                        server_optimizer=optax.sgd(1.0),
                        clients_per_round=per_round[0] if per_round else 10, batch_size=20,
                        **schedule)
  state = algorithm.init(model.params, jax.random.key(0))
  algorithm.validate(state, data)
  return algorithm, jax.tree_util.tree_map(lambda a: a.copy(), state), data


def op_counts(lowered, compiled) -> dict:
  text = compiled.as_text()
  bodies, current = {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      current = m.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      op = re.search(r"=\s*\S+\s+([\w\-]+)\(", line)
      if op:
        bodies[current].append(op.group(1))
  loops = re.findall(r"while\(.*?body=%?([\w.\-]+)", text)
  step = max(loops, key=lambda b: (bodies.get(b, []).count("dot"), -len(bodies.get(b, []))))
  fused = set(re.findall(r"calls=%?([\w.\-]+)", text))
  kernels = sum(1 for name, ops in bodies.items() if name not in fused for op in ops
                if op not in BOOKKEEPING | {"while", "call", "conditional", "copy"})
  stablehlo = len(re.findall(r"=\s*\"?(?:stablehlo|chlo)\.", lowered.as_text()))
  return {"step_ops": sum(op not in BOOKKEEPING for op in bodies[step]),
          "step_instructions": len(bodies[step]), "kernels": kernels,
          "stablehlo_ops": stablehlo}


def worker() -> None:
  """Reads `build <case>` and `time` lines; answers one JSON line each."""
  import resource
  import time
  import jax
  import jax.numpy as jnp
  from fedjax_sim import runner
  state = data = step = None
  for line in sys.stdin:
    words = line.split()
    if words[0] == "build":
      algorithm, state, data = build(words[1])
      chunk = runner.make_chunk(algorithm, 1)
      lowered = chunk.lower(state, data)
      compiled = lowered.compile()
      counts = {**op_counts(lowered, compiled),
                "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
      step = chunk
      state, _ = step(state, data)
      jax.block_until_ready(state)
      checksum = float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(state.params)))
      print(json.dumps({"checksum": checksum, **counts}), flush=True)
    elif words[0] == "time":
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      state, _ = step(state, data)
      jax.block_until_ready(state)
      print(json.dumps({"seconds": time.perf_counter() - start,
                        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        - faults}), flush=True)


def first_round(name: str) -> None:
  """One fresh process: build, then trace, lower, compile and run the first round."""
  import time
  wall, cpu = time.perf_counter(), time.process_time()
  import jax
  from fedjax_sim import runner
  algorithm, state, data = build(name)
  marks = {"setup": (time.perf_counter() - wall, time.process_time() - cpu)}
  chunk = runner.make_chunk(algorithm, 1)
  for stage in ("trace", "lower", "compile", "run"):
    w, c = time.perf_counter(), time.process_time()
    if stage == "trace":
      traced = chunk.trace(state, data)
    elif stage == "lower":
      lowered = traced.lower()
    elif stage == "compile":
      compiled = lowered.compile()
    else:
      out = compiled(state, data)
      jax.block_until_ready(out)
    marks[stage] = (time.perf_counter() - w, time.process_time() - c)
  print(json.dumps(marks), flush=True)


def main() -> None:
  if sys.argv[1:2] == ["--worker"]:
    worker()
    return
  if sys.argv[1:2] == ["--first-round"]:
    first_round(sys.argv[2])
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True, help="a copy of the old commit")
  parser.add_argument("--repeats", type=int, default=25)
  parser.add_argument("--first-round", type=int, default=2,
                      help="fresh processes per version for the first-round timings")
  parser.add_argument("--first-round-cases", nargs="*",
                      default=["mlp100_epochs1", "mlp600_epochs1", "cnn100_epochs1"])
  parser.add_argument("--only", nargs="*", default=None, help="cases to run")
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  roots = {"before": os.path.abspath(args.before), "after": os.path.dirname(HERE)}

  def start(root, *extra):
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *extra], cwd=root,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  sys.path.insert(0, HERE)
  import jax
  import machine
  load_before = machine.load_average()
  procs = {k: start(root, "--worker") for k, root in roots.items()}

  def ask(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())

  rows = []
  for name in [c for c in CASES if args.only is None or c in args.only]:
    ready = {k: ask(p, f"build {name}") for k, p in procs.items()}
    times, faults = {k: [] for k in procs}, {k: [] for k in procs}
    for _ in range(args.repeats):
      for k, p in procs.items():
        answer = ask(p, "time")
        times[k].append(answer["seconds"])
        faults[k].append(answer["minor_faults"])
    before, after = (statistics.median(times[k]) for k in ("before", "after"))
    diff = abs(ready["after"]["checksum"] - ready["before"]["checksum"]) / ready["before"]["checksum"]
    row = {"case": name, "before_s": before, "after_s": after, "after_over_before": after / before,
           "first_round_params_rel_diff": diff,
           **{f"{k}_{what}": ready[k][what] for k in ready
              for what in ("step_ops", "step_instructions", "kernels", "stablehlo_ops",
                           "temp_mib")},
           **{f"{k}_minor_faults_per_round": statistics.median(faults[k]) for k in faults}}
    rows.append(row)
    print(f"{name:20s} before {before * 1e3:7.2f} ms  after {after * 1e3:7.2f} ms  "
          f"x{after / before:.3f}  step ops {row['before_step_ops']} -> {row['after_step_ops']}  "
          f"kernels {row['before_kernels']} -> {row['after_kernels']}  params diff {diff:.1e}",
          flush=True)
  for p in procs.values():
    p.stdin.close()
    p.wait()

  first = []
  for name in args.first_round_cases if args.first_round > 0 else []:
    marks = {"before": [], "after": []}
    for _ in range(args.first_round):
      for k, root in roots.items():
        p = start(root, "--first-round", name)
        out, _ = p.communicate()
        marks[k].append(json.loads(out.strip().splitlines()[-1]))
    entry = {"case": name}
    for k in marks:
      for stage in ("setup", "trace", "lower", "compile", "run"):
        entry[f"{k}_{stage}_wall_s"] = statistics.median(m[stage][0] for m in marks[k])
        entry[f"{k}_{stage}_cpu_s"] = statistics.median(m[stage][1] for m in marks[k])
      entry[f"{k}_first_round_wall_s"] = statistics.median(
          sum(m[s][0] for s in ("trace", "lower", "compile", "run")) for m in marks[k])
    first.append(entry)
    print(f"{name:20s} first round before {entry['before_first_round_wall_s']:.2f} s  after "
          f"{entry['after_first_round_wall_s']:.2f} s  (compile cpu "
          f"{entry['before_compile_cpu_s']:.2f} -> {entry['after_compile_cpu_s']:.2f} s)",
          flush=True)

  info = {**machine.device_info(), "load_average_start": load_before,
          "load_average_end": machine.load_average(), "commit": machine.git_commit(),
          "before": args.before, "repeats": args.repeats, "first_round_runs": args.first_round}
  output = args.output or os.path.join(HERE, "results", f"local_step_{jax.default_backend()}.json")
  with open(output, "w") as f:
    json.dump({"info": info, "rows": rows, "first_round": first}, f, indent=1)
  lines = [f"# Local step before and after ({info})", "",
           "FedAvg, 100 clients, 10 per round, batch 20 (benchmarks/peers task). Warm seconds "
           "per round: medians of round-robin rounds. Step ops: non-bookkeeping instructions of "
           "the compiled local-step loop body; kernels: what XLA:CPU compiles one by one; "
           "temp: the round's XLA temporary buffer (`memory_analysis`); page faults: the "
           "process's minor page faults during a round, median (glibc serves an allocation "
           "above its mmap threshold, at most 32 MiB unless set, with a fresh mapping on "
           "every call, so a temp above it faults in every page each round).", "",
           "| case | before | after | after / before | step ops | kernels | stablehlo ops "
           "| temp (MiB) | page faults / round |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['case']} | {r['before_s'] * 1e3:.2f} ms | {r['after_s'] * 1e3:.2f} ms | "
            f"{r['after_over_before']:.3f} | {r['before_step_ops']} -> {r['after_step_ops']} | "
            f"{r['before_kernels']} -> {r['after_kernels']} | "
            f"{r['before_stablehlo_ops']} -> {r['after_stablehlo_ops']} | "
            f"{r['before_temp_mib']:.1f} -> {r['after_temp_mib']:.1f} | "
            f"{r['before_minor_faults_per_round']:.0f} -> {r['after_minor_faults_per_round']:.0f} |"
            for r in rows]
  if first:
    lines += ["", "First round in a fresh process (medians; wall seconds, compile also as "
              "process CPU seconds, steadier under load):", "",
              "| case | trace | lower | compile (wall) | compile (CPU) | first round |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in first:
      cell = lambda s: f"{e[f'before_{s}']:.2f} -> {e[f'after_{s}']:.2f}"
      lines.append(f"| {e['case']} | {cell('trace_wall_s')} | {cell('lower_wall_s')} | "
                   f"{cell('compile_wall_s')} | {cell('compile_cpu_s')} | "
                   f"{cell('first_round_wall_s')} s |")
  with open(output[:-5] + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
