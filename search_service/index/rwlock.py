"""A readers-writer lock: many searches at once, or one batch being applied, never both."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Writer-preferring: once a writer waits, new readers queue behind it, so a steady
    stream of searches cannot starve the application of an upsert batch."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            self._leave_reading()

    @contextmanager
    def read_if_free(self) -> Iterator[bool]:
        """A read slot if one is free now (True), else none at once (False): for a caller
        that must not wait, such as the event loop."""
        with self._cond:
            free = not (self._writing or self._writers_waiting)
            if free:
                self._readers += 1
        try:
            yield free
        finally:
            if free:
                self._leave_reading()

    def _leave_reading(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
