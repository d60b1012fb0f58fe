"""The services secured as a user starts them: real processes, flags, variables and token files."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.catalog import generate
from tests.security.conftest import Pki, new_token
from tests.support import ROOT, ServiceProcess, free_port
from vpm_common.health_probe import check_health
from vpm_common.security import ClientSecurity

pytestmark = pytest.mark.slow


def wait_serving(
    process: ServiceProcess, port: int, service: str, security: ClientSecurity
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.process.poll() is None, process.output[-3000:]
        if check_health(f"127.0.0.1:{port}", service, 1.0, security)[0]:
            return
        time.sleep(0.2)
    pytest.fail(f"{process.module} not SERVING:\n{process.output[-3000:]}")


def python(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


def test_secured_stack_as_processes(
    pki: Pki,
    tmp_path: Path,
    model_cache: Path,
    token_file: Callable[..., Path],
    processes: list[ServiceProcess],
) -> None:
    search_token, indexer_token, query_token = new_token(), new_token(), new_token()
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
           "--tls-client-ca", str(pki.ca)]  # fmt: skip
    client = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
              "--tls-key", str(pki.client.key)]  # fmt: skip
    probe_security = pki.client_security()
    encoder_port, search_port = free_port(), free_port()
    encoder = ServiceProcess(
        "encoder_service",
        ["--model", "VPM-Tiny", "--pretrained", "none", "--port", str(encoder_port),
         "--metrics-port", "0", "--cache-dir", str(model_cache), *tls,
         "--auth-token-file", str(token_file(indexer_token, name="encoder-tokens"))],
        tmp_path / "encoder.log",
        env={"VPM_ENCODER_AUTH_TOKEN": search_token},
    )  # fmt: skip
    processes.append(encoder)
    search = ServiceProcess(
        "search_service",
        ["--port", str(search_port), "--data-dir", str(tmp_path / "data"),
         "--catalog-url", f"sqlite:///{tmp_path}/catalog.db", "--metrics-port", "0",
         "--encoder", f"127.0.0.1:{encoder_port}", *tls,
         "--auth-token-file", str(token_file(indexer_token, query_token, name="search-tokens")),
         "--encoder-tls-ca", str(pki.ca), "--encoder-tls-cert", str(pki.client.cert),
         "--encoder-tls-key", str(pki.client.key)],
        tmp_path / "search.log",
        env={"VPM_SEARCH_ENCODER_AUTH_TOKEN": search_token},
    )  # fmt: skip
    processes.append(search)
    wait_serving(encoder, encoder_port, "vpm.v1.Encoder", probe_security)
    wait_serving(search, search_port, "vpm.v1.Search", probe_security)
    assert "TLS, client certificates, bearer tokens" in encoder.output

    # The container health check, as the manifests would run it with TLS on.
    probe = ["vpm_common.health_probe", "--target", f"127.0.0.1:{search_port}",
             "--service", "vpm.v1.Search"]  # fmt: skip
    assert python(*probe, *client).returncode == 0
    assert python(*probe, "--timeout-s", "2").returncode == 1, "plain text meets TLS"

    catalog = tmp_path / "catalog"
    generate(catalog, count=10)
    indexing = python(
        "indexer", "--styles", str(catalog / "styles.csv"), "--images", str(catalog / "images"),
        "--encoder", f"127.0.0.1:{encoder_port}", "--search", f"127.0.0.1:{search_port}",
        "--progress", "off", *client,
        env={"VPM_INDEXER_AUTH_TOKEN": indexer_token},
    )  # fmt: skip
    assert indexing.returncode == 0, indexing.stderr[-3000:]
    assert "encoded            10 images" in indexing.stdout

    with (catalog / "styles.csv").open() as rows:
        product = next(csv.DictReader(rows))["id"]
    query = python(
        "demo.query", "--image", str(catalog / "images" / f"{product}.jpg"),
        "--search", f"localhost:{search_port}", *client,
        "--auth-token-file", str(token_file(query_token, name="query-token")),
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    assert query.stdout.splitlines()[2].split()[:3] == ["1", "1.000", product]
    refused = python("demo.query", "--id", product, "--search", f"localhost:{search_port}",
                     *client)  # fmt: skip
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr

    for process in (search, encoder):
        assert process.stop() == 0
        for token in (search_token, indexer_token, query_token):
            assert token not in process.output, f"{process.module} logged a token"
