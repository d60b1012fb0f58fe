# syntax=docker/dockerfile:1.10@sha256:865e5dd094beca432e8c0a1d5e1c465db5f998dca4e439981029b3b81fb39ed5
# The search page: an HTTP server (uvicorn) that is one more client of vpm.v1.Search.
# The base dependencies and the [web] extra: no torch, no faiss.
#
#   docker build -f deploy/docker/web.Dockerfile -t vpm/web .    (from the repository root)
#   docker run -p 127.0.0.1:8080:8080 -v "$PWD/data/demo-catalog:/catalog:ro" vpm/web \
#       --search search:50052 --images /catalog/images

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
    python requirements.py web > requirements.txt \
    && pip install --disable-pip-version-check -c constraints.txt -r requirements.txt \
    && pip check

FROM python AS runtime
LABEL org.opencontainers.image.title="vpm-web" \
      org.opencontainers.image.description="Visual Product Matcher: the search page and its read-only JSON API, a client of vpm.v1.Search"
RUN groupadd --system --gid 10001 vpm \
    && useradd --system --no-log-init --uid 10001 --gid vpm --create-home --home-dir /home/vpm \
       --shell /usr/sbin/nologin vpm
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY --from=protos /src/vpm/ vpm/
COPY vpm_common/ vpm_common/
COPY web/ web/
# Bytecode is compiled now: the code is read-only to the page's user.
RUN python -m compileall -q /app
# It writes nothing but spooled uploads in /tmp; thumbnails are kept in memory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VPM_WEB_HOST=0.0.0.0 \
    VPM_WEB_PORT=8080 \
    VPM_WEB_SEARCH=search:50052
USER 10001:10001
# HTTP
EXPOSE 8080
# SIGTERM: running requests get 10 s, then the channel to search is closed.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "web.probe", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["python", "-m", "web"]
