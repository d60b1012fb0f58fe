"""Load for the encoder benchmarks: client processes that stream JPEGs at an encoder over gRPC.

Each function here runs in a process of its own (a spawn pool), so the
clients neither share the server's interpreter lock nor each other's, and
their CPU is not the server's. Only grpc, numpy and the generated stubs are
imported: a client process starts fast.
"""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_files: dict[str, list[bytes]] = {}  # per process: the JPEG set, read once


@dataclass(frozen=True)
class StreamResult:
    ok: int
    errors: int
    started: float  # time.time(), comparable across processes
    finished: float
    first_error: str
    timed_out: bool


def save_files(files: list[bytes] | list[str], path: Path) -> Path:
    """The JPEG set for the clients: bytes, or paths of files they read as they send."""
    path.write_bytes(pickle.dumps(files))
    return path


def _load(path: str) -> list[bytes] | list[str]:
    if path not in _files:
        _files[path] = pickle.loads(Path(path).read_bytes())
    return _files[path]


def _stub(target: str):  # noqa: ANN202 - a generated stub
    import grpc

    from vpm.v1 import encoder_pb2_grpc

    options = [("grpc.max_send_message_length", 64 << 20)]
    return encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target, options=options))


def stream_images(target: str, files_path: str, count: int, offset: int, timeout_s: float):
    """One EncodeImages stream of `count` images (the set cycled from `offset`)."""
    import grpc

    from vpm.v1 import encoder_pb2

    files = _load(files_path)
    stub = _stub(target)

    def requests():  # noqa: ANN202 - a generator of ImageItem
        for index in range(count):
            data = files[(offset + index) % len(files)]
            yield encoder_pb2.ImageItem(id=str(index), data=data)

    ok = errors = 0
    first_error = ""
    timed_out = False
    started = time.time()
    try:
        for reply in stub.EncodeImages(requests(), timeout=timeout_s):
            if reply.HasField("error"):
                errors += 1
                first_error = first_error or reply.error.message
            else:
                ok += 1
    except grpc.RpcError as error:
        timed_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first_error = first_error or f"{error.code().name}: {error.details()}"
    return StreamResult(ok, errors, started, time.time(), first_error, timed_out)


def single_image_latencies(target: str, files_path: str, count: int, warm_up: int = 5):
    """Seconds for each of `count` one-image streams, sent one after another."""
    from vpm.v1 import encoder_pb2

    files = _load(files_path)
    stub = _stub(target)
    samples = []
    for index in range(warm_up + count):
        item = encoder_pb2.ImageItem(id="q", data=files[index % len(files)])
        started = time.perf_counter()
        replies = list(stub.EncodeImages(iter([item]), timeout=60))
        elapsed = time.perf_counter() - started
        if replies[0].HasField("error"):
            raise RuntimeError(f"latency probe failed: {replies[0].error.message}")
        if index >= warm_up:
            samples.append(elapsed)
    return samples


def stream_batches(
    target: str,
    files_path: str,
    count: int,
    offset: int,
    timeout_s: float,
    batch: int,
    depth: int = 4,
    half: bool = False,
) -> StreamResult:
    """One EncodeImageBatches stream: `count` images (the set cycled from `offset`) in requests
    of `batch`, at most `depth` requests unanswered; every reply's matrix decoded with numpy.

    With a set of paths, each request's files are read from disk as it is sent (what an
    indexer does). `half` asks for FLOAT16 vectors.
    """
    import grpc
    import numpy as np

    from vpm.v1 import encoder_pb2, vectors_pb2

    files = _load(files_path)
    stub = _stub(target)
    unanswered = threading.Semaphore(depth)
    over = threading.Event()
    dtype = vectors_pb2.FLOAT16 if half else vectors_pb2.FLOAT32

    def requests():  # noqa: ANN202 - a generator of ImageBatch
        for number, start in enumerate(range(0, count, batch)):
            while not unanswered.acquire(timeout=0.5):
                if over.is_set():
                    return
            stop = min(start + batch, count)
            picked = [files[(offset + i) % len(files)] for i in range(start, stop)]
            if isinstance(picked[0], str):
                picked = [Path(name).read_bytes() for name in picked]
            yield encoder_pb2.ImageBatch(id=str(number), images=picked, dtype=dtype)

    ok = errors = 0
    first_error = ""
    timed_out = False
    started = time.time()
    try:
        for reply in stub.EncodeImageBatches(requests(), timeout=timeout_s):
            unanswered.release()
            matrix = reply.vectors
            wire = "<f2" if matrix.dtype == vectors_pb2.FLOAT16 else "<f4"
            vectors = np.frombuffer(matrix.data, wire).reshape(matrix.rows, matrix.dim)
            if not reply.model_id or vectors.shape[0] == 0:
                first_error = first_error or f"reply {reply.id}: no model_id or no rows"
            errors += len(reply.errors)
            ok += vectors.shape[0] - len(reply.errors)
            if reply.errors and not first_error:
                first_error = reply.errors[0].error.message
    except grpc.RpcError as error:
        timed_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first_error = first_error or f"{error.code().name}: {error.details()}"
    finally:
        over.set()
    return StreamResult(ok, errors, started, time.time(), first_error, timed_out)
