"""The CLI's persistent compilation cache: wall time of the same command run twice.

Each command runs as a fresh process (what a user pays: import, data, compiling, the
rounds), three times: with an empty cache folder (it compiles and fills the cache), again
(it reads every program from the cache), and with --no-compile-cache (for reference).
Two commands: `fedjax-sim run` with its defaults (FedAvg, Synthetic(1,1), logistic
regression, 200 rounds) and the CNN (`--task mnist5k --model cnn`, 4 rounds: mostly
startup and compiling, what the cache saves), each also
counting cache hits and misses (jax.monitoring events).

  python benchmarks/compile_cache.py

writes benchmarks/results/compile_cache_<platform>.md and .json.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
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
print("COUNTS " + json.dumps(counts))
sys.exit(code)
"""
COMMANDS = {
    "fedjax-sim run (defaults: synthetic, logreg, 200 rounds)": ["run"],
    "fedjax-sim run --task mnist5k --model cnn --rounds 4 --eval-every 2": [
        "run", "--task", "mnist5k", "--model", "cnn", "--rounds", "4", "--eval-every", "2"],
}


def timed(argv, cache, output):
  env = {**os.environ, "PYTHONPATH": str(REPO), "FEDJAX_SIM_COMPILE_CACHE": cache}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", RUN_CLI, *argv, "--no-progress", "--output",
                         output], env=env, capture_output=True, text=True, cwd=REPO)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{argv}: {proc.stderr[-2000:]}")
  counts = json.loads(proc.stdout.split("COUNTS ")[-1])
  return {"seconds": round(seconds, 2), **counts}


def main():
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, argv) in enumerate(COMMANDS.items()):
      cache = os.path.join(tmp, f"cache{i}")
      runs = {}
      for label, extra in (("first (empty cache)", []), ("second (cache)", []),
                           ("--no-compile-cache", ["--no-compile-cache"])):
        runs[label] = timed([*argv, *extra, "--overwrite"], cache, os.path.join(tmp, f"run{i}"))
        print(name, label, runs[label], flush=True)
      size = sum(f.stat().st_size for f in pathlib.Path(cache).rglob("*") if f.is_file())
      results.append({"command": name, "runs": runs, "cache_bytes": size})
  platform = jax.default_backend()
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax": jax.__version__, "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
          "load_average": os.getloadavg()}
  out = REPO / "benchmarks" / "results"
  (out / f"compile_cache_{platform}.json").write_text(
      json.dumps({"meta": meta, "results": results}, indent=2))
  lines = [f"# The persistent compilation cache ({platform})", "",
           f"{meta['date']}, jax {meta['jax']}, {meta['device']}, {meta['cpus']} CPUs, load "
           f"average {meta['load_average'][0]:.1f} (a shared machine: times are noisy). Each "
           "run is a fresh process: wall seconds including import, data and compiling.", "",
           "| command | first (empty cache) | second (cache) | --no-compile-cache | hits / "
           "misses, second | cache size |", "|---|---|---|---|---|---|"]
  for r in results:
    runs = r["runs"]
    second = runs["second (cache)"]
    lines.append(f"| `{r['command']}` | {runs['first (empty cache)']['seconds']:.1f} s | "
                 f"{second['seconds']:.1f} s | {runs['--no-compile-cache']['seconds']:.1f} s | "
                 f"{second['cache_hits']} / {second['cache_misses']} | "
                 f"{r['cache_bytes'] / 2**20:.1f} MiB |")
  (out / f"compile_cache_{platform}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
