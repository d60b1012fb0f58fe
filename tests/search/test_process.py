"""End-to-end tier: `python -m search_service` as a real process, started the way a user does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import free_port, wait_until
from vpm.v1 import search_pb2, search_pb2_grpc, vectors_pb2

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DIM = 16
# Starts the service with torch and open_clip unimportable: any import of them fails.
WITHOUT_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None; sys.modules['open_clip'] = None; "
    "sys.argv[0] = 'search_service'; runpy.run_module('search_service', run_name='__main__')"
)


@dataclass
class Service:
    process: subprocess.Popen
    port: int
    log: Path
    channel: grpc.Channel
    stub: search_pb2_grpc.SearchStub

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="vpm.v1.Search"), timeout=1)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_serving(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not SERVING after {timeout_s}s:\n{self.log.read_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: a search service process in tmp_path (SQLite catalog, data dir); killed after."""
    started: list[Service] = []

    def start(*args: str, python_args: tuple[str, ...] = ("-m", "search_service")) -> Service:
        port = free_port()
        log = tmp_path / f"service-{len(started)}.log"
        command = [
            sys.executable,
            *python_args,
            "--host=127.0.0.1",
            f"--port={port}",
            "--metrics-port=0",
            "--catalog-url=sqlite:///catalog/catalog.db",
            "--data-dir=data",
            *args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        service = Service(process, port, log, channel, search_pb2_grpc.SearchStub(channel))
        started.append(service)
        return service

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait(10)


def products_of_call(call: int, count: int = 200) -> list[search_pb2.Product]:
    rng = np.random.default_rng(call)
    vectors = rng.standard_normal((count, DIM))
    return [
        search_pb2.Product(
            id=f"c{call}-{j}",
            name=f"Call {call} item {j}",
            gender=("Men", "Women")[j % 2],
            vector=vectors[j].tolist(),
            model_id="test-model",
        )
        for j in range(count)
    ]


def index_ids(service: Service, count: int) -> list[str]:
    """Every product id the vector index holds, by paging an exact search over all of it."""
    ids: list[str] = []
    query = search_pb2.SearchRequest(vector=search_pb2.Vector(values=[1.0] * DIM), top_k=1000)
    for offset in range(0, count + 1000, 1000):
        query.offset = offset
        ids.extend(m.product.id for m in service.stub.Search(query).matches)
    return ids


def catalog_ids(service: Service) -> list[str]:
    return [p.id for p in service.stub.ListProducts(search_pb2.ListProductsRequest())]


def test_sigterm_stops_in_order_and_a_restart_uses_the_snapshot(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    service = start_service()
    service.wait_serving()
    summary = service.stub.UpsertProducts(iter(products_of_call(0)))
    assert summary.inserted == 200
    assert service.stop() == 0
    log = service.log.read_text()
    for line in ("NOT_SERVING", "index snapshot at catalog version 1 written", "stopped"):
        assert line in log
    assert (tmp_path / "data" / "index.snapshot").exists()

    again = start_service()
    again.wait_serving()
    assert "index snapshot at catalog version 1, catalog at 1: catching up" in again.log.read_text()
    assert "building the" not in again.log.read_text()
    hit = again.stub.Search(search_pb2.SearchRequest(product_id="c0-7", top_k=1))
    assert len(hit.matches) == 1
    assert again.stop() == 0


def as_batches(products: Iterator[search_pb2.Product], size: int = 30) -> Iterator:
    """Products as UpsertProductBatches messages of `size`, each with one float32 matrix,
    each sent as soon as its products are drawn."""
    chunk: list[search_pb2.Product] = []
    for product in products:
        chunk.append(product)
        if len(chunk) == size:
            yield _matrix_batch(chunk)
            chunk = []
    if chunk:
        yield _matrix_batch(chunk)


def _matrix_batch(chunk: list[search_pb2.Product]) -> search_pb2.ProductBatch:
    rows = np.array([p.vector for p in chunk], dtype="<f4")
    for product in chunk:
        product.ClearField("vector")
    matrix = vectors_pb2.VectorMatrix(rows=len(chunk), dim=DIM, data=rows.tobytes())
    return search_pb2.ProductBatch(products=chunk, vectors=matrix)


@pytest.mark.parametrize("rpc", ["UpsertProducts", "UpsertProductBatches"])
def test_kill_9_mid_stream_loses_nothing_acknowledged(
    start_service: Callable[..., Service], rpc: str
) -> None:
    calls = 40
    kill_in_call = 12
    # Snapshots every second: the one taken mid-series is stale when the kill comes.
    service = start_service("--batch-size=50", "--snapshot-interval-s=1")
    service.wait_serving()
    acknowledged: list[int] = []

    def stream(call: int) -> Iterator[search_pb2.Product]:
        for j, product in enumerate(products_of_call(call)):
            if call == kill_in_call and j == 120:
                time.sleep(0.5)  # let the service commit the batches it has: a partial call
                service.process.send_signal(signal.SIGKILL)
                service.process.wait(10)
            yield product

    def send(call: int) -> search_pb2.UpsertSummary:
        if rpc == "UpsertProducts":
            return service.stub.UpsertProducts(stream(call), timeout=30)
        # Lazily, so that the kill comes after the messages before it were sent.
        return service.stub.UpsertProductBatches(as_batches(stream(call)), timeout=30)

    for call in range(kill_in_call + 1):
        try:
            summary = send(call)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            break
        assert summary.inserted == 200
        acknowledged.append(call)
        if call == 5:
            time.sleep(1.5)
    assert acknowledged == list(range(kill_in_call))
    service.channel.close()

    restarted = start_service("--batch-size=50")
    restarted.wait_serving()
    log = restarted.log.read_text()
    assert "catching up" in log and "rebuilding" not in log  # snapshot + the change log
    stored = catalog_ids(restarted)
    expected = {p.id for call in acknowledged for p in products_of_call(call)}
    assert expected <= set(stored)
    # Of the interrupted call, at most the two batches of 50 received in full were committed.
    assert len(stored) - len(expected) <= 100
    stats = restarted.stub.GetStats(search_pb2.GetStatsRequest())
    assert stats.products == stats.index_size == len(stored)
    held = index_ids(restarted, len(stored))
    assert sorted(held) == sorted(stored)  # catalog and index agree: same ids, same count

    totals = {"inserted": 0, "unchanged": 0}
    for call in range(calls):
        summary = restarted.stub.UpsertProducts(iter(products_of_call(call)), timeout=30)
        assert summary.failed == 0 and summary.updated == 0
        if call in acknowledged:
            assert summary.unchanged == 200
        totals["inserted"] += summary.inserted
        totals["unchanged"] += summary.unchanged
    assert totals["inserted"] + totals["unchanged"] == calls * 200
    final = catalog_ids(restarted)
    assert len(final) == len(set(final)) == calls * 200
    assert sorted(index_ids(restarted, len(final))) == sorted(final)
    assert restarted.stop() == 0


def test_a_corrupt_snapshot_is_rebuilt_at_start(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    service = start_service()
    service.wait_serving()
    service.stub.UpsertProducts(iter(products_of_call(1)))
    assert service.stop() == 0
    snapshot = tmp_path / "data" / "index.snapshot"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
    snapshot.write_bytes(data)

    again = start_service()
    again.wait_serving()
    log = again.log.read_text()
    assert "rebuilding the index from the catalog" in log and "built the Flat index of 200" in log
    assert sorted(index_ids(again, 200)) == sorted(p.id for p in products_of_call(1))
    assert again.stop() == 0


def has_product(service: Service, product_id: str) -> bool:
    """GetProduct and a Search by product_id both find it (NOT_FOUND: not yet, or no more)."""
    try:
        service.stub.GetProduct(search_pb2.GetProductRequest(id=product_id))
        service.stub.Search(search_pb2.SearchRequest(product_id=product_id, top_k=1))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def test_two_processes_sharing_postgresql_stay_in_step(
    start_service: Callable[..., Service], postgres_catalog_url: str
) -> None:
    shared = f"--catalog-url={postgres_catalog_url}"
    a = start_service(shared, "--data-dir=data-a")
    b = start_service(shared, "--data-dir=data-b")
    a.wait_serving()
    b.wait_serving()

    assert a.stub.UpsertProducts(iter(products_of_call(0))).inserted == 200
    delay = wait_until(lambda: has_product(b, "c0-199"))
    assert delay < 5, f"an upsert through A reached B after {delay:.2f}s"
    assert all(has_product(b, f"c0-{j}") for j in range(0, 200, 20))
    query = search_pb2.SearchRequest(vector=search_pb2.Vector(values=[1.0] * DIM), top_k=20)
    assert a.stub.Search(query) == b.stub.Search(query)

    b.stub.DeleteProducts(search_pb2.DeleteProductsRequest(ids=["c0-7", "c0-8"]))
    delay = wait_until(lambda: not has_product(a, "c0-8"))
    assert delay < 5, f"a deletion through B reached A after {delay:.2f}s"
    assert not has_product(a, "c0-7")
    assert "caught up from catalog version 0 to 1: 200 products changed, 0 deleted" in (
        b.log.read_text()
    )
    assert "caught up from catalog version 1 to 2: 0 products changed, 2 deleted" in (
        a.log.read_text()
    )

    # B stops; A writes meanwhile; B starts again from its snapshot plus the changes since.
    assert b.stop() == 0
    assert "index snapshot at catalog version 2 written" in b.log.read_text()
    assert a.stub.UpsertProducts(iter(products_of_call(1))).inserted == 200
    a.stub.DeleteProducts(search_pb2.DeleteProductsRequest(ids=["c0-9", "c1-0"]))
    again = start_service(shared, "--data-dir=data-b")
    again.wait_serving()
    log = again.log.read_text()
    assert "index snapshot at catalog version 2, catalog at 4: catching up" in log
    assert "caught up from catalog version 2 to 4: 199 products changed, 2 deleted" in log
    assert "the snapshot of version 2 plus the changes since" in log
    assert "building the" not in log and "rebuilding" not in log
    stats = again.stub.GetStats(search_pb2.GetStatsRequest())
    assert (stats.products, stats.index_size, stats.catalog_version) == (396, 396, 4)
    assert sorted(index_ids(again, 396)) == sorted(index_ids(a, 396)) == sorted(catalog_ids(a))
    assert not has_product(again, "c1-0") and has_product(again, "c1-199")
    assert a.stop() == 0 and again.stop() == 0


def test_starts_and_serves_without_torch(start_service: Callable[..., Service]) -> None:
    service = start_service(python_args=("-c", WITHOUT_TORCH))
    service.wait_serving()
    summary = service.stub.UpsertProducts(iter(products_of_call(2, 20)))
    assert summary.inserted == 20
    assert service.stop() == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("--port=99999",),
            2,
            "search_service: --port / VPM_SEARCH_PORT: must be 0 to 65535, got 99999",
        ),
        (
            ("--encoder=nohost",),
            2,
            "search_service: --encoder / VPM_SEARCH_ENCODER: 'nohost' is not host:port",
        ),
        (
            ("--index-factory=Nope",),
            2,
            "--index-factory / VPM_SEARCH_INDEX_FACTORY: 'Nope' with params '' makes no FAISS "
            "index of dim 512: could not parse index string Nope",
        ),
        (
            ("--catalog-url=postgresql+psycopg://postgres@127.0.0.1:1/x",),
            1,
            "cannot start: cannot open the catalog postgresql+psycopg://postgres@127.0.0.1:1/x",
        ),
    ],
)
def test_bad_settings_fail_at_start_with_one_clear_line(
    start_service: Callable[..., Service], args: tuple, code: int, message: str
) -> None:
    service = start_service(*args)
    assert service.process.wait(60) == code
    assert message in service.log.read_text()
    assert "Traceback" not in service.log.read_text()
