# syntax=docker/dockerfile:1.10@sha256:865e5dd094beca432e8c0a1d5e1c465db5f998dca4e439981029b3b81fb39ed5
# The search service with its vector index on an NVIDIA GPU (--index-device cuda): the base
# dependencies and the [search-gpu] extra, FAISS's GPU build in place of faiss-cpu (both are
# the module `faiss`, so never both), with the CUDA 12 runtime and cuBLAS it needs as wheels.
# No torch. The host needs a driver for CUDA 12 (R525 or newer) and the NVIDIA Container Toolkit.
#
#   docker build -f deploy/docker/search-gpu.Dockerfile -t vpm/search-gpu .    (from the repository root)
#   docker run --gpus 1 -p 50052:50052 -v vpm-search:/var/lib/vpm vpm/search-gpu --encoder dns:///encoder:50051

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
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py search-gpu > requirements.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r requirements.txt \
    && pip check \
    && if python -c "import torch" 2>/dev/null; then echo "torch must not be here" >&2; exit 1; fi \
    && python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'not the GPU build'"

FROM python AS runtime
LABEL org.opencontainers.image.title="vpm-search-gpu" \
      org.opencontainers.image.description="Visual Product Matcher: catalog, FAISS index on a GPU and vpm.v1.Search over gRPC"
RUN groupadd --system --gid 10001 vpm \
    && useradd --system --no-log-init --uid 10001 --gid vpm --create-home --home-dir /home/vpm \
       --shell /usr/sbin/nologin vpm \
    && mkdir -p /var/lib/vpm \
    && chown vpm:vpm /var/lib/vpm
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY --from=protos /src/vpm/ vpm/
COPY vpm_common/ vpm_common/
COPY search_service/ search_service/
COPY indexer/ indexer/
# Bytecode is compiled now: the code is read-only to the service's user.
RUN python -m compileall -q /app
# A standalone container keeps its SQLite catalog and index snapshots in the volume;
# production points VPM_CATALOG_URL at PostgreSQL.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VPM_SEARCH_HOST="[::]" \
    VPM_SEARCH_PORT=50052 \
    VPM_SEARCH_METRICS_PORT=9152 \
    VPM_SEARCH_DATA_DIR=/var/lib/vpm \
    VPM_SEARCH_INDEX_DEVICE=cuda \
    VPM_CATALOG_URL=sqlite:////var/lib/vpm/catalog.db \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
VOLUME ["/var/lib/vpm"]
# gRPC, Prometheus metrics
EXPOSE 50052 9152
# SIGTERM: NOT_SERVING, running calls finish (VPM_SEARCH_GRACE_S), the index snapshot is flushed.
STOPSIGNAL SIGTERM
# Loading rebuilds a stale index from the catalog: give a large catalog time.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "vpm_common.health_probe", "--target", "127.0.0.1:50052", "--service", "vpm.v1.Search"]
ENTRYPOINT ["python", "-m", "search_service"]
