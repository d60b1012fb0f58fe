#!/usr/bin/env bash
# The GPU benchmarks, in one run, on a machine with an NVIDIA GPU and no internet.
#
# The machine brings Python 3.12 and its own PyTorch stack; the rest comes as wheels in
# .whl/ (made here by bench/gpu/gpu_wheels.sh), installed into /tmp/site. The protobuf code is
# generated if vpm/ is absent. Each step prints as it goes and writes its figures and log
# to $OUT (data/bench when OUT is unset); one failing step does not stop the next. Without
# a GPU each step runs a smoke version and exits 0.
#
#   bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/gpu/gpu_env.sh
out="${OUT:-data/bench}"
mkdir -p "$out"
status=0

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || echo "nvidia-smi: failed"
else
    echo "nvidia-smi: not found"
fi

# 1. Encoder and indexer (issue 15): the batched RPC, one and several encoder processes,
#    the indexer over a 42,700-image catalog, fp16 parity, the CUDA tests. At most 6 minutes.
PYTHONUNBUFFERED=1 timeout -k 15 350 "$python" -m bench.gpu.gpu_bench 2>&1 | tee "$out/gpu-encoder.log" || {
    status=$?
    echo "gpu.sh: bench.gpu.gpu_bench exited $status"
}

# --- 2. The search index on the GPU (issue 18, bench/gpu/gpu_index_bench.py). At most 5 minutes. ---
#    The index's GPU tests (they skip, saying why, without a GPU FAISS), then CPU and GPU index
#    side by side: 1M and 10M vectors, the Search RPC at concurrency 1 and 64, build time, GPU
#    memory, the crossover. FAISS's GPU build comes from `VPM_GPU_INDEX_WHEELS=1 bash
#    bench/gpu/gpu_wheels.sh` (read why it is opt-in there); without it the step says so in one line.
#    VPM_GPU_INDEX_ARGS shrinks it (e.g. "--sizes 1000000 --budget-s 120"); VPM_GPU_INDEX=0 skips.
if [ "${VPM_GPU_INDEX:-1}" != 0 ]; then
    if "$python" -c "import sys; from search_service.index.gpu import gpu_missing; sys.exit(gpu_missing() is not None)"; then
        timeout -k 5 60 "$python" -m pytest -q -p no:cacheprovider -rs \
            tests/search/index/test_index_device.py -k gpu 2>&1 | tee "$out/gpu-index-tests.log" \
            || { status=$?; echo "gpu.sh: the index's GPU tests exited $status"; }
    fi
    # shellcheck disable=SC2086  # the arguments are meant to split
    timeout -k 15 270 "$python" -m bench.gpu.gpu_index_bench ${VPM_GPU_INDEX_ARGS:-} 2>&1 \
        | tee "$out/gpu-index.log" \
        || { status=$?; echo "gpu.sh: bench.gpu.gpu_index_bench exited $status"; }
fi
# --- end of 2 ---

exit "$status"
