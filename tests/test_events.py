"""
The events besides finished requests (tests/test_pipeline.py has those): a
raw TCP session closing, a backend leaving and entering rotation, a failed
TLS handshake, a reload applied or refused.  Each is what an observer of
the service's one event bus sees, on real sockets.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from rproxy_tw.events import (
    BackendStateChanged,
    EventRecorder,
    ReloadApplied,
    ReloadRefused,
    TCPSessionClosed,
    TLSHandshakeFailed,
)
from rproxy_tw.service import ProxyService

from .conftest import RawClient, free_port, proxy_config, until
from .test_reload import _echo_server
from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture


def _recorded(service: ProxyService) -> EventRecorder:
    recorder = EventRecorder()
    service.runtime.events.subscribe(recorder)
    return recorder


@pytest_twisted.ensureDeferred
async def test_a_tcp_session_that_ends_is_an_event(net: Any) -> None:
    echo = await _echo_server(net)
    tcp_port = free_port()
    data = proxy_config(echo, pools={"legacy": {"backends": [echo]}})
    data["listen"].append({"endpoint": f"tcp:{tcp_port}:interface=127.0.0.1", "protocol": "tcp", "pool": "legacy"})
    proxy = await net.proxy(data)
    recorder = _recorded(proxy.service)
    session = await net.client(tcp_port, RawClient())
    session.send(b"hello")
    await session.until_contains(b"hello")
    session.transport.loseConnection()
    await until(lambda: recorder.of(TCPSessionClosed), "the session's event")
    [event] = recorder.of(TCPSessionClosed)
    assert event.bytes_from_client == 5 and event.bytes_to_client >= 5
    assert event.backend == echo
    assert event.listener.startswith(f"tcp:{tcp_port}")


@pytest_twisted.ensureDeferred
async def test_backends_leaving_and_entering_rotation_are_events(net: Any) -> None:
    origin = await net.origin()
    proxy = await net.proxy(proxy_config(origin.backend))
    recorder = _recorded(proxy.service)
    proxy.service.set_draining("p", origin.backend, True)
    proxy.service.set_draining("p", origin.backend, False)
    pool = proxy.service.pool("p")
    backend = pool.backend(origin.backend)
    pool.mark_down(backend, "health check failed: 503")
    pool.mark_up(backend)
    assert [(e.pool, e.backend, e.in_rotation, e.reason) for e in recorder.of(BackendStateChanged)] == [
        ("p", origin.backend, False, "draining"),
        ("p", origin.backend, True, "drain ended"),
        ("p", origin.backend, False, "health check failed: 503"),
        ("p", origin.backend, True, "up"),
    ]


@pytest.mark.parametrize("library", ["ssl", "pyopenssl"])
@pytest_twisted.ensureDeferred
async def test_a_failed_tls_handshake_is_an_event(net: Any, pki: PKI, monkeypatch: Any, library: str) -> None:
    if library == "pyopenssl":
        # The path mutual-TLS listeners take (Twisted's TLS), chosen for every listener.
        monkeypatch.setenv("RPROXY_TLS_PYOPENSSL", "1")
    origin = await net.origin()
    data = proxy_config(origin.backend)
    tls_port = free_port()  # known before it listens: the event names the listener by its endpoint
    data["listen"] = [{"endpoint": f"tcp:{tls_port}:interface=127.0.0.1", "tls": "main"}]
    data["tls"] = {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}}
    proxy = await net.proxy(data)
    recorder = _recorded(proxy.service)

    def plain_http_to_tls() -> None:
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass

    await threads.deferToThread(plain_http_to_tls)
    await until(lambda: recorder.of(TLSHandshakeFailed), "the handshake's event")
    [event] = recorder.of(TLSHandshakeFailed)
    assert event.client == "127.0.0.1"
    assert event.listener == f"tcp:{tls_port}:interface=127.0.0.1"
    assert event.reason  # OpenSSL's reason, e.g. HTTP_REQUEST or WRONG_VERSION_NUMBER
    assert origin.requests == []


@pytest_twisted.ensureDeferred
async def test_reloads_applied_and_refused_are_events(net: Any, tmp_path: Any) -> None:
    origin = await net.origin()
    path = tmp_path / "rproxy.toml"
    path.write_text(f'[[listen]]\nendpoint = "tcp:{free_port()}:interface=127.0.0.1"\n'
                    f'[[route]]\npath = "/"\npool = "p"\n[pool.p]\nbackends = ["{origin.backend}"]\n'
                    '[server]\naccess_log = "off"\n')
    from rproxy_tw.service import service_from_file

    service = service_from_file(str(path), reactor)
    service.startService()
    net.services.append(service)
    recorder = _recorded(service)
    text = path.read_text()
    path.write_text(text.replace('path = "/"', 'path = "/v2/"'))
    assert service.reload_file() is not None
    path.write_text(text + "[nonsense\n")
    assert service.reload_file() is None
    [applied] = recorder.of(ReloadApplied)
    assert applied.source == str(path) and applied.summary.startswith("reload: ")
    [refused] = recorder.of(ReloadRefused)
    assert refused.source == str(path) and "not valid TOML" in refused.error
    assert [r.path for r in service.config.routes] == ["/v2/"], "the refused file changed nothing"


def test_the_bus_hands_a_finished_request_to_each_observer_by_its_own_handler() -> None:
    """
    An IRequestObserver's observe_request is called directly for finished
    requests (its observe for the other events); a plain observer's observe
    for every event; an observer that fails stops neither the others nor the request.
    """
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher
    from zope.interface import implementer
    from zope.interface.verify import verifyObject

    from rproxy_tw.accesslog import AccessLog
    from rproxy_tw.admin.metrics import ProxyMetrics
    from rproxy_tw.events import EventBus, IEventObserver, IRequestObserver, RequestFinished
    from rproxy_tw.http.server import LocalResponse

    @implementer(IRequestObserver)
    class Direct:
        def __init__(self) -> None:
            self.requests: list[Any] = []
            self.others: list[Any] = []

        def observe_request(self, event: RequestFinished) -> None:
            self.requests.append(event)

        def observe(self, event: Any) -> None:
            self.others.append(event)

    @implementer(IEventObserver)
    class Failing:
        def observe(self, event: Any) -> None:
            raise RuntimeError("observer bug")

    direct, plain = Direct(), EventRecorder()
    verifyObject(IRequestObserver, direct)
    verifyObject(IRequestObserver, ProxyMetrics())
    verifyObject(IRequestObserver, AccessLog(Clock(), "combined", writer=_Discard()))
    bus = EventBus()
    for observer in (Failing(), direct, plain):
        bus.subscribe(observer)
    logged: list[Any] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        bus.request_finished("192.0.2.1", LocalResponse(None, 404, "Not Found", started_at=5.0), 12, 5.5)
        reload = ReloadApplied("test", "ok")
        bus.publish(reload)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    [event] = direct.requests
    assert event == RequestFinished("192.0.2.1", b"-", b"-", b"1.1", None, 404, 12, 5.0, 5.5)
    assert direct.others == [reload] and plain.events == [event, reload]
    assert sum(1 for e in logged if e.get("log_failure") is not None) == 2
    assert type(event) is tuple and type(plain.events[0]) is RequestFinished  # fields to IRequestObserver, named to others
    bus.unsubscribe(direct)
    bus.publish(plain.events[0])
    assert direct.requests == [event] and plain.events == [event, reload, event]


class _Discard:
    def write(self, line: Any) -> None:
        pass
