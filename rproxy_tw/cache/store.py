"""
Where cached responses live: one interface (L{ICacheStore}), a memory store
bounded by size with LRU eviction, and the body sources that stream a
stored body to a client with backpressure.

Lookups are synchronous over an in-memory index (a hit must not wait a
reactor turn); bodies are read through an L{IBodySource}, which a disk
store fills from a thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..transport.flow import ReadGate
from .rules import StoredResponse

__all__ = ["ICacheStore", "IBodySource", "MemoryStore", "ChunkSource", "ENTRY_OVERHEAD"]

ENTRY_OVERHEAD = 512
"""Bytes counted for each entry over its body and headers (the index, the objects holding it)."""

JOIN_BELOW = 262144
"""Bodies up to this size are kept as one bytes object (one write per hit); larger ones as received."""


class IBodySource(Interface):
    """A stored body (or a range of it) being written to a client, as fast as the client takes it."""

    gate = Attribute("The L{ReadGate} the client's flow control pauses (see IDownstream.registerUpstream).")

    def streamTo(downstream: Any, done: Callable[[Failure | None], None]) -> None:
        """Write the body with C{downstream.writeBody}; call C{done(None)} at the end, or C{done(failure)}."""

    def stopStreaming() -> None:
        """The client left: stop, call nothing."""


class ICacheStore(Interface):
    """Stored responses by primary key, each with its variants (Vary)."""

    size = Attribute("Bytes counted against the store's bound now.")
    max_bytes = Attribute("The bound.")
    on_evict = Attribute("Called with (response, reason) for each response the store drops on its own or is told to.")

    def variants(key: str) -> Sequence[StoredResponse]:
        """The stored responses under C{key} (synchronous: the index is in memory)."""

    def put(response: StoredResponse, chunks: Sequence[bytes]) -> bool:
        """Keep C{response} with its body, replacing the variant with the same secondary key. False if refused."""

    def update(old: StoredResponse, new: StoredResponse) -> None:
        """Replace a stored response's metadata (freshened by a 304); the body stays."""

    def body(response: StoredResponse, first: int = 0, last: int | None = None) -> IBodySource | None:
        """Bytes C{first}..C{last} (inclusive) of the body, or None when the response is no longer stored."""

    def inline_body(response: StoredResponse) -> bytes | None:
        """The whole body when it is one piece in memory (a hit then writes it at once), else None."""

    def remove(key: str, reason: str = "invalidated") -> int:
        """Drop every variant under C{key}; the number dropped."""

    def purge(prefix: str) -> int:
        """Drop every response whose key starts with C{prefix}; the number dropped."""

    def keys() -> list[str]:
        """Every primary key stored."""


def entry_cost(response: StoredResponse) -> int:
    return response.body_size + sum(len(n) + len(v) for n, v in response.headers) + ENTRY_OVERHEAD


@implementer(IBodySource)
class ChunkSource:
    """A body in memory, written while the client keeps up, paused while its buffer is full."""

    def __init__(self, chunks: Sequence[bytes], first: int = 0, last: int | None = None) -> None:
        if first or last is not None:
            chunks = _slice(chunks, first, last)
        self.chunks = chunks
        self.index = 0
        self.paused = False
        self.stopped = False
        self.gate = ReadGate(self)
        self.downstream: Any = None
        self.done: Callable[[Failure | None], None] | None = None
        self._pumping = False

    def streamTo(self, downstream: Any, done: Callable[[Failure | None], None]) -> None:
        self.downstream = downstream
        self.done = done
        chunks = self.chunks
        if len(chunks) == 1:
            # The usual small body: no flow-control bookkeeping for one write.
            downstream.writeBody(chunks[0])
            self.index = 1
            self._end()
            return
        downstream.registerUpstream(self)
        self._pump()

    def _pump(self) -> None:
        if self._pumping or self.stopped:
            return
        self._pumping = True
        try:
            chunks = self.chunks
            while not self.paused and self.index < len(chunks):
                chunk = chunks[self.index]
                self.index += 1
                self.downstream.writeBody(chunk)
                if self.stopped:
                    return
        finally:
            self._pumping = False
        if self.index >= len(self.chunks) and not self.stopped:
            self.downstream.unregisterUpstream(self)
            self._end()

    def _end(self) -> None:
        done, self.done = self.done, None
        self.stopped = True
        if done is not None:
            done(None)

    # What the ReadGate pauses and resumes (the client's flow control)
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopStreaming(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.done = None
            if self.downstream is not None:
                self.downstream.unregisterUpstream(self)


def _slice(chunks: Sequence[bytes], first: int, last: int | None) -> list[bytes]:
    out = []
    offset = 0
    end = None if last is None else last + 1
    for chunk in chunks:
        size = len(chunk)
        lo, hi = offset, offset + size
        offset = hi
        if hi <= first:
            continue
        if end is not None and lo >= end:
            break
        out.append(chunk[max(first - lo, 0) : size if end is None else min(end - lo, size)])
    return out


@implementer(ICacheStore)
class MemoryStore:
    """
    Responses in process memory, at most C{max_bytes} of them (bodies,
    headers and a fixed overhead per entry), the least recently used
    evicted first.
    """

    def __init__(self, max_bytes: int, on_evict: Callable[[StoredResponse, str], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.on_evict = on_evict
        self._lru: OrderedDict[tuple[str, tuple[tuple[bytes, bytes], ...]], tuple[StoredResponse, Sequence[bytes]]] = \
            OrderedDict()
        self._index: dict[str, list[StoredResponse]] = {}

    def variants(self, key: str) -> Sequence[StoredResponse]:
        return self._index.get(key, ())

    def chunks(self, response: StoredResponse) -> Sequence[bytes] | None:
        slot = (response.key, response.variant)
        held = self._lru.get(slot)
        if held is None or (held[0] is not response and held[0] != response):
            return None
        self._lru.move_to_end(slot)
        return held[1]

    def put(self, response: StoredResponse, chunks: Sequence[bytes]) -> bool:
        cost = entry_cost(response)
        if cost > self.max_bytes:
            return False
        if response.body_size <= JOIN_BELOW and len(chunks) != 1:
            chunks = (b"".join(chunks),)
        else:
            chunks = tuple(chunks)
        slot = (response.key, response.variant)
        if slot in self._lru:
            self._drop(slot, None)
        self._lru[slot] = (response, chunks)
        self._index.setdefault(response.key, []).append(response)
        self.size += cost
        while self.size > self.max_bytes and self._lru:
            oldest = next(iter(self._lru))
            self._drop(oldest, "lru")
        return True

    def update(self, old: StoredResponse, new: StoredResponse) -> None:
        slot = (old.key, old.variant)
        held = self._lru.get(slot)
        if held is None or (held[0] is not old and held[0] != old):
            return
        self._lru[slot] = (new, held[1])
        self._lru.move_to_end(slot)
        self.size += entry_cost(new) - entry_cost(held[0])
        variants = self._index[old.key]
        variants[variants.index(held[0])] = new

    def body(self, response: StoredResponse, first: int = 0, last: int | None = None) -> IBodySource | None:
        chunks = self.chunks(response)
        if chunks is None:
            return None
        return ChunkSource(chunks, first, last)

    def inline_body(self, response: StoredResponse) -> bytes | None:
        chunks = self.chunks(response)
        return chunks[0] if chunks is not None and len(chunks) == 1 else None

    def _drop(self, slot: tuple[str, Any], reason: str | None) -> None:
        response, _ = self._lru.pop(slot)
        self.size -= entry_cost(response)
        variants = self._index.get(response.key)
        if variants is not None:
            try:
                variants.remove(response)
            except ValueError:
                pass
            if not variants:
                del self._index[response.key]
        if reason is not None and self.on_evict is not None:
            self.on_evict(response, reason)

    def remove(self, key: str, reason: str = "invalidated") -> int:
        variants = list(self._index.get(key, ()))
        for response in variants:
            self._drop((response.key, response.variant), reason)
        return len(variants)

    def purge(self, prefix: str) -> int:
        return sum(self.remove(key, "purged") for key in [k for k in self._index if k.startswith(prefix)])

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._lru)
