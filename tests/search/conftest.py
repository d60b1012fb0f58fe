"""Fixtures of the search tests: catalogs on SQLite and PostgreSQL, engines, in-process servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from search_service.encoders.embedder import QueryEmbedder
from search_service.encoders.query_cache import CachingEmbedder
from search_service.engine import SearchEngine
from search_service.models import Product
from search_service.rpc.server import SearchApp, create_server
from search_service.settings import SearchSettings
from search_service.storage.catalog import Catalog, scratch_database
from tests.search.fake_encoder import FakeEncoder, start_fake_encoder
from tests.support import ServerThread
from vpm.v1 import search_pb2_grpc
from vpm_common.encoder_client.encoder_pool import EncoderPool

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
GENDERS = ("Men", "Women", "Unisex")
MASTERS = ("Apparel", "Footwear", "Accessories")
COLOURS = ("Black", "White", "Blue", "Red", "Green", "Navy Blue", "Grey", "Brown")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this session's own on the machine's PostgreSQL; dropped afterwards."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_database(f"{POSTGRES}/test", "vpm_search_test"))
        except sa.exc.OperationalError as err:
            pytest.fail(
                f"PostgreSQL at 127.0.0.1:5432 (user postgres, database test) is unreachable: "
                f"{err.orig}. The catalog suite runs on PostgreSQL too; start the server "
                "(.ci/run does) and run again.",
                pytrace=False,
            )
        yield url


def _empty_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TABLE IF EXISTS products, deletions, catalog_state, alembic_version CASCADE"
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty catalog database: a SQLite file, or the PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    url = request.getfixturevalue("postgres_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def postgres_catalog_url(postgres_url: str) -> str:
    """The URL of an empty catalog in this session's PostgreSQL database."""
    _empty_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/catalog.db"


@pytest.fixture
def open_catalog() -> Iterator[Callable[[str], Catalog]]:
    """Factory: Catalog.open(url); every catalog it opened is closed after the test."""
    opened: list[Catalog] = []

    def make(url: str) -> Catalog:
        opened.append(Catalog.open(url))
        return opened[-1]

    yield make
    for catalog in opened:
        catalog.close()


@pytest.fixture
def open_engine(tmp_path: Path) -> Iterator[Callable[..., SearchEngine]]:
    """Factory: a loaded SearchEngine over `url` (data under tmp_path); closed after the test."""
    engines: list[SearchEngine] = []

    def make(url: str, data_dir: Path | None = None, **options: object) -> SearchEngine:
        engine = SearchEngine(Catalog.open(url), data_dir or tmp_path / "data", **options)
        engine.load()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def random_catalog(
    count: int, dim: int, seed: int = 0, model_id: str = "test-model", prefix: str = "p"
) -> tuple[list[Product], np.ndarray]:
    """`count` products with varied metadata, and their unit vectors (float32, one per row)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = [
        Product(
            id=f"{prefix}{i}",
            name=f"Product {i}",
            gender=GENDERS[i % 3],
            master_category=MASTERS[(i // 3) % 3],
            article_type=f"Type{i % 11}",
            base_colour=COLOURS[i % len(COLOURS)],
            season=("Summer", "Winter")[i % 2],
            year=2010 + i % 7,
            usage="Casual",
            attributes={"fit": ("slim", "regular")[i % 2]} if i % 5 else {},
            model_id=model_id,
        )
        for i in range(count)
    ]
    return products, vectors


def brute_force(
    vectors: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The numpy oracle: positions and cosines of the k best rows (among `allowed` rows)."""
    query = query / np.linalg.norm(query)
    scores = vectors @ query
    rows = np.arange(len(vectors)) if allowed is None else np.flatnonzero(allowed)
    order = rows[np.argsort(-scores[rows], kind="stable")[:k]]
    return order, scores[order]


def assert_exact_top_k(
    found: list, scores: np.ndarray, expected: list, expected_scores: np.ndarray, true_score
) -> None:
    """`found` is a correct exact top-k: the oracle's scores rank by rank (to 1e-5), distinct
    ids each scoring what was reported, and ids differing from the oracle's only within ties."""
    assert len(found) == len(expected)
    assert len(set(found)) == len(found)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    for position, (item, score) in enumerate(zip(found, scores, strict=True)):
        assert abs(true_score(item) - score) <= 1e-5
        if item != expected[position]:
            assert abs(true_score(item) - expected_scores[position]) <= 1e-6, "not a tie"


@dataclass
class RunningSearch:
    thread: ServerThread
    engine: SearchEngine
    channel: grpc.Channel
    stub: search_pb2_grpc.SearchStub
    products: list[Product] = field(default_factory=list)
    vectors: np.ndarray | None = None

    def stop(self) -> None:
        self.channel.close()
        self.thread.stop(0)


def serve_engine(
    engine: SearchEngine,
    encoders: tuple[str, ...] = (),
    timeout_s: float = 10.0,
    query_cache_size: int = SearchSettings.query_cache_size,
    port: int = 0,
) -> RunningSearch:
    """A real search server in-process on `port` (0: a free one), over a loaded engine; with
    encoders, behind the query cache as in main (query_cache_size 0: none)."""
    settings = SearchSettings(host="127.0.0.1", port=port, metrics_port=0, encoder=encoders)

    async def build():  # noqa: ANN202 - ServerThread's builder
        # As in main: the encoder pool's channels belong to the serving event loop.
        if encoders:
            embedder = QueryEmbedder(EncoderPool(encoders, timeout_s=timeout_s))
            engine.embedder = CachingEmbedder(
                embedder, query_cache_size, settings.query_cache_max_bytes
            )
        return await create_server(settings, SearchApp(engine))

    thread = ServerThread(build)
    thread.start()
    channel = grpc.insecure_channel(thread.target)
    return RunningSearch(thread, engine, channel, search_pb2_grpc.SearchStub(channel))


@pytest.fixture
def start_search() -> Iterator[Callable[..., RunningSearch]]:
    """Factory: serve_engine(...); every server it started is stopped after the test."""
    running: list[RunningSearch] = []

    def make(engine: SearchEngine, **options: object) -> RunningSearch:
        running.append(serve_engine(engine, **options))
        return running[-1]

    yield make
    for item in running:
        item.stop()


@pytest.fixture
def fake_encoders() -> Iterator[Callable[..., tuple[FakeEncoder, ServerThread]]]:
    """Factory: a FakeEncoder served in-process on a free port; stopped after the test."""
    started: list[ServerThread] = []

    def make(port: int = 0, **options: object) -> tuple[FakeEncoder, ServerThread]:
        fake = FakeEncoder(**options)
        started.append(start_fake_encoder(fake, port))
        return fake, started[-1]

    yield make
    for thread in started:
        if thread.server is not None:
            thread.stop(0)


@pytest.fixture
def real_encoder(request: pytest.FixtureRequest) -> ServerThread:
    """The real encoder service (tiny model) from tests/conftest.py's `encoder_server`."""
    try:
        return request.getfixturevalue("encoder_server")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no encoder_server fixture yet")
