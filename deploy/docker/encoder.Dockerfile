# syntax=docker/dockerfile:1.10@sha256:865e5dd094beca432e8c0a1d5e1c465db5f998dca4e439981029b3b81fb39ed5
# The encoder on an NVIDIA GPU: PyTorch in fp16 with nvJPEG decode (--device cuda).
# PyTorch's wheels bring their own CUDA 13.0 libraries; the CUDA base image adds what the
# NVIDIA container runtime reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES and
# NVIDIA_REQUIRE_CUDA, so a host driver too old for CUDA 13.0, R580, is refused at start).
#
#   docker build -f deploy/docker/encoder.Dockerfile -t vpm/encoder .   (repository root)
#   docker run --gpus 1 -p 50051:50051 -v vpm-cache:/var/cache/vpm vpm/encoder

# Base images, pinned by tag and by digest, each named once.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS python
FROM ghcr.io/astral-sh/uv:0.12.3@sha256:2d890623d310b57771ce840f0da5eed5fc6d657da05ffaa45d82797b53fa3abc AS uv
FROM nvidia/cuda:13.0.2-base-ubuntu24.04@sha256:2ab6381d970b211fb93853796dc6707eb8a72575a375c422b17cf4d8b2641701 AS cuda

# Generated protobuf code is built here, never taken from the build context.
FROM python AS protos
WORKDIR /src
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py --no-base dev --only grpcio-tools > tools.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r tools.txt
COPY protos/ protos/
RUN python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. protos/vpm/v1/*.proto

# Ubuntu 24.04 ships Python 3.12 only: uv installs a self-contained CPython 3.11 (a
# python-build-standalone build, needing nothing from the system but glibc) into /opt/python.
FROM cuda AS deps
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1
RUN uv python install 3.11.14 \
    && "$(uv python find 3.11.14)" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
# PyPI's torch and torchvision for Linux are the CUDA 13.0 builds constraints.txt pins.
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py encoder > requirements.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r requirements.txt \
    && pip check \
    && python -c "import torch; assert torch.version.cuda, torch.__version__"

FROM cuda AS runtime
LABEL org.opencontainers.image.title="vpm-encoder" \
      org.opencontainers.image.description="Visual Product Matcher: CLIP encoder (vpm.v1.Encoder) on an NVIDIA GPU"
RUN groupadd --system --gid 10001 vpm \
    && useradd --system --no-log-init --uid 10001 --gid vpm --create-home --home-dir /home/vpm \
       --shell /usr/sbin/nologin vpm \
    && mkdir -p /var/cache/vpm \
    && chown vpm:vpm /var/cache/vpm
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY --from=protos /src/vpm/ vpm/
COPY vpm_common/ vpm_common/
COPY encoder_service/ encoder_service/
ENV PATH=/opt/venv/bin:$PATH
# Bytecode is compiled now: the code is read-only to the service's user.
RUN python -m compileall -q /app
# One cache volume: downloaded weights in weights/ (and Triton's kernels); --device cuda fails
# loudly where no GPU is visible rather than encoding on the CPU 100 times slower.
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/vpm \
    TORCH_HOME=/var/cache/vpm/torch \
    TRITON_CACHE_DIR=/var/cache/vpm/triton \
    VPM_ENCODER_HOST=0.0.0.0 \
    VPM_ENCODER_PORT=50051 \
    VPM_ENCODER_METRICS_PORT=9151 \
    VPM_ENCODER_DEVICE=cuda \
    VPM_ENCODER_CACHE_DIR=/var/cache/vpm
USER 10001:10001
VOLUME ["/var/cache/vpm"]
# gRPC, Prometheus metrics
EXPOSE 50051 9151
# SIGTERM: NOT_SERVING, running calls finish (VPM_ENCODER_GRACE_S), then exit 0.
STOPSIGNAL SIGTERM
# First start downloads the weights (~600 MB) and warms the model up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "vpm_common.health_probe", "--target", "127.0.0.1:50051", "--service", "vpm.v1.Encoder"]
ENTRYPOINT ["python", "-m", "encoder_service"]
