# syntax=docker/dockerfile:1.10@sha256:865e5dd094beca432e8c0a1d5e1c465db5f998dca4e439981029b3b81fb39ed5
# The encoder on CPUs: PyTorch's CPU-only build (no CUDA libraries, ~1/5 the size) and
# ONNX Runtime, which the encoder picks by measurement at start (--runtime auto).
#
#   docker build -f deploy/docker/encoder-cpu.Dockerfile -t vpm/encoder-cpu .   (repository root)
#   docker run -p 50051:50051 -v vpm-cache:/var/cache/vpm vpm/encoder-cpu

# The one pin of the base image (tag and digest of its multi-platform index).
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS python

# Generated protobuf code is built here, never taken from the build context.
FROM python AS protos
WORKDIR /src
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py --no-base dev --only grpcio-tools > tools.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r tools.txt
COPY protos/ protos/
RUN python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. protos/vpm/v1/*.proto

# Dependencies only, in a virtual environment: this layer changes with
# pyproject.toml and constraints.txt, not with the code.
FROM python AS deps
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
# torch and torchvision at pyproject's versions, from PyTorch's CPU wheel index (PyPI's
# Linux wheels are CUDA builds); --no-deps, so their dependencies still come from PyPI
# at the versions constraints.txt pins, in the second step, which keeps the CPU build.
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py encoder --only torch,torchvision > torch.txt \
    && pip install --disable-pip-version-check --no-deps \
       --index-url https://download.pytorch.org/whl/cpu -r torch.txt \
    && python requirements.py encoder > requirements.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r requirements.txt \
    && pip check \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

FROM python AS runtime
LABEL org.opencontainers.image.title="vpm-encoder-cpu" \
      org.opencontainers.image.description="Visual Product Matcher: CLIP encoder (vpm.v1.Encoder) on CPUs"
RUN groupadd --system --gid 10001 vpm \
    && useradd --system --no-log-init --uid 10001 --gid vpm --create-home --home-dir /home/vpm \
       --shell /usr/sbin/nologin vpm \
    && mkdir -p /var/cache/vpm \
    && chown vpm:vpm /var/cache/vpm
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY --from=protos /src/vpm/ vpm/
COPY vpm_common/ vpm_common/
COPY encoder_service/ encoder_service/
# Bytecode is compiled now: the code is read-only to the service's user.
RUN python -m compileall -q /app
# One cache volume: downloaded weights in weights/, ONNX exports (per model and
# weights) in onnx/. The thread defaults follow the container's CPU limit.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/vpm \
    TORCH_HOME=/var/cache/vpm/torch \
    VPM_ENCODER_HOST=0.0.0.0 \
    VPM_ENCODER_PORT=50051 \
    VPM_ENCODER_METRICS_PORT=9151 \
    VPM_ENCODER_DEVICE=cpu \
    VPM_ENCODER_CACHE_DIR=/var/cache/vpm
USER 10001:10001
VOLUME ["/var/cache/vpm"]
# gRPC, Prometheus metrics
EXPOSE 50051 9151
# SIGTERM: NOT_SERVING, running calls finish (VPM_ENCODER_GRACE_S), then exit 0.
STOPSIGNAL SIGTERM
# First start: weights download and ONNX export with its parity check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "vpm_common.health_probe", "--target", "127.0.0.1:50051", "--service", "vpm.v1.Encoder"]
ENTRYPOINT ["python", "-m", "encoder_service"]
