#!/usr/bin/env bash
# The peers' virtual environments, one per simulator, outside the repository:
# $PEERS_VENVS/{fedjax,flower,drjax,pfl} (PEERS_VENVS defaults to ~/.venvs), where
# run_all.py looks for them. Pinned to the versions benchmarks/results/peers_cpu.md was
# measured with. Usage: bash benchmarks/peers/setup_venvs.sh [fedjax flower drjax pfl]
set -euo pipefail

ROOT="${PEERS_VENVS:-$HOME/.venvs}"
PYTHON="${PYTHON:-python3}"
# ml_dtypes 0.6.0: what fedjax_sim's own requirements give on Python 3.11 (0.7 adds
# about 1 s to every `import jax` under numpy < 2.5, benchmarks/startup.py), so imports
# cost the JAX peers the same.
# JAX_PINS overrides them, e.g. the newest stack's on Python 3.12:
# PYTHON=python3.12 PEERS_VENVS=~/.venvs312 JAX_PINS="jax==0.12.0.1 jaxlib==0.12.0.1 optax==0.2.8 ml_dtypes==0.7.0"
read -r -a JAX <<< "${JAX_PINS:-jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 ml_dtypes==0.6.0}"
# pfl's torch: a CPU-only build (the default wheel of the package index may pull GBs of
# CUDA libraries). TORCH overrides, e.g. TORCH="torch==2.13.0+cpu" where a local wheel
# of that name is available, or TORCH="torch" for the index's default.
TORCH="${TORCH:-torch}"
TORCH_INDEX="${TORCH_INDEX:-}"  # e.g. PyTorch's CPU wheel index, if reachable

make_venv() {
  local name=$1; shift
  echo "== $ROOT/$name"
  "$PYTHON" -m venv "$ROOT/$name"
  "$ROOT/$name/bin/pip" install --quiet "$@"
}

for name in "${@:-fedjax flower drjax pfl}"; do
  for n in $name; do
    case $n in
      # FedJAX 0.0.17 runs on jax 0.10 once run_fedjax.py sets jax.tree_map.
      fedjax) make_venv fedjax fedjax==0.0.17 dm-haiku==0.0.17 "${JAX[@]}" ;;
      # Flower pins protobuf<7; its ClientApp trains with jax + optax.
      flower) make_venv flower "flwr[simulation]==1.42.*" "${JAX[@]}" ;;
      drjax) make_venv drjax drjax==0.2.1 "${JAX[@]}" ;;
      # pfl 0.6.0 pins dp-accounting<0.6; torch first, so pfl[pytorch] keeps it.
      pfl)
        if [ -n "$TORCH_INDEX" ]; then
          make_venv pfl "$TORCH" --index-url "$TORCH_INDEX"
        else
          make_venv pfl "$TORCH"
        fi
        "$ROOT/pfl/bin/pip" install --quiet "pfl[pytorch]==0.6.0" ;;
      *) echo "unknown environment $n (fedjax, flower, drjax, pfl)" >&2; exit 2 ;;
    esac
  done
done
echo "done: run_all.py finds them under $ROOT (or set PEERS_VENVS=$ROOT)"
