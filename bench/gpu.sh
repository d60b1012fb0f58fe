#!/usr/bin/env bash
# The GPU benchmark of issue 7, in one run, on a machine with an NVIDIA GPU and no internet.
#
# The machine brings Python 3.12 and its own PyTorch stack; the rest comes as wheels in
# .whl/ (made here by bench/gpu_wheels.sh), installed into /tmp/site. The protobuf code is
# generated if vpm/ is absent. Figures are printed, and written to $OUT/gpu.json when OUT
# is set. Without a GPU it runs a smoke version and exits 0.
#
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/gpu_env.sh

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || echo "nvidia-smi: failed"
else
    echo "nvidia-smi: not found"
fi
exec "$python" -m bench.gpu_bench
