"""Domain tier: the engine without a server (tiny model, both runtimes)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from encoder_service.batcher import Caller
from encoder_service.factory import build_engine
from tests import images
from vpm_common.errors import InvalidArgument, ResourceExhausted


@pytest.fixture(scope="module")
def engines(tiny_settings):
    """The tiny model on each runtime, built independently."""
    built = {runtime: build_engine(tiny_settings(runtime=runtime)) for runtime in ("torch", "onnx")}
    yield built
    for engine in built.values():
        engine.close()


def encode(engine, data: bytes) -> np.ndarray:
    return engine.submit_image(data, Caller()).result(30)


def test_vectors_are_unit_float32_of_the_model_dimension(engines) -> None:
    vector = encode(engines["onnx"], images.jpeg(seed=1))
    assert vector.dtype == np.float32 and vector.shape == (64,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-6


def test_runtimes_and_separately_built_engines_agree(engines, tiny_settings) -> None:
    """Replicas must give the same vectors: seeded weights, one factory for every runtime."""
    data = images.jpeg(seed=2)
    torch_vector, onnx_vector = encode(engines["torch"], data), encode(engines["onnx"], data)
    assert float(torch_vector @ onnx_vector) > 0.9999
    other = build_engine(tiny_settings(runtime="torch"))
    try:
        np.testing.assert_allclose(encode(other, data), torch_vector, atol=1e-6)
    finally:
        other.close()


def test_a_different_seed_is_a_different_model(tiny_settings, engines) -> None:
    other = build_engine(tiny_settings(seed=1, runtime="torch"))
    try:
        assert other.description.model_id == "VPM-Tiny/random-seed1"
        data = images.jpeg(seed=3)
        assert float(encode(other, data) @ encode(engines["torch"], data)) < 0.99
    finally:
        other.close()


def test_admission_beyond_the_queue_size_is_refused(tiny_settings) -> None:
    engine = build_engine(
        dataclasses.replace(tiny_settings(), queue_size=3, max_delay_ms=500.0, max_batch=8)
    )
    try:
        data = images.jpeg(seed=4)
        futures = [engine.submit_image(data, Caller()) for _ in range(3)]
        with pytest.raises(
            ResourceExhausted, match=r"queue is full \(3 items in flight, limit 3\)"
        ):
            engine.submit_image(data, Caller())
        with pytest.raises(ResourceExhausted):
            engine.submit_texts(["one"], Caller())
        for future in futures:
            future.result(30)
        assert engine.in_flight() == 0
        encode(engine, data)  # room again
    finally:
        engine.close()


def test_bad_items_fail_alone(engines) -> None:
    engine = engines["onnx"]
    good, bad = (
        engine.submit_image(images.jpeg(seed=5), Caller()),
        engine.submit_image(b"nope", Caller()),
    )
    with pytest.raises(InvalidArgument, match="not a recognized image"):
        bad.result(30)
    assert good.result(30).shape == (64,)
    texts = engine.submit_texts(["shoes", "   "], Caller()).result(30)
    assert texts.vectors.shape == (2, 64) and list(texts.errors) == [1]
    assert np.linalg.norm(texts.vectors[0]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidArgument, match=r"texts\[1\]: text is empty"):
        raise texts.errors[1]
    assert engine.in_flight() == 0


def test_a_request_of_images_gets_one_row_each_equal_to_the_image_alone(engines) -> None:
    """The batch path against the single path it must agree with, bad images failing alone."""
    engine = engines["onnx"]
    files = [images.jpeg(seed=20 + i) for i in range(5)]
    files.insert(2, b"nope")
    encoded = engine.submit_images(files, Caller()).result(30)
    assert encoded.vectors.shape == (6, 64) and list(encoded.errors) == [2]
    assert "not a recognized image" in encoded.errors[2].message
    assert not encoded.vectors[2].any()  # a failed image's row is zeros
    for row, data in enumerate(files):
        if row != 2:
            np.testing.assert_allclose(encoded.vectors[row], encode(engine, data), atol=1e-5)
    with pytest.raises(InvalidArgument, match="a request carries 1 to"):
        engine.submit_images([], Caller())
    assert engine.in_flight() == 0


def test_work_that_would_outlive_its_deadline_is_shed_at_once(tiny_settings) -> None:
    engine = build_engine(dataclasses.replace(tiny_settings(), max_delay_ms=300.0, max_batch=8))
    try:
        for _ in range(60):  # as if each item had taken a second for a while
            engine.metrics.observe_item_cost(1.0)
        soon = time.monotonic() + 3.0
        first = engine.submit_image(images.jpeg(seed=6), Caller(deadline=soon))  # nothing ahead
        with pytest.raises(ResourceExhausted, match=r"about 2.0 s of work is queued"):
            engine.submit_image(images.jpeg(seed=7), Caller(deadline=soon))
        relaxed = engine.submit_image(images.jpeg(seed=8), Caller(deadline=time.monotonic() + 60))
        assert first.result(30).shape == relaxed.result(30).shape == (64,)
        assert engine.metrics.rejected.labels("deadline")._value.get() == 1
    finally:
        engine.close()
