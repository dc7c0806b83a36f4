"""
The access log (format strings, buffered writes, SIGUSR1) and request ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock

from rproxy_tw.accesslog import AccessLog, LineWriter, compile_format
from rproxy_tw.config import ConfigError, parse_config
from rproxy_tw.events import RequestFinished
from tests.conftest import proxy_config, request, until

EVENT = RequestFinished(
    client="192.0.2.7", method=b"GET", target=b'/a?"b"', http_version=b"1.1", host=b"www.example.com", status=201,
    bytes_sent=5, started=1000.0, finished=1000.25, route="*/", pool="web", backend="tcp:10.0.0.1:80",
    request_headers=[(b"Host", b"www.example.com"), (b"User-Agent", b"t/1")], request_id=b"abc123", upstream_time=0.125, attempts=1, request_bytes=3,
)


def test_a_format_string_names_its_fields() -> None:
    line = compile_format('$remote_addr $request_id "$request" $status ${body_bytes_sent}B $route $backend '
                          '$upstream_time $request_time [$time_local] 100%')
    clock = _clock_at(EVENT.finished)
    for event in (EVENT, tuple(EVENT)):  # a RequestFinished, or its fields as the bus hands them out
        assert line(event, clock) == ('192.0.2.7 abc123 "GET /a?\\"b\\" HTTP/1.1" 201 5B */ tcp:10.0.0.1:80 '
                                      '0.125 0.250 [01/Jan/1970:00:16:40 +0000] 100%')


def test_json_lines_carry_the_request_id_route_backend_and_upstream_time() -> None:
    entry = json.loads(compile_format("json")(tuple(EVENT), _clock_at(EVENT.finished)))  # as the bus hands it out
    assert entry["request_id"] == "abc123" and entry["route"] == "*/" and entry["backend"] == "tcp:10.0.0.1:80"
    assert entry["upstream_time"] == 0.125 and entry["status"] == 201 and entry["duration"] == 0.25
    assert entry["pool"] == "web" and entry["request_bytes"] == 3


def test_an_unknown_field_is_a_config_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"unknown field \$nope"):
        compile_format("$status $nope")
    data = proxy_config("tcp:127.0.0.1:1", server={"access_log_format": "$status $upstream_addr"})
    with pytest.raises(ConfigError, match=r"test.toml: server.access_log_format: unknown field \$upstream_addr"):
        parse_config(data, source="test.toml")


def _clock_at(now: float) -> Any:
    from rproxy_tw.accesslog import _Clock

    clock = _Clock()
    clock.at(now)
    return clock


def test_lines_are_written_in_one_go_within_a_second(tmp_path) -> None:
    clock = Clock()
    path = tmp_path / "access.log"
    log = AccessLog(clock, "$status $request_id", path=str(path))
    log.observe(EVENT)
    log.observe(EVENT)
    assert path.read_text() == ""
    clock.advance(0.999)
    assert path.read_text() == ""
    clock.advance(0.001)
    assert path.read_text() == "201 abc123\n201 abc123\n"
    assert not clock.getDelayedCalls()  # idle: no timer left running


def test_each_line_of_a_flush_has_its_own_second(tmp_path) -> None:
    """A flush formats its events in one loop: the time stamps follow each event, also back in time."""
    clock = Clock()
    path = tmp_path / "access.log"
    log = AccessLog(clock, "$msec [$time_local] $time_iso8601", path=str(path))
    for finished in (1000.25, 1000.999, 1001.0, 1061.5, 1000.5, 86400.0):
        log.observe(EVENT._replace(finished=finished))
    log.flush()
    assert path.read_text().splitlines() == [
        "1000.250 [01/Jan/1970:00:16:40 +0000] 1970-01-01T00:16:40Z",
        "1000.999 [01/Jan/1970:00:16:40 +0000] 1970-01-01T00:16:40Z",
        "1001.000 [01/Jan/1970:00:16:41 +0000] 1970-01-01T00:16:41Z",
        "1061.500 [01/Jan/1970:00:17:41 +0000] 1970-01-01T00:17:41Z",
        "1000.500 [01/Jan/1970:00:16:40 +0000] 1970-01-01T00:16:40Z",
        "86400.000 [02/Jan/1970:00:00:00 +0000] 1970-01-02T00:00:00Z",
    ]


def test_a_full_buffer_is_written_at_once(tmp_path) -> None:
    clock = Clock()
    path = tmp_path / "access.log"
    writer = LineWriter(clock, str(path))
    for _ in range(700):
        writer.write("x" * 100)
    assert len(path.read_text().splitlines()) >= 655  # 64 KiB reached: written without waiting
    writer.close()
    assert len(path.read_text().splitlines()) == 700


def test_reopen_writes_to_the_new_file_after_a_move(tmp_path) -> None:
    clock = Clock()
    path = tmp_path / "access.log"
    writer = LineWriter(clock, str(path))
    writer.write("one")
    writer.flush()
    os.rename(path, tmp_path / "access.log.1")
    writer.write("two")
    writer.reopen()
    writer.write("three")
    writer.close()
    assert (tmp_path / "access.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"


# ---------------------------------------------------------------------------
# Request ids, through the proxy


@inlineCallbacks
def test_request_ids_are_generated_kept_from_trusted_peers_and_logged(net, tmp_path) -> None:
    log = tmp_path / "access.log"
    origin = yield net.origin()
    untrusted = yield net.proxy(proxy_config(origin.backend, server={"access_log": str(log),
                                                                     "access_log_format": "json"}))
    client = yield net.client(untrusted.port)
    client.send(request(target=b"/one", headers=[(b"X-Request-Id", b"chosen-by-client")]))
    yield client.until_responses([b"GET"])
    sent = origin.requests[-1].one(b"x-request-id")
    assert sent is not None and len(sent) == 32 and sent != b"chosen-by-client"
    yield until(lambda: log.exists() and log.read_text().endswith("\n"), "access log line")
    assert json.loads(log.read_text())["request_id"] == sent.decode()

    trusted = yield net.proxy(proxy_config(origin.backend, server={"trusted_proxies": ["127.0.0.1/32"]}))
    client = yield net.client(trusted.port)
    client.send(request(target=b"/two", headers=[(b"X-Request-Id", b"lb-4711")]))
    yield client.until_responses([b"GET"])
    assert origin.requests[-1].header(b"x-request-id") == [b"lb-4711"]
    client.send(request(target=b"/three", headers=[(b"X-Request-Id", b'bad"id')]))
    yield until(lambda: len(origin.requests) == 3, "third request")
    assert origin.requests[-1].one(b"x-request-id") != b'bad"id'

    off = yield net.proxy(proxy_config(origin.backend, server={"request_id_header": ""}))
    client = yield net.client(off.port)
    client.send(request(target=b"/four"))
    yield until(lambda: len(origin.requests) == 4, "fourth request")
    assert origin.requests[-1].one(b"x-request-id") is None


# ---------------------------------------------------------------------------
# twistd: SIGUSR1 reopens the file, "-" writes to stdout, a stop writes what waits


def _twistd(tmp_path: Any, origin_port: int, port: int, access_log: str) -> subprocess.Popen[bytes]:
    path = tmp_path / "rproxy.toml"
    path.write_text(f"""
[server]
access_log = "{access_log}"
access_log_format = "$request_uri $status $request_id"

[[listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:{origin_port}"]
""")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "rproxy", "--config",
         str(path)], cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(proc.stdout.read().decode())  # type: ignore[union-attr]


def _get(port: int, target: str) -> bytes:
    from .test_graceful_stop import _read_all

    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n" % target.encode())
    with s:
        return _read_all(s)


def _wait_for(pred: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_twistd_sigusr1_reopens_a_moved_access_log(tmp_path) -> None:
    from .conftest import free_port
    from .test_reload import _NamedOrigin

    origin = _NamedOrigin(b"A")
    port = free_port()
    log = tmp_path / "access.log"
    proc = _twistd(tmp_path, origin.port, port, str(log))
    try:
        assert _get(port, "/before").startswith(b"HTTP/1.1 200")
        _wait_for(lambda: log.exists() and "/before 200 " in log.read_text(), "the first line")
        os.rename(log, tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        _wait_for(log.exists, "the access log reopened")
        assert _get(port, "/after").startswith(b"HTTP/1.1 200")
        assert _get(port, "/last").startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        origin.sock.close()
    assert [line.split()[0] for line in (tmp_path / "access.log.1").read_text().splitlines()] == ["/before"]
    # /last was written at the stop, before a second had passed.
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["/after", "/last"]


def test_twistd_access_log_dash_writes_lines_to_stdout(tmp_path) -> None:
    from .conftest import free_port
    from .test_reload import _NamedOrigin

    origin = _NamedOrigin(b"A")
    port = free_port()
    proc = _twistd(tmp_path, origin.port, port, "-")
    try:
        assert _get(port, "/to-stdout").startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        origin.sock.close()
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    [line] = [line for line in out.splitlines() if line.startswith("/to-stdout ")]
    assert line.split()[1] == "200" and len(line.split()[2]) == 32


def test_the_combined_format_quotes_what_the_client_sent() -> None:
    event = EVENT._replace(request_headers=[(b"Referer", b"http://r/"), (b"user-agent", b'a "b" \\c')], tunnel=False)
    line = compile_format("combined")(event, _clock_at(EVENT.finished))
    assert line == (b'192.0.2.7 - - [01/Jan/1970:00:16:40 +0000] "GET /a?\\"b\\" HTTP/1.1" 201 5 '
                    b'"http://r/" "a \\"b\\" \\\\c"')


def test_the_json_line_is_what_json_dumps_makes() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rproxy_tw.accesslog import _json_line, _json_line_plain

    text = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"", b'a"b\\c', "é\u2028".encode()]))
    name = st.one_of(st.none(), st.text(max_size=8))
    events = st.builds(
        RequestFinished, st.text(max_size=8), st.binary(min_size=1, max_size=6), st.binary(min_size=1, max_size=12),
        st.sampled_from([b"1.0", b"1.1", b"2"]), text, st.integers(0, 599), st.integers(0, 10**12),
        st.one_of(st.none(), st.just(0.0), st.floats(1, 2e9)), st.floats(1, 2e9), name, name, name,
        st.lists(st.tuples(st.sampled_from([b"User-Agent", b"referer", b"Host"]), st.binary(max_size=8)), max_size=4),
        st.one_of(st.none(), st.integers(0, 10**9)), st.booleans(), text, st.one_of(st.none(), st.floats(0, 100)),
        st.integers(0, 4), st.integers(0, 10**9))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(events)
    def check(event: RequestFinished) -> None:
        clock = _clock_at(event.finished)
        assert _json_line(event, clock) == _json_line_plain(event, clock)
        json.loads(_json_line(event, clock))

    check()
