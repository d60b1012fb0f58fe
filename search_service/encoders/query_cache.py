"""Query embedding cache: repeated image and text queries skip the encoders.

`CachingEmbedder` stands in front of a QueryEmbedder with the same methods.
Entries are keyed by content (sha256 of the image bytes or of the normalized
text) and by the model id of the encoder the query would go to, so a model
change never serves a stale vector. It is bounded by entries and by bytes,
evicts the least recently used entry first, and runs one encoder call for
any number of identical queries that miss at the same time (single-flight).
Failures are never cached: every query waiting on a failed call gets the error.
A query that goes away leaves the call to those still waiting; when none is
left, the call is cancelled, as it would be without the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future

from search_service.encoders.embedder import Embedding, QueryEmbedder
from search_service.metrics import QUERY_CACHE
from search_service.models import EncoderState, QueryCacheStats
from vpm_common.errors import Unavailable, VpmError
from vpm_common.server.deadlines import shared_context

logger = logging.getLogger(__name__)

# Bytes an entry costs beyond its vector and model id: the key tuple and its 32-byte
# digest, the OrderedDict node, the Embedding and the ndarray header (~460 measured
# with tracemalloc over 10,000 entries on CPython 3.11; rounded up).
ENTRY_OVERHEAD = 512

# (kind, model id, sha256 digest of the content): an entry
Key = tuple[str, str, bytes]
# (kind, sha256 digest of the content): an encoding in flight, whatever model answers it
FlightKey = tuple[str, bytes]


def normalize_text(text: str) -> str:
    """The text a query is keyed by and encoded as: Unicode NFC, trimmed, whitespace runs
    collapsed to one space.

    CLIP's tokenizer applies these itself (ftfy's NFC and its whitespace_clean),
    so they never change a vector. Case is kept: the default tokenizer lower-cases
    but others (Hugging Face tokenizers of some open_clip models) do not, and a
    key must not merge queries the model may tell apart. The normalized text is
    what the encoder receives, so a key always means exactly one encoder input.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


class _Flight:
    """One encoding in flight and how many queries wait for it."""

    def __init__(self) -> None:
        # A concurrent.futures.Future: a waiter may sit on another thread's event loop.
        self.result: Future = Future()
        self.waiters = 1
        self.task: asyncio.Task | None = None


class CachingEmbedder:
    """A QueryEmbedder with a bounded LRU cache of query embeddings in front.

    `max_entries` (or `max_bytes`) 0 disables the cache: every query goes to the encoders.
    Image products (embed_images) and product-id queries never touch it.
    """

    def __init__(self, inner: QueryEmbedder, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must not be negative")
        self.inner = inner
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Guards the entries, the calls in flight and the counters, which the metrics
        # exporter's thread reads too; held only for dict operations, never across an await.
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, tuple[Embedding, int]] = OrderedDict()
        self._flights: dict[FlightKey, _Flight] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._coalesced = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    # -- the QueryEmbedder methods -------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        return self.inner.targets

    async def model_id(self, field: str = "model_id") -> str:
        return await self.inner.model_id(field)

    async def embed_image(self, data: bytes, field: str = "image") -> Embedding:
        return await self._cached("image", data, field, lambda: self.inner.embed_image(data, field))

    async def embed_text(self, text: str, field: str = "text") -> Embedding:
        if not self.enabled:
            return await self.inner.embed_text(text, field)
        text = normalize_text(text)
        return await self._cached(
            "text", text.encode("utf-8"), field, lambda: self.inner.embed_text(text, field)
        )

    async def embed_images(
        self, items: Sequence[tuple[str, bytes]], field: str = "image"
    ) -> list[Embedding | VpmError]:
        """Uncached: catalog images would push the popular queries out."""
        return await self.inner.embed_images(items, field)

    async def states(self) -> list[EncoderState]:
        return await self.inner.states()

    async def close(self) -> None:
        await self.inner.close()

    def cache_stats(self) -> QueryCacheStats:
        with self._lock:
            return QueryCacheStats(
                enabled=self.enabled,
                entries=len(self._entries),
                max_entries=self.max_entries,
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                coalesced=self._coalesced,
                evictions=self._evictions,
            )

    # -- the cache -----------------------------------------------------------------------

    async def _cached(
        self,
        kind: str,
        content: bytes,
        field: str,
        encode: Callable[[], Awaitable[Embedding]],
    ) -> Embedding:
        if not self.enabled:
            return await encode()
        flight_key = (kind, hashlib.sha256(content).digest())
        # An identical query already on its way to the encoders gets a vector of their
        # model now by definition: join it before asking which model, which may cost a
        # round trip (the first query after a reconnection).
        with self._lock:
            flight = self._join(flight_key)
        if flight is None:
            # The model of the encoder this query would go to: a model change is a new key.
            key = (kind, await self.inner.next_model_id(field), flight_key[1])
            with self._lock:
                found = self._entries.get(key)
                if found is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    QUERY_CACHE.hits.labels(kind).inc()
                    return found[0]
                flight = self._join(flight_key)
                if flight is None:
                    flight = self._flights[flight_key] = _Flight()
                    self._misses += 1
                    QUERY_CACHE.misses.labels(kind).inc()
                    # Its own task: a caller that goes away (deadline, cancel) does not
                    # take the encoding away from the others waiting for it; nor does its
                    # deadline bound the encoding (it ends when the last caller leaves).
                    flight.task = asyncio.get_running_loop().create_task(
                        self._fill(flight_key, flight, encode), context=shared_context()
                    )
        try:
            return await asyncio.shield(asyncio.wrap_future(flight.result))
        except VpmError as err:
            raise type(err)(err.message) from None  # one exception object per waiter
        finally:
            self._leave(flight_key, flight)

    def _join(self, flight_key: FlightKey) -> _Flight | None:
        """The identical encoding in flight, if any, counted as coalesced (lock held)."""
        flight = self._flights.get(flight_key)
        if flight is not None:
            flight.waiters += 1
            self._coalesced += 1
            QUERY_CACHE.coalesced.labels(flight_key[0]).inc()
        return flight

    def _leave(self, flight_key: FlightKey, flight: _Flight) -> None:
        """One query is done with `flight`; when the last leaves before the result (deadline,
        cancel), the encoding is cancelled: no work goes on for callers who are gone."""
        with self._lock:
            flight.waiters -= 1
            if flight.waiters > 0 or flight.result.done():
                return
            if self._flights.get(flight_key) is flight:
                del self._flights[flight_key]  # a query arriving now starts afresh
            task = flight.task
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def _fill(
        self, flight_key: FlightKey, flight: _Flight, encode: Callable[[], Awaitable[Embedding]]
    ) -> None:
        """Encode once, store the result (never an error), then wake every waiter."""
        kind, digest = flight_key
        try:
            embedding = await encode()
        except VpmError as err:
            self._land(flight_key, flight)
            flight.result.set_exception(err)
            return
        except asyncio.CancelledError:  # every waiter left, or the loop is closing
            self._land(flight_key, flight)
            flight.result.set_exception(Unavailable(f"{kind}: the encoding was cancelled; retry"))
            raise
        except Exception as err:  # noqa: BLE001 - the waiters must never hang
            self._land(flight_key, flight)
            logger.exception("query encoding failed")
            flight.result.set_exception(Unavailable(f"{kind}: the encoding failed ({err!r})"))
            return
        embedding.vector.flags.writeable = False  # shared by every hit from now on
        size = embedding.vector.nbytes + len(embedding.model_id) + ENTRY_OVERHEAD
        # Stored under the model that answered: the key's, unless the encoder changed
        # between the lookup and the call.
        self._land(flight_key, flight, (kind, embedding.model_id, digest), embedding, size)
        flight.result.set_result(embedding)

    def _land(
        self,
        flight_key: FlightKey,
        flight: _Flight,
        key: Key | None = None,
        embedding: Embedding | None = None,
        size: int = 0,
    ) -> None:
        """End a flight and store its result in the same step, so no query sees neither."""
        with self._lock:
            if self._flights.get(flight_key) is flight:
                del self._flights[flight_key]
            if key is not None and embedding is not None and size <= self.max_bytes:
                self._put(key, embedding, size)

    def _put(self, key: Key, embedding: Embedding, size: int) -> None:
        """Insert as most recently used and evict from the other end (lock held)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (embedding, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            evicted, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
            self._evictions += 1
            QUERY_CACHE.evictions.labels(evicted[0]).inc()


# What a SearchEngine encodes through: the embedder alone, or behind the cache.
Embedder = QueryEmbedder | CachingEmbedder
