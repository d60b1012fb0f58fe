"""The container health probe against real gRPC servers: the encoder, and a bare health service."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from grpc import aio
from grpc_health.v1 import health

from tests.support import ROOT, ServerThread, free_port
from vpm_common.health_probe import check_health, main
from vpm_common.server.serving import add_health_and_reflection, set_serving, stop_gracefully

SERVICE = "vpm.v1.Test"


class HealthServer:
    """A real aio server with only health and reflection, whose status the test sets."""

    def __init__(self) -> None:
        self.health = health.aio.HealthServicer()

        async def build() -> tuple[aio.Server, int]:
            server = aio.server()
            add_health_and_reflection(server, [SERVICE], self.health)
            port = server.add_insecure_port("127.0.0.1:0")
            await set_serving(self.health, [SERVICE], False)
            return server, port

        self.thread = ServerThread(build)
        self.thread.start()

    @property
    def target(self) -> str:
        return self.thread.target

    def serving(self, serving: bool) -> None:
        self.thread.run(set_serving(self.health, [SERVICE], serving))

    def drain(self) -> None:
        """What a service does on SIGTERM: NOT_SERVING to everyone, then stop."""
        self.thread.run(stop_gracefully(self.thread.server, self.health, 1.0))


@pytest.fixture
def health_server() -> Iterator[Callable[[], HealthServer]]:
    started: list[HealthServer] = []

    def make() -> HealthServer:
        started.append(HealthServer())
        return started[-1]

    yield make
    for server in started:
        server.thread.stop(0)


def test_serving_encoder_passes_for_its_service_and_the_server(
    encoder_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", encoder_server.target, "--service", "vpm.v1.Encoder"]) == 0
    assert capsys.readouterr().out == f"{encoder_server.target} vpm.v1.Encoder: SERVING\n"
    assert main(["--target", encoder_server.target]) == 0
    assert check_health(encoder_server.target, "vpm.v1.Search") == (False, "NOT_FOUND")


def test_status_follows_the_lifecycle_loading_serving_draining(
    health_server: Callable[[], HealthServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = health_server()
    argv = ["--target", server.target, "--service", SERVICE, "--timeout-s", "2"]
    assert main(argv) == 1, "NOT_SERVING while loading"
    assert capsys.readouterr().err == f"{server.target} {SERVICE}: NOT_SERVING\n"
    server.serving(True)
    assert main(argv) == 0
    assert main(["--target", server.target, "--timeout-s", "2"]) == 0, 'the server as a whole ("")'
    server.drain()
    assert main(argv) == 1, "gone after SIGTERM's drain"


def test_nothing_listening_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert main(["--target", target, "--timeout-s", "2"]) == 1
    assert capsys.readouterr().err.startswith(f'{target} "": UNAVAILABLE')


def test_bad_flags_and_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--port", "1"])
    assert exited.value.code == 2
    assert main(["--timeout-s", "0"]) == 2
    assert "--timeout-s / VPM_PROBE_TIMEOUT_S: must be positive" in capsys.readouterr().err


def test_runs_as_a_process_and_imports_grpc_only(encoder_server: ServerThread) -> None:
    """The HEALTHCHECK way, `python -m vpm_common.health_probe`, without torch, faiss or numpy."""
    probe = subprocess.run(
        [sys.executable, "-m", "vpm_common.health_probe", "--target", encoder_server.target,
         "--service", "vpm.v1.Encoder"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (probe.returncode, probe.stdout) == (
        0,
        f"{encoder_server.target} vpm.v1.Encoder: SERVING\n",
    ), probe.stderr
    heavy = subprocess.run(
        [sys.executable, "-c",
         "import sys, vpm_common.health_probe; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss', 'numpy', "
         "'sqlalchemy', 'open_clip', 'onnxruntime', 'PIL'}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert heavy.stdout.strip() == "[]", heavy.stderr
