#!/usr/bin/env bash
# Download into .whl/ the wheels that a GPU machine without internet lacks, for bench/gpu.sh.
#
# That machine brings its own PyTorch stack (torch, torchvision, timm, numpy, pillow,
# onnxruntime, grpcio, protobuf, ...); this adds open_clip and the gRPC extras, pinned to
# the versions in constraints.txt. grpcio and protobuf come along too: the code generated
# by our grpcio-tools refuses an older grpcio, and a protobuf runtime of another major
# version, so the machine's own may not do.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION [DEST]]     # defaults: 3.12 .whl
set -euo pipefail
cd "$(dirname "$0")/.."

python_version="${1:-3.12}"
dest="${2:-.whl}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
packages=(
    open_clip_torch ftfy wcwidth
    grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf
)

pin() {  # the version constraints.txt pins for a package
    local version
    version=$(grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3)
    [ -n "$version" ] || { echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; exit 2; }
    echo "$version"
}

mkdir -p "$dest"
rm -f "$dest"/*.whl  # wheels for another Python would clash at install
for package in "${packages[@]}"; do
    "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" "$package==$(pin "$package")"
done
ls -1 "$dest"
du -sh "$dest"
