#!/usr/bin/env bash
# Every GPU measurement in one call, within about 9 minutes on an H100/H200: each step has
# a time budget (seconds, below) and writes its results as it finishes, so a step cut off
# at its budget loses only itself. Installs nothing; run from the repository root with the
# package importable (PYTHONPATH=. is set below). Results go to ${OUT:-benchmarks/results};
# commit them with the device named (each JSON records it).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh          # everything
#   QUICK=1 bash benchmarks/gpu_suite.sh                # tiny sizes: checks the commands
#   PYTHON=/path/to/python bash benchmarks/gpu_suite.sh # another interpreter (default python3)
#
# It calls "$PYTHON" by its own path: a symbolic link named python that points at a
# virtual environment's interpreter from outside it loses the environment's packages, and
# writing a wrapper script through such a link overwrites the interpreter itself.
#
# The peers steps need FedJAX 0.0.17 and DrJAX 0.2.1 importable by $PEERS_PYTHON (default:
# python with $PEERS_SITE, a folder holding their packages, on PYTHONPATH); without them
# those rows fail and the other steps run.
set -uo pipefail
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
platform=$("$PY" -c 'import jax; print(jax.devices()[0].platform)')
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv \
    > "$OUT/gpu_suite_device.txt" 2>&1 || true
"$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' >> "$OUT/gpu_suite_device.txt" 2>&1

if [[ -z "${PEERS_PYTHON:-}" ]]; then
  PEERS_PYTHON="$(mktemp -d)/python"
  printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec %s "$@"\n' \
      "$(realpath "${PEERS_SITE:-.peers_site}")" "$(command -v "$PY")" > "$PEERS_PYTHON"
  chmod +x "$PEERS_PYTHON"
fi

if [[ -n "${QUICK:-}" ]]; then
  # Budgets x4: a CPU checking the commands is slower than the GPU they are sized for.
  clients="10"; big="20"; rounds=4; e2e_clients=30; repeats=1; peer_repeats=1; peer_rounds=2
  scale=4
else
  clients="10 100 1000"; big="10000"; rounds=1500; e2e_clients=3400; repeats=5
  peer_repeats=2; peer_rounds=20; scale=1
fi
step() {  # step BUDGET_SECONDS NAME COMMAND...: run it, cut off at its budget
  local budget=$(( $1 * scale )) name=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (budget ${budget} s)"
  timeout --kill-after=5 "$budget" "$@"
  echo "=== $name: exit $? after $(( SECONDS - t0 )) s"
}

# 1. How exactly the server's weighted mean is computed (TF32 on a default-precision dot).
step 40 precision "$PY" benchmarks/aggregation_precision.py \
    --output "$OUT/aggregation_precision_$platform.json"
# 2. Peers side by side (issue: ahead of every peer): fedjax_sim, FedJAX, DrJAX, each case
#    its own invocation merged into one file.
peers=("$PY" benchmarks/peers/run_all.py --simulators fedjax_sim fedjax drjax
       --repeats "$peer_repeats" --rounds "$peer_rounds" --uncapped --no-warm-up --timeout 80
       --fedjax-python "$PEERS_PYTHON" --drjax-python "$PEERS_PYTHON"
       --output "$OUT/peers_$platform.json")
step 100 peers_mlp100 "${peers[@]}" --cases mlp100
step 80 peers_scale1000 "${peers[@]}" --merge --cases scale1000
step 90 peers_cnn100 "${peers[@]}" --merge --cases cnn100
# 3. Round throughput, vectorized vs loop (loop up to 100 clients), centralized ceiling
#    and roofline (the device's measured matmul rate and bandwidth).
step 120 throughput "$PY" benchmarks/round_throughput.py --models mlp cnn --clients $clients \
    --repeats $repeats --loop-repeats 2 --skip-loop-above 100 --no-plain-jit \
    --output "$OUT/round_throughput_$platform.json"
# 4. EMNIST-shape end to end, float32 and bfloat16 compute.
step 70 emnist "$PY" benchmarks/emnist_e2e.py --rounds $rounds --num-clients $e2e_clients \
    --precision f32 bf16 --output "$OUT/emnist_e2e_$platform.json"
# 5. The CNN at 10,000 clients per round, chunked (no loop, no ceiling).
step 40 cnn10000 "$PY" benchmarks/round_throughput.py --merge --models cnn --clients $big \
    --num-clients $big --client-chunk-size cnn=1000 --repeats 2 --skip-loop-above 0 \
    --no-plain-jit --no-centralized --output "$OUT/round_throughput_$platform.json"
