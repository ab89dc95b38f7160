#!/usr/bin/env bash
# The vllm backend against a real vLLM server on a GPU: the CUDA build of the vLLM that
# docker-compose.yml and deploy/k8s/vllm pin (0.33.0), the same checks as on a CPU
# (tests/services/test_vllm_e2e.py: scores equal transformers' on the same inputs, the end of
# the response kept under truncation, one BOS, the API key, the max_model_len check).
#
#   benchmarks/gpu_vllm_check.sh            # from the repository root, on a machine with a GPU
#
# Environment:
#   RR_VLLM_PYTHON   the Python of an environment with vLLM (CUDA build) installed; unset: one is
#                    made in VLLM_VENV with `pip install vllm==$VLLM_VERSION` (needs PyPI)
#   VLLM_VERSION     default 0.33.0; VLLM_VENV default ~/.cache/rr-vllm-$VLLM_VERSION
#   PROJECT_PYTHON   the Python with reward-router's dependencies (default: .venv/bin/python,
#                    else python3)
#   RR_VLLM_EXTRA_ARGS  more `vllm serve` flags (default: a small --gpu-memory-utilization)
#   RR_VLLM_TOL      score tolerance against transformers (default 2e-3; float32 both sides)
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=${VLLM_VERSION:-0.33.0}
if [ -z "${PROJECT_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PROJECT_PYTHON=.venv/bin/python; else PROJECT_PYTHON=python3; fi
fi
if [ -z "${RR_VLLM_PYTHON:-}" ]; then
  VLLM_VENV=${VLLM_VENV:-$HOME/.cache/rr-vllm-$VLLM_VERSION}
  if [ ! -x "$VLLM_VENV/bin/python" ]; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install "vllm==$VLLM_VERSION"
  fi
  RR_VLLM_PYTHON=$VLLM_VENV/bin/python
fi
export RR_VLLM_PYTHON

nvidia-smi -L
# The server must really be the CUDA build, with a GPU it can use: fail here, not skip later.
"$RR_VLLM_PYTHON" - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "torch in the vLLM environment sees no GPU"
print(f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      torch.cuda.get_device_name(0))
PY

export RR_VLLM_EXTRA_ARGS=${RR_VLLM_EXTRA_ARGS:---gpu-memory-utilization 0.2}
log=$(mktemp)
set +e
PYTHONPATH=$PWD "$PROJECT_PYTHON" -m pytest tests/services/test_vllm_e2e.py -m slow -v \
  -p no:cacheprovider -rs "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# A skipped test checked nothing: on this machine that is a failure too.
if [ "$rc" -ne 0 ] || grep -q "SKIPPED" "$log"; then
  echo "gpu_vllm_check: FAILED (pytest rc $rc, or a test skipped)"
  exit 1
fi
echo "gpu_vllm_check: passed"
