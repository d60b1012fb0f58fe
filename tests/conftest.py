"""Fixtures shared by every tier: real encoder servers (tiny model) running in-process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encoder_service.factory import build_engine
from encoder_service.metrics import EncoderMetrics
from encoder_service.server import EncoderApp, create_server
from encoder_service.settings import EncoderSettings
from tests.support import ServerThread


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of exported ONNX graphs for the whole session."""
    return tmp_path_factory.mktemp("vpm-cache")


@pytest.fixture(scope="session")
def tiny_settings(model_cache: Path) -> Callable[..., EncoderSettings]:
    """Factory: encoder settings for the tiny model with seeded random weights, on a free port."""

    def make(**overrides: object) -> EncoderSettings:
        base = EncoderSettings(
            host="127.0.0.1",
            port=0,
            model="VPM-Tiny",
            pretrained="none",
            runtime="onnx",
            metrics_port=0,
            cache_dir=model_cache,
        )
        return dataclasses.replace(base, **overrides)

    return make


def start_encoder(settings: EncoderSettings) -> tuple[ServerThread, EncoderApp]:
    """A real encoder server in-process, SERVING once its engine is built and warm."""
    app = EncoderApp()
    metrics = EncoderMetrics()

    async def build():  # noqa: ANN202 - ServerThread's builder
        server, port = await create_server(settings, app)
        await app.serve(build_engine(settings, metrics))
        return server, port

    thread = ServerThread(build)
    thread.start()
    return thread, app


@pytest.fixture
def make_encoder(tiny_settings: Callable[..., EncoderSettings]) -> Iterator[Callable[..., tuple]]:
    """Factory: start_encoder(tiny_settings(**overrides)); all it started stops after the test."""
    started: list[tuple[ServerThread, EncoderApp]] = []

    def make(**overrides: object) -> tuple[ServerThread, EncoderApp]:
        started.append(start_encoder(tiny_settings(**overrides)))
        return started[-1]

    yield make
    for thread, app in started:
        thread.stop(0)
        if app.engine is not None:
            app.engine.close(drain=False)


@pytest.fixture(scope="session")
def encoder_server(tiny_settings: Callable[..., EncoderSettings]) -> Iterator[ServerThread]:
    """One tiny-model encoder for the whole session; `.target` is its host:port."""
    thread, app = start_encoder(tiny_settings())
    yield thread
    thread.stop(0)
    app.engine.close(drain=False)
