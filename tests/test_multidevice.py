"""Client axis and sweep axis sharded over 8 CPU devices equal one device (subprocess)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_clients_and_sweep_equal_one_device():
  # This process's XLA_FLAGS (conftest.py's faster compiles) plus 8 devices.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "multidevice_script.py"], cwd=HERE, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["all_reduce"]  # aggregation is a cross-device reduction
  assert out["params_devices"] == 8
  assert out["moved"]
  assert out["copy_moved"] == []  # the shardings of copied leaves that moved
  assert out["clients_params_error"] < 1e-5 and out["clients_loss_error"] < 1e-5
  assert out["sweep_params_error"] < 1e-5 and out["sweep_loss_error"] < 1e-5
  assert out["memory_devices"] == 8 and out["memory_per_client"] > 0
  assert out["memory_error_at_16"] < 0.05
