#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one call (a few minutes on an
# H100/H200). Installs nothing; run from the repository root with the package importable
# (PYTHONPATH=. is set below). Results go to ${OUT:-benchmarks/results}; commit them with
# the device named (each JSON records it).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh          # everything
#   QUICK=1 bash benchmarks/gpu_suite.sh                # tiny sizes: checks the commands
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
platform=$(python -c 'import jax; print(jax.devices()[0].platform)')
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu_suite_device.txt" 2>&1 || true

if [[ -n "${QUICK:-}" ]]; then
  clients="10"; big="20"; rounds=4; e2e_clients=30; repeats=1
else
  clients="10 100 1000"; big="10000"; rounds=1500; e2e_clients=3400; repeats=5
fi

# 1. Round throughput, vectorized vs loop (loop up to 100 clients), centralized ceiling
#    and roofline (the device's measured matmul rate and bandwidth).
python benchmarks/round_throughput.py --models mlp cnn cnn_seq --clients $clients \
    --repeats $repeats --loop-repeats 2 --skip-loop-above 100 --no-plain-jit \
    --output "$OUT/round_throughput_$platform.json"
# 2. The CNN at 10,000 clients per round, chunked (no loop, no ceiling).
python benchmarks/round_throughput.py --merge --models cnn --clients $big --num-clients $big \
    --client-chunk-size cnn=1000 --repeats 2 --skip-loop-above 0 --no-plain-jit \
    --no-centralized --output "$OUT/round_throughput_$platform.json"
# 3. EMNIST-shape end to end, float32 and bfloat16 compute.
python benchmarks/emnist_e2e.py --rounds $rounds --num-clients $e2e_clients \
    --precision f32 bf16 --output "$OUT/emnist_e2e_$platform.json"
# 4. The other two models of the issue: logistic regression and the next-character model.
python benchmarks/round_throughput.py --merge --models logreg char_rnn --clients $clients \
    --repeats $repeats --loop-repeats 2 --skip-loop-above 100 --no-plain-jit \
    --output "$OUT/round_throughput_$platform.json"
