"""Two processes under jax.distributed on loopback equal one process (subprocesses).

Each process has 2 CPU devices; one mesh spans all 4, so a round's 8 clients are split
over two processes and the weighted mean is an all-reduce across them (gloo over TCP).
Both processes run `fs.run`; their final parameters, losses and sampled clients must
equal a one-device `fs.run` in this process.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_script

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_PROCESSES = 2
TIMEOUT_S = 240


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def one_process_run():
  """(final parameters, losses, sampled ids per round, initial parameters) on one device."""
  import fedjax_sim as fs
  model, train = multihost_script.problem()
  algorithm = multihost_script.make_algorithm(model)
  final, history = fs.run(algorithm, algorithm.init(model.params, jax.random.key(0)), train,
                          rounds=multihost_script.ROUNDS,
                          rounds_per_chunk=multihost_script.ROUNDS, progress=False)
  leaves = lambda params: [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]
  return (leaves(final.params), [row["train_loss"] for row in history],
          [np.asarray(row["client_ids"]).tolist() for row in history], leaves(model.params))


def test_two_processes_equal_one(tmp_path):
  # This process's XLA_FLAGS (conftest.py's faster compiles) plus 2 devices a process.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
  port = free_port()
  outs = [str(tmp_path / f"params{i}.npz") for i in range(NUM_PROCESSES)]
  logs = [(open(tmp_path / f"out{i}.txt", "w+"), open(tmp_path / f"err{i}.txt", "w+"))
          for i in range(NUM_PROCESSES)]  # files, not pipes: no process blocks on a full one
  procs = [subprocess.Popen([sys.executable, "multihost_script.py", str(i), str(NUM_PROCESSES),
                             str(port), outs[i]], cwd=HERE, env=env, stdout=logs[i][0],
                            stderr=logs[i][1], text=True)
           for i in range(NUM_PROCESSES)]
  try:
    # The one-device run, while the workers start.
    reference, reference_losses, reference_ids, initial = one_process_run()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for out, err in logs:
    out.seek(0)
    err.seek(0)
    results.append((out.read(), err.read()))
    out.close()
    err.close()

  reports = []
  for p, (stdout, stderr) in zip(procs, results):
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    if "init_error" in report:
      pytest.skip(f"jax.distributed cannot start here: {report['init_error']}")
    assert p.returncode == 0, stderr[-3000:]
    reports.append(report)

  for i, report in enumerate(reports):
    assert report["process_index"] == i and report["process_count"] == NUM_PROCESSES
    assert report["devices"] == 4 and report["local_devices"] == 2
    assert report["mesh_processes"] == [0, 1]  # the mesh spans both processes
    assert report["params_devices"] == 4 and report["params_fully_replicated"]
    assert report["all_reduce"]
    assert report["client_ids"] == reference_ids  # gathered from both processes
    np.testing.assert_allclose(report["losses"], reference_losses, rtol=0, atol=1e-6)
    with np.load(outs[i]) as saved:
      params = [saved[f"arr_{j}"] for j in range(len(saved.files))]
    assert len(params) == len(reference)
    for got, want in zip(params, reference):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Training moved the parameters, so the comparison is not trivially of the initial model.
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(reference, initial)) > 1e-2
