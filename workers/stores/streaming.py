"""Streams shared by the object-store backends.

``PartPipeline`` cuts a written stream into parts sent from worker threads while the
caller keeps compressing; ``MappedReader`` turns a library's ``read(n)`` into a stream
whose library errors are already ours. Neither knows which store it serves.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Generic, TypeVar, cast

from config.errors import ContextStoreError

T = TypeVar("T")

#: Chunk size for copies between streams, and the read buffer of a store's stream.
COPY_CHUNK = 1 << 20
#: Parts uploading or queued at once: bounds memory to about (in_flight + 1) parts.
IN_FLIGHT = 2
#: Allocations at least this big get pages of their own, returned when freed (glibc).
MMAP_THRESHOLD = 1 << 20
#: Threads sending parts. Two overlap network latency with the caller's compression
#: without competing with it for the CPU on small hosts.
UPLOAD_THREADS = 2


class PartPipeline(io.RawIOBase, Generic[T]):
    """A writable stream cut into parts, each handed to ``send`` on a worker thread.

    ``write`` accepts any number of calls of any size. A full part is queued for
    sending; when ``in_flight`` parts are already queued or sending, ``write`` blocks,
    which is what bounds memory. A failed send is re-raised by the next ``write`` or by
    ``finish``. ``start`` runs once, before the first part is sent (e.g. to create the
    multipart upload), so an object that fits in one part never starts one: ``finish``
    hands that single part back instead.
    """

    def __init__(self, send: Callable[[int, bytes], T], part_size: Callable[[int], int],
                 start: Callable[[], None] | None = None, threads: int = UPLOAD_THREADS,
                 in_flight: int = IN_FLIGHT) -> None:
        super().__init__()
        self._send = send
        self._part_size = part_size
        self._start = start
        self._threads = threads
        self._slots = threading.BoundedSemaphore(in_flight)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[T]] = []
        self._buffer = bytearray()
        self._failure: BaseException | None = None
        self.size = 0
        _return_freed_parts()

    @property
    def started(self) -> bool:
        return self._pool is not None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._raise_failure()
        view = memoryview(data).cast("B")
        self._buffer += view
        self.size += len(view)
        while len(self._buffer) >= self._part_size(len(self._futures)):
            size = self._part_size(len(self._futures))
            with memoryview(self._buffer) as whole:
                part = bytes(whole[:size])  # one copy (a bytearray slice would make two)
            del self._buffer[:size]
            self._submit(part)
        return len(view)

    def _submit(self, part: bytes) -> None:
        if self._pool is None:
            if self._start is not None:
                self._start()
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="store-part")
        self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        number = len(self._futures) + 1
        try:
            future = self._pool.submit(self._send, number, part)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._done)
        self._futures.append(future)

    def _done(self, future: Future[T]) -> None:
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()
        self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def finish(self) -> tuple[list[T], bytes | None]:
        """Send what is left and wait: (results of every part in order, None); or, when
        no part was ever started, ([], the whole object) for a single-request upload."""
        self._raise_failure()
        if self._pool is None:
            data = bytes(self._buffer)
            self._buffer.clear()
            return [], data
        if self._buffer:
            part = bytes(self._buffer)
            self._buffer.clear()
            self._submit(part)
        try:
            results = [f.result() for f in self._futures]
        finally:
            self._pool.shutdown(wait=True)
        return results, None

    def abort(self) -> None:
        """Drop queued parts and wait for the ones being sent, so none lands afterwards."""
        self._buffer.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


_malloc_tuned = False


def _return_freed_parts() -> None:
    """Make freed parts go back to the OS at once (glibc only; elsewhere nothing changes).

    glibc serves big allocations with pages of their own, but each time one is freed it
    raises that threshold (up to 32 MiB), after which parts come from its heaps, one per
    sending thread, and stay in the process's memory once freed. A fixed threshold keeps a
    1 GiB upload's peak memory at the parts in flight.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is not None:
        m_mmap_threshold = -3  # from glibc's malloc.h
        mallopt(m_mmap_threshold, MMAP_THRESHOLD)


class MappedReader(io.RawIOBase):
    """A readable stream over ``read(n)`` whose library errors are mapped to ours."""

    def __init__(self, read: Callable[[int], bytes], mapper: Callable[[Exception], Exception],
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._read = read
        self._map = mapper
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._read(len(view))
        except ContextStoreError:
            raise
        except Exception as exc:
            raise self._map(exc) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            with contextlib.suppress(Exception):
                self._on_close()
        super().close()


def buffered(raw: io.RawIOBase) -> BinaryIO:
    return cast(BinaryIO, io.BufferedReader(raw, COPY_CHUNK))
