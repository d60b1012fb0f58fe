"""The one door to the encoders: image and text queries (and image products) become vectors here.

The query embedding cache (query_cache.CachingEmbedder) wraps this object with
the same methods, so every encoding the service asks for still passes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from search_service.models import EncoderState
from search_service.vectors import unit_vector
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import (
    STATUS_CODES,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VpmError,
)
from vpm_common.server.deadlines import capped

# Per-item encoder errors kept as they are; any other (INTERNAL...) is UNAVAILABLE here.
_ERRORS = {
    cls.status: cls for cls in (InvalidArgument, DeadlineExceeded, ResourceExhausted, Unavailable)
}


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray  # float32, unit norm
    model_id: str


class QueryEmbedder:
    """Encodes through an EncoderPool; without one, every method answers UNAVAILABLE."""

    def __init__(self, pool: EncoderPool | None, timeout_s: float | None = None) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    @property
    def targets(self) -> list[str]:
        return [] if self.pool is None else self.pool.targets

    async def model_id(self, field: str = "model_id") -> str:
        """The encoders' model (for products sent with a vector but no model_id)."""
        pool = self._require(field)
        info = await _prefixed(field, pool.model_info(capped(self.timeout_s)))
        return info.model_id

    async def next_model_id(self, field: str = "model_id") -> str:
        """The model of the encoder the next call goes to, without taking its turn (cache keys)."""
        pool = self._require(field)
        info = await _prefixed(field, pool.next_model_info(capped(self.timeout_s)))
        return info.model_id

    async def embed_image(self, data: bytes, field: str = "image") -> Embedding:
        results = await self.embed_images([("query", data)], field)
        outcome = results[0]
        if isinstance(outcome, VpmError):
            raise outcome
        return outcome

    async def embed_text(self, text: str, field: str = "text") -> Embedding:
        pool = self._require(field)
        [item] = await _prefixed(field, pool.encode_texts([text], capped(self.timeout_s)))
        outcome = _outcome(item.vector, item.model_id, item.code, item.message, field)
        if isinstance(outcome, VpmError):
            raise outcome
        return outcome

    async def embed_images(
        self, items: Sequence[tuple[str, bytes]], field: str = "image"
    ) -> list[Embedding | VpmError]:
        """One Embedding, or the error that item met, per (id, image bytes), in order."""
        pool = self._require(field)
        results = await _prefixed(field, pool.encode_images(items, capped(self.timeout_s)))
        return [_outcome(r.vector, r.model_id, r.code, r.message, field) for r in results]

    async def states(self) -> list[EncoderState]:
        if self.pool is None:
            return []
        return [
            EncoderState(s.target, s.state, s.model_id, s.random_weights)
            for s in await self.pool.status()
        ]

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def _require(self, field: str) -> EncoderPool:
        if self.pool is None:
            raise Unavailable(
                f"{field}: no encoder is configured (--encoder), so image and text "
                "queries are unavailable; product_id and vector queries work"
            )
        return self.pool


async def _prefixed(field: str, awaitable):  # noqa: ANN001, ANN202 - passes any result through
    """Name the request field in a pool error, keeping its status."""
    try:
        return await awaitable
    except VpmError as err:
        raise type(err)(f"{field}: {err.message}") from None


def _outcome(
    vector: np.ndarray | None, model_id: str, code: int, message: str, field: str
) -> Embedding | VpmError:
    if vector is None:
        status = next((name for name, number in STATUS_CODES.items() if number == code), "")
        return _ERRORS.get(status, Unavailable)(f"{field}: {message}")
    try:
        return Embedding(unit_vector(vector, field), model_id)
    except InvalidArgument as err:
        return Unavailable(f"{field}: the encoder returned a bad vector ({err.message})")
