"""
What a new connection costs the proxy beyond its request: the listen
queue it waits in, and what it leaves behind in the reactor once closed.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from rproxy_tw.listener import DEFAULT_BACKLOG, with_backlog

from .conftest import proxy_config, request, response
from .test_http_server import Harness, one_response, take


@pytest.mark.parametrize("given, started", [
    ("tcp:8080", "tcp:8080:backlog=511"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=511"),
    ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=511"),
    ("unix:/run/rproxy.sock", "unix:/run/rproxy.sock:backlog=511"),
    ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ("haproxy:tcp:8080", "haproxy:tcp:8080"),
])
def test_listeners_get_nginx_s_backlog_unless_they_set_one(given: str, started: str) -> None:
    assert with_backlog(given) == started


@pytest_twisted.inlineCallbacks
def test_a_listener_listens_with_the_larger_backlog(net: Any) -> None:
    proxy = yield net.proxy(proxy_config("tcp:127.0.0.1:1"))
    [listener] = proxy.service.listeners
    assert listener._port.backlog == DEFAULT_BACKLOG  # Twisted's tcp.Port passes it to listen()


def test_a_closed_connection_leaves_no_timer_behind() -> None:
    """A connection per request must not leave a call in the reactor for each one, for idle_timeout."""
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, _origin = h.accept_origin()
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    assert client.disconnecting
    proto.connectionLost(None)
    left = [c for c in h.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is proto]
    assert left == []


def test_startup_objects_are_frozen_out_of_the_collector_s_sight() -> None:
    import gc

    from rproxy_tw.tap import freeze_startup_objects

    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_closed_connection_is_freed_by_reference_counting() -> None:
    """No reference cycle outlives a connection: the collector need not run for each one."""
    import gc
    import weakref

    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, _origin = h.accept_origin()
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    gc.collect()
    gc.disable()
    try:
        proto.connectionLost(None)
        freed = weakref.ref(proto)
        del proto, client
        assert freed() is None
    finally:
        gc.enable()
