"""
The disk store: responses in files under one folder, as nginx's
C{proxy_cache_path} keeps them (two levels of subfolders named from the
hash of the key), with a memory store as the hot tier in front.

Each response is two files: C{HASH.body}, then C{HASH.meta} (JSON: the
key, the variant, status, headers, times, body size).  Both are written to
a temporary name and renamed, the body first, so a meta file only ever
names a whole body; a crash leaves at worst an orphan body, removed at the
next start.  The index (what is stored, in LRU order) lives in memory and
is rebuilt from the meta files when the store starts, in a thread.

Every file operation runs in the reactor's thread pool: writes one after
another (one queue, so a later update never lands before the write it
updates), reads of bodies a chunk at a time as the client takes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import observer as log_observer
from ..transport.flow import ReadGate
from .rules import StoredResponse
from .store import ENTRY_OVERHEAD, ChunkSource, IBodySource, ICacheStore, MemoryStore

__all__ = ["DiskStore"]

READ_SIZE = 65536
PROMOTE_BELOW = 1048576
"""A body read whole from disk and smaller than this goes back into the hot tier."""

Slot = tuple[str, tuple[tuple[bytes, bytes], ...]]


def _name(response: StoredResponse) -> str:
    digest = hashlib.sha256(repr((response.key, response.variant)).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(digest[-1], digest[-3:-1], digest)


def _meta(response: StoredResponse) -> bytes:
    def text(b: bytes) -> str:
        return b.decode("latin-1")

    return json.dumps({
        "key": response.key,
        "variant": [[text(n), text(v)] for n, v in response.variant],
        "vary": None if response.vary is None else [text(n) for n in response.vary],
        "status": response.status,
        "reason": text(response.reason),
        "headers": [[text(n), text(v)] for n, v in response.headers],
        "request_time": response.request_time,
        "response_time": response.response_time,
        "body_size": response.body_size,
    }).encode("utf-8")


def _from_meta(data: bytes) -> StoredResponse:
    m = json.loads(data)

    def raw(s: str) -> bytes:
        return s.encode("latin-1")

    return StoredResponse(
        key=m["key"],
        variant=tuple((raw(n), raw(v)) for n, v in m["variant"]),
        vary=None if m["vary"] is None else tuple(raw(n) for n in m["vary"]),
        status=int(m["status"]),
        reason=raw(m["reason"]),
        headers=tuple((raw(n), raw(v)) for n, v in m["headers"]),
        request_time=float(m["request_time"]),
        response_time=float(m["response_time"]),
        body_size=int(m["body_size"]),
    )


def _write_atomically(path: str, pieces: Sequence[bytes]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as f:
        for piece in pieces:
            f.write(piece)
    os.replace(temp, path)


def _unlink(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _scan(root: str) -> list[tuple[StoredResponse, str]]:
    """Every whole response under C{root}; orphan bodies and temporary files are removed."""
    found = []
    for folder, _, files in os.walk(root):
        names = set(files)
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".tmp"):
                _unlink(path)
            elif name.endswith(".body") and name[:-5] + ".meta" not in names:
                _unlink(path)
            elif name.endswith(".meta"):
                base = path[:-5]
                try:
                    with open(path, "rb") as f:
                        response = _from_meta(f.read())
                    if os.path.getsize(base + ".body") != response.body_size:
                        raise ValueError("body size differs")
                except (OSError, ValueError, KeyError, TypeError):
                    _unlink(path, base + ".body")
                    continue
                found.append((response, os.path.relpath(base, root)))
    found.sort(key=lambda item: item[0].response_time)
    return found


@implementer(ICacheStore)
class DiskStore:
    """Responses on disk within C{max_bytes} (LRU), the hot ones also in C{hot}."""

    _log = Logger(observer=log_observer)

    def __init__(self, root: str, max_bytes: int, reactor: Any, hot: MemoryStore | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.reactor = reactor
        self.hot = hot if hot is not None else MemoryStore(0)
        self.size = 0
        self.on_evict: Callable[[StoredResponse, str], None] | None = None
        self._lru: OrderedDict[Slot, tuple[StoredResponse, str]] = OrderedDict()
        self._index: dict[str, list[StoredResponse]] = {}
        self._writes: Deferred[Any] = succeed(None)
        self._queued = 0
        self._idle: list[Deferred[None]] = []
        self.ready: Deferred[Any] = self._queue(_scan, root)
        self.ready.addCallback(self._loaded)
        self.ready.addErrback(self._failed, "reading the folder")

    # -- the thread pool --------------------------------------------------------------------

    def _thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _queue(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run C{f} in a thread after every file operation queued before it."""
        done: Deferred[Any] = Deferred()
        self._queued += 1

        def finished(result: Any) -> None:
            self._queued -= 1
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)
            if not self._queued:
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)

        def run(_: Any) -> Deferred[Any]:
            return self._thread(f, *args).addBoth(finished)

        self._writes.addCallback(run)
        return done

    def _failed(self, failure: Failure, what: str) -> None:
        self._log.failure("disk cache: {what} failed", failure, what=what)

    def flushed(self) -> Deferred[Any]:
        """Fires once no file operation is queued (those queued meanwhile included: for tests and a clean stop)."""
        if not self._queued:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    # -- the index --------------------------------------------------------------------------

    def _loaded(self, found: list[tuple[StoredResponse, str]]) -> None:
        for response, name in found:
            self._add(response, name)
        self._evict()

    def _add(self, response: StoredResponse, name: str) -> None:
        slot = (response.key, response.variant)
        if slot in self._lru:
            self._forget(slot)
        self._lru[slot] = (response, name)
        self._index.setdefault(response.key, []).append(response)
        self.size += response.body_size + ENTRY_OVERHEAD

    def _forget(self, slot: Slot) -> tuple[StoredResponse, str]:
        response, name = self._lru.pop(slot)
        self.size -= response.body_size + ENTRY_OVERHEAD
        variants = self._index.get(response.key)
        if variants is not None:
            variants[:] = [v for v in variants if v.variant != response.variant]
            if not variants:
                del self._index[response.key]
        return response, name

    def _delete(self, slot: Slot, reason: str | None) -> None:
        response, name = self._forget(slot)
        base = os.path.join(self.root, name)
        self._queue(_unlink, base + ".meta", base + ".body").addErrback(self._failed, "delete")
        if reason is not None and self.on_evict is not None:
            self.on_evict(response, reason)

    def _evict(self) -> None:
        while self.size > self.max_bytes and self._lru:
            self._delete(next(iter(self._lru)), "lru")

    # -- ICacheStore ------------------------------------------------------------------------

    def variants(self, key: str) -> Sequence[StoredResponse]:
        on_disk = self._index.get(key)
        in_memory = self.hot.variants(key)
        if not in_memory:
            return on_disk or ()
        if not on_disk:
            return in_memory
        known = {r.variant for r in on_disk}
        return [*on_disk, *(r for r in in_memory if r.variant not in known)]

    def put(self, response: StoredResponse, chunks: Sequence[bytes]) -> bool:
        if response.body_size + ENTRY_OVERHEAD > self.max_bytes:
            return False
        self.hot.put(response, chunks)
        name = _name(response)
        base = os.path.join(self.root, name)
        body = list(chunks)

        def write() -> None:
            _write_atomically(base + ".body", body)
            _write_atomically(base + ".meta", [_meta(response)])

        def written(_: Any) -> None:
            self._add(response, name)
            self._evict()

        self._queue(write).addCallbacks(written, self._failed, errbackArgs=("write",))
        return True

    def update(self, old: StoredResponse, new: StoredResponse) -> None:
        self.hot.update(old, new)
        slot = (old.key, old.variant)
        held = self._lru.get(slot)
        if held is None:
            return
        name = held[1]
        self._forget(slot)
        self._add(new, name)
        path = os.path.join(self.root, name) + ".meta"
        self._queue(_write_atomically, path, [_meta(new)]).addErrback(self._failed, "update")

    def inline_body(self, response: StoredResponse) -> bytes | None:
        return self.hot.inline_body(response)

    def body(self, response: StoredResponse, first: int = 0, last: int | None = None) -> IBodySource | None:
        chunks = self.hot.chunks(response)
        if chunks is not None:
            return ChunkSource(chunks, first, last)
        slot = (response.key, response.variant)
        held = self._lru.get(slot)
        if held is None:
            return None
        self._lru.move_to_end(slot)
        end = response.body_size - 1 if last is None else last
        promote = None
        if first == 0 and last is None and response.body_size <= min(PROMOTE_BELOW, self.hot.max_bytes):
            promote = lambda chunks: self.hot.put(held[0], chunks)  # noqa: E731 - a one-line callback
        return FileSource(self, os.path.join(self.root, held[1]) + ".body", first, end, promote)

    def remove(self, key: str, reason: str = "invalidated") -> int:
        removed = len(self.hot.variants(key))
        self.hot.remove(key, reason="")
        variants = list(self._index.get(key, ()))
        for response in variants:
            self._delete((response.key, response.variant), reason)
        return max(removed, len(variants))

    def purge(self, prefix: str) -> int:
        keys = {k for k in self._index if k.startswith(prefix)} | {k for k in self.hot.keys() if k.startswith(prefix)}
        return sum(self.remove(key, "purged") for key in keys)

    def keys(self) -> list[str]:
        return list(set(self._index) | set(self.hot.keys()))

    def __len__(self) -> int:
        return len(self._lru)


@implementer(IBodySource)
class FileSource:
    """A stored body read from its file a chunk at a time, in a thread, as fast as the client takes it."""

    def __init__(self, store: DiskStore, path: str, first: int, last: int,
                 promote: Callable[[list[bytes]], Any] | None) -> None:
        self.store = store
        self.path = path
        self.offset = first
        self.last = last
        self.promote = promote
        self.kept: list[bytes] | None = [] if promote is not None else None
        self.gate = ReadGate(self)
        self.paused = False
        self.reading = False
        self.stopped = False
        self.fd: int | None = None
        self.downstream: Any = None
        self.done: Callable[[Failure | None], None] | None = None

    def streamTo(self, downstream: Any, done: Callable[[Failure | None], None]) -> None:
        self.downstream = downstream
        self.done = done
        downstream.registerUpstream(self)
        self._next()

    def _next(self) -> None:
        if self.reading or self.paused or self.stopped:
            return
        if self.offset > self.last:
            self._end(None)
            return
        self.reading = True
        size = min(READ_SIZE, self.last + 1 - self.offset)
        self.store._thread(self._read, self.offset, size).addCallbacks(self._got, self._end)

    def _read(self, offset: int, size: int) -> bytes:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self.fd, size, offset)
        if not data:
            raise EOFError(f"{self.path} is shorter than its meta file says")
        return data

    def _got(self, data: bytes) -> None:
        self.reading = False
        if self.stopped:
            self._close()
            return
        self.offset += len(data)
        if self.kept is not None:
            self.kept.append(data)
        self.downstream.writeBody(data)
        self._next()

    def _end(self, failure: Failure | None) -> None:
        self.reading = False
        if self.stopped:
            self._close()
            return
        self.stopped = True
        self.downstream.unregisterUpstream(self)
        self._close()
        if failure is None and self.kept is not None and self.promote is not None:
            self.promote(self.kept)
        self.kept = None
        done, self.done = self.done, None
        if done is not None:
            done(failure)

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._next()

    def stopStreaming(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.done = None
            self.kept = None
            if self.downstream is not None:
                self.downstream.unregisterUpstream(self)
            if not self.reading:
                self._close()
