"""Every command the deployment files run, exercised as plain processes.

Docker images, compose services and Kubernetes containers each start a
`python -m <module>` with flags and environment variables, and health checks
run the probe. Here each one's module must exist, each flag must be one its
--help lists, and its settings must load from exactly that argv and that
environment (the image's ENV under the manifest's). The slow tests go
further, on this host: they lay out an image's /app as its Dockerfile copies
it, start its ENTRYPOINT with the image's ENV, and run its HEALTHCHECK command
until the service is SERVING. No image is built, so what only a build would
show (the base image, its system packages, the venv it installs) is not tested
here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from encoder_service.settings import ENV_PREFIX as ENCODER_PREFIX
from encoder_service.settings import EncoderSettings
from indexer.settings import ENV_PREFIX as INDEXER_PREFIX
from indexer.settings import IndexerSettings
from search_service.settings import SearchSettings
from tests.deploy.manifests import (
    COMPOSE,
    DOCKERFILES,
    IMAGES,
    ROOT,
    Dockerfile,
    dockerignore_patterns,
    documents,
    in_context,
    k8s_manifests,
    parse_dockerfile,
    tool,
)
from tests.support import free_port
from vpm_common.health_probe import ENV_PREFIX as PROBE_PREFIX
from vpm_common.health_probe import ProbeSettings
from vpm_common.settings import SettingsError, env_name, load_settings
from web.probe import ENV_PREFIX as WEB_PROBE_PREFIX
from web.probe import WebProbeSettings
from web.settings import ENV_PREFIX as WEB_PREFIX
from web.settings import WebSettings

SETTINGS = {
    "encoder_service": (EncoderSettings, ENCODER_PREFIX),
    "search_service": (SearchSettings, "VPM_SEARCH_"),
    "indexer": (IndexerSettings, INDEXER_PREFIX),
    "vpm_common.health_probe": (ProbeSettings, PROBE_PREFIX),
    "web": (WebSettings, WEB_PREFIX),
    "web.probe": (WebProbeSettings, WEB_PROBE_PREFIX),
}
KNOWN_VARIABLES = {
    env_name(field, prefix)
    for cls, prefix in SETTINGS.values()
    for field in dataclasses.fields(cls)
}


@dataclass(frozen=True)
class Launch:
    """One command a deployment file starts: where it is written, its argv and environment."""

    origin: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def module(self) -> str:
        assert self.argv[:2] == ("python", "-m"), f"{self.origin}: {self.argv}"
        return self.argv[2]

    @property
    def args(self) -> list[str]:
        return list(self.argv[3:])


def _interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _image_launch(dockerfile: Dockerfile, entrypoint: list[str] | None, command: list[str] | None,
                  env: dict[str, str], origin: str) -> Launch:  # fmt: skip
    """What a container runs: ENTRYPOINT + CMD, either overridden, over the image's ENV."""
    argv = [*(entrypoint or dockerfile.exec_form("ENTRYPOINT")), *(command or [])]
    if entrypoint is None and command is None:
        argv += dockerfile.exec_form("CMD")
    return Launch(origin, tuple(argv), tuple({**dockerfile.env(), **env}.items()))


def launches() -> list[Launch]:
    found = []
    for path in DOCKERFILES:
        dockerfile = parse_dockerfile(path)
        found.append(_image_launch(dockerfile, None, None, {}, path.name))
        found.append(Launch(f"{path.name} HEALTHCHECK", tuple(dockerfile.healthcheck()[1])))
    (compose,) = documents(COMPOSE)
    for name, service in compose["services"].items():
        check = service.get("healthcheck", {})
        if check.get("test", [""])[0] == "CMD" and check["test"][1] == "python":
            found.append(Launch(f"compose {name} healthcheck", tuple(check["test"][1:])))
        image = service["image"].split(":")[0]
        if image in IMAGES:
            env = {k: _interpolate(v) for k, v in service.get("environment", {}).items()}
            found.append(
                _image_launch(
                    parse_dockerfile(IMAGES[image]),
                    service.get("entrypoint"),
                    service.get("command"),
                    env,
                    f"compose {name}",
                )  # fmt: skip
            )
    resources = [doc for path in k8s_manifests() for doc in documents(path)]
    config = {d["metadata"]["name"]: d["data"] for d in resources if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in resources if d["kind"] == "Secret"}
    for resource in resources:
        if resource["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in resource["spec"]["template"]["spec"]["containers"]:
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                env.update(config[source["configMapRef"]["name"]])
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                env[variable["name"]] = (
                    secrets[ref["name"]][ref["key"]] if ref else variable["value"]
                )
            dockerfile = parse_dockerfile(IMAGES[container["image"].split(":")[0]])
            origin = f"k8s {resource['kind']}/{resource['metadata']['name']}"
            # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD.
            found.append(
                _image_launch(
                    dockerfile, container.get("command"), container.get("args"), env, origin
                )  # fmt: skip
            )
    return found


LAUNCHES = launches()


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    """`python -m <module> --help` of every module launched, run side by side."""
    modules = sorted({launch.module for launch in LAUNCHES})
    running = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in modules
    }
    texts = {}
    for module, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"python -m {module} --help failed:\n{err}"
        texts[module] = out
    return texts


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for the /catalog mount: the indexer checks its paths at start."""
    folder = tmp_path_factory.mktemp("catalog")
    (folder / "images").mkdir()  # the indexer's --images, and the page's
    (folder / "styles.csv").write_text("id,gender\n")
    return folder


def test_every_deployment_file_is_covered() -> None:
    origins = {launch.origin for launch in LAUNCHES}
    assert {"encoder.Dockerfile", "encoder-cpu.Dockerfile", "search.Dockerfile",
            "compose encoder", "compose encoder-cpu", "compose search", "compose indexer",
            "k8s Deployment/vpm-encoder", "k8s StatefulSet/vpm-search", "k8s Job/vpm-indexer",
            "search.Dockerfile HEALTHCHECK", "compose search healthcheck",
            "web.Dockerfile", "web.Dockerfile HEALTHCHECK", "compose web",
            "compose web healthcheck", "k8s Deployment/vpm-web"} <= origins  # fmt: skip


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.origin)
def test_flags_are_real_and_settings_load(
    launch: Launch, help_texts: dict[str, str], catalog_dir: Path
) -> None:
    flags = [arg.split("=")[0] for arg in launch.args if arg.startswith("--")]
    unknown = [
        flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", help_texts[launch.module])
    ]
    assert not unknown, f"{launch.origin}: python -m {launch.module} has no {unknown}"
    cls, prefix = SETTINGS[launch.module]
    args = [arg.replace("/catalog", str(catalog_dir), 1) if arg.startswith("/catalog") else arg
            for arg in launch.args]  # fmt: skip
    try:
        settings = load_settings(cls, prefix, args, dict(launch.env))
    except SettingsError as error:
        pytest.fail(f"{launch.origin}: {error}")
    own = {env_name(f, prefix) for f in dataclasses.fields(cls)}
    for key in dict(launch.env):
        if key.startswith(prefix):
            assert key in own, f"{launch.origin}: {launch.module} reads no {key}"
        elif key.startswith("VPM_"):
            assert key in KNOWN_VARIABLES or key == "VPM_CATALOG_URL", f"{launch.origin}: {key}"
    if launch.module == "search_service" and not launch.origin.endswith("Dockerfile"):
        assert settings.encoder and settings.catalog_url.startswith("postgresql+psycopg://")


def test_pg_isready_takes_the_compose_health_check_flags() -> None:
    pg_isready = tool("pg_isready")
    if pg_isready is None:
        pytest.skip("pg_isready is not installed (PostgreSQL's client)")
    (compose,) = documents(COMPOSE)
    command = compose["services"]["postgres"]["healthcheck"]["test"][1:]
    help_text = subprocess.run([pg_isready, "--help"], capture_output=True, text=True).stdout
    assert all(flag in help_text for flag in command if flag.startswith("--"))


# -- the images' commands as processes on this host (no image is built) ------------------------

IMAGE_PATHS = {"/var/lib/vpm": "data", "/var/cache/vpm": "cache"}


def lay_out_image(dockerfile: Dockerfile, into: Path) -> Path:
    """The final stage's /app as the Dockerfile fills it: COPY from the build context (what
    .dockerignore lets through) and vpm/ generated by the protos stage's own RUN."""
    patterns = dockerignore_patterns()
    app = into / "app"
    for copy in dockerfile.final.all("COPY"):
        words = copy.text.split()
        if words[0] == "--from=protos":
            (app / words[2]).mkdir(parents=True)
            shutil.copytree(_generate_protos(dockerfile, into / "src") / words[1].split("/")[2],
                            app / words[2], dirs_exist_ok=True)  # fmt: skip
        elif not words[0].startswith("--from="):
            *sources, destination = words
            for source in sources:
                for file in sorted((ROOT / source).rglob("*")):
                    relative = file.relative_to(ROOT).as_posix()
                    if file.is_file() and in_context(relative, patterns):
                        target = app / destination / file.relative_to(ROOT / source)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, target)
    return app


def _generate_protos(dockerfile: Dockerfile, src: Path) -> Path:
    stage = dockerfile.stage("protos")
    shutil.copytree(ROOT / "protos", src / "protos")
    (command,) = [run.text for run in stage.all("RUN") if "grpc_tools.protoc" in run.text]
    assert command.startswith("python ")
    subprocess.run(["bash", "-c", f'"{sys.executable}" {command[len("python ") :]}'], cwd=src,
                   check=True, timeout=120)  # fmt: skip
    return src


@dataclass
class ImageProcess:
    """An image's ENTRYPOINT as a host process from a laid-out /app, only that /app importable."""

    process: subprocess.Popen
    env: dict[str, str]
    healthcheck: list[str]
    log: Path

    def healthy(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.healthcheck, env=self.env, capture_output=True, text=True,
                              timeout=30)  # fmt: skip

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            if self.healthy().returncode == 0:
                return
            time.sleep(1.0)
        pytest.fail(f"not healthy after {timeout_s} s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def start_image(tmp_path: Path) -> Iterator[Callable[..., ImageProcess]]:
    started: list[subprocess.Popen] = []

    def start(dockerfile_path: Path, overrides: dict[str, str]) -> ImageProcess:
        dockerfile = parse_dockerfile(dockerfile_path)
        app = lay_out_image(dockerfile, tmp_path)
        prefix = {"search_service": "VPM_SEARCH_", "encoder_service": "VPM_ENCODER_",
                  "web": "VPM_WEB_"}[dockerfile.exec_form("ENTRYPOINT")[2]]  # fmt: skip
        image_env = dockerfile.env()
        port = image_env[f"{prefix}PORT"]
        local_port = str(free_port())
        paths = {"/app": str(app), "/opt/venv/bin": str(Path(sys.executable).parent)}
        paths |= {image: str(tmp_path / local) for image, local in IMAGE_PATHS.items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("VPM_")}
        for key, value in image_env.items():
            for image_path, local in paths.items():
                value = value.replace(image_path, local)
            env[key] = value
        # Only the laid-out /app and the installed packages: `-S` skips the .pth that puts
        # this repository on the path of the development environment.
        site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *sorted(site)])
        env |= {f"{prefix}PORT": local_port, f"{prefix}METRICS_PORT": "0", **overrides}
        python = [sys.executable, "-S"]
        entrypoint = dockerfile.exec_form("ENTRYPOINT")
        _options, healthcheck = dockerfile.healthcheck()
        healthcheck = [arg.replace(f":{port}", f":{local_port}") for arg in healthcheck]
        log = tmp_path / "service.log"
        process = subprocess.Popen(
            [*python, *entrypoint[1:]], cwd=tmp_path, env=env, stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(process)
        return ImageProcess(process, env, [*python, *healthcheck[1:]], log)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _stops_on_sigterm(image: ImageProcess) -> None:
    image.process.send_signal(signal.SIGTERM)
    assert image.process.wait(30) == 0, image.log.read_text()[-3000:]
    assert image.healthy().returncode == 1


@pytest.mark.slow
def test_search_entrypoint_run_on_the_host_passes_the_healthcheck_and_stops_on_sigterm(
    start_image: Callable[..., ImageProcess],
) -> None:
    """search.Dockerfile's ENTRYPOINT and HEALTHCHECK, run here from its laid-out /app."""
    image = start_image(IMAGES["vpm/search"], {})
    image.wait_healthy(60)
    assert "catalog.db" in os.listdir(image.env["VPM_SEARCH_DATA_DIR"]), "state in the volume"
    _stops_on_sigterm(image)


@pytest.mark.slow
def test_web_entrypoint_run_on_the_host_passes_the_healthcheck_and_stops_on_sigterm(
    start_image: Callable[..., ImageProcess],
) -> None:
    """web.Dockerfile's ENTRYPOINT and HEALTHCHECK, run here from its laid-out /app."""
    # No search service behind it: the page still serves, and says so on the page.
    image = start_image(IMAGES["vpm/web"], {})
    image.wait_healthy(60)
    _stops_on_sigterm(image)


@pytest.mark.slow
def test_cpu_encoder_entrypoint_run_on_the_host_passes_the_healthcheck_and_stops_on_sigterm(
    start_image: Callable[..., ImageProcess], model_cache: Path
) -> None:
    """encoder-cpu.Dockerfile's ENTRYPOINT and HEALTHCHECK, run here from its laid-out /app."""
    # No weights can be downloaded here: the tiny model with seeded random weights.
    image = start_image(
        IMAGES["vpm/encoder-cpu"],
        {"VPM_ENCODER_MODEL": "VPM-Tiny", "VPM_ENCODER_PRETRAINED": "none"},
    )
    image.wait_healthy(120)
    assert os.listdir(image.env["VPM_ENCODER_CACHE_DIR"]), "the ONNX export lands in the volume"
    _stops_on_sigterm(image)
