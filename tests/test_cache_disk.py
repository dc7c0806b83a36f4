"""The disk store on a real folder, with the real reactor's thread pool: bound, restart, damaged files."""

from __future__ import annotations

import os

import attrs
import pytest_twisted
from zope.interface.verify import verifyObject

from rproxy_tw.cache.disk import DiskStore
from rproxy_tw.cache.rules import StoredResponse
from rproxy_tw.cache.store import ENTRY_OVERHEAD, ICacheStore, MemoryStore

inline = pytest_twisted.inlineCallbacks


def response(key: str, size: int, status: int = 200) -> StoredResponse:
    return StoredResponse(key=key, variant=((b"accept-encoding", b"gzip"),), vary=(b"accept-encoding",),
                          status=status, reason=b"OK", headers=((b"Cache-Control", b"max-age=60"), (b"X", b"\xff")),
                          request_time=1.0, response_time=2.0, body_size=size)


def files(folder) -> list[str]:
    return sorted(name for _, _, names in os.walk(folder) for name in names)


@inline
def test_the_disk_store_keeps_its_bound_and_its_contents_across_a_restart(tmp_path):
    from twisted.internet import reactor

    evicted = []
    store = DiskStore(str(tmp_path), 3 * (1000 + ENTRY_OVERHEAD), reactor, hot=MemoryStore(1 << 20))
    store.on_evict = lambda r, why: evicted.append((r.key, why))
    verifyObject(ICacheStore, store)
    yield store.ready
    for i in range(4):
        store.put(response(f"http://h/{i}", 1000), [b"%d" % i * 1000])
    yield store.flushed()
    assert evicted == [("http://h/0", "lru")] and store.size <= store.max_bytes
    assert len(files(tmp_path)) == 6  # three responses, a .body and a .meta each
    updated = attrs.evolve(store.variants("http://h/3")[0], headers=((b"Cache-Control", b"max-age=99"),))
    store.update(store.variants("http://h/3")[0], updated)
    yield store.flushed()

    again = DiskStore(str(tmp_path), store.max_bytes, reactor)
    yield again.ready
    assert sorted(again.keys()) == ["http://h/1", "http://h/2", "http://h/3"]
    [three] = again.variants("http://h/3")
    assert three == updated and three.variant == ((b"accept-encoding", b"gzip"),) and three.lifetime == 99


@inline
def test_damaged_files_are_dropped_when_the_store_starts(tmp_path):
    from twisted.internet import reactor

    store = DiskStore(str(tmp_path), 1 << 20, reactor)
    yield store.ready
    store.put(response("http://h/kept", 10), [b"k" * 10])
    store.put(response("http://h/short", 10), [b"s" * 10])
    yield store.flushed()
    bodies = {name: os.path.join(folder, name) for folder, _, names in os.walk(tmp_path) for name in names}
    metas = [path for name, path in bodies.items() if name.endswith(".meta")]
    short = next(p for p in metas if b"short" in open(p, "rb").read())
    with open(short[:-5] + ".body", "wb") as f:
        f.write(b"s")  # cut short: its meta says 10 bytes
    with open(os.path.join(tmp_path, "orphan.body"), "wb") as f:
        f.write(b"no meta names me")
    with open(os.path.join(tmp_path, "half.meta.123.tmp"), "wb") as f:
        f.write(b"{")
    again = DiskStore(str(tmp_path), 1 << 20, reactor)
    yield again.ready
    assert again.keys() == ["http://h/kept"] and len(files(tmp_path)) == 2
