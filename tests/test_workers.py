"""
All cores: C{twistd rproxy} with C{workers = 2} runs a supervisor and two
workers sharing the listening socket.  The group's /metrics and status add
up both workers; a worker killed with SIGKILL is replaced and no request
fails; a drain reaches every worker; SIGTERM stops them all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import free_port
from .test_graceful_stop import _read_all
from .test_reload import _NamedOrigin


def _get(port: int, target: str = "/") -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n" % target.encode())
    with s:
        return _read_all(s)


def _admin(admin: int, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as answer:
        raw = answer.read()
    return raw if path == "/metrics" else json.loads(raw)


def _until(pred: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _metric(text: bytes, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _twistd(tmp_path: Any, config: Any) -> tuple[Any, subprocess.Popen[bytes]]:
    """C{twistd -n rproxy --config CONFIG}, its output to twistd.out (a file: nobody reads a pipe until the end)."""
    output = open(tmp_path / "twistd.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "rproxy", "--config",
         str(config)], cwd=str(tmp_path), stdout=output, stderr=subprocess.STDOUT)
    return output, proc


def _group_config(tmp_path: Any, port: int, admin: int, origins: list[_NamedOrigin],
                  server: str = 'access_log = "off"', health: str = "", listen: str = "") -> Any:
    """
    A config file: 2 workers, the admin listener, one pool of C{origins} (with C{health} when given),
    the listener's endpoint string behind C{listen} (C{haproxy:}).
    """
    config = tmp_path / "rproxy.toml"
    backends = ", ".join(f'"tcp:127.0.0.1:{o.port}"' for o in origins)
    config.write_text(f"""
[server]
workers = 2
shutdown_timeout = 5
{server}

[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"

[[listen]]
endpoint = "{listen}tcp:{port}:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = [{backends}]
{f"health = {{ {health} }}" if health else ""}
""")
    return config


def _run_group(tmp_path: Any, origins: list[_NamedOrigin], check: Any, **config: str) -> None:
    """
    Start twistd with 2 workers in front of C{origins} (L{_group_config}'s
    C{config}), run C{check(port, admin, proc)}, stop it with SIGTERM.
    """
    port, admin = free_port(), free_port()
    output, proc = _twistd(tmp_path, _group_config(tmp_path, port, admin, origins, **config))
    try:
        _until(lambda: (s := _admin(admin, "/api/status")) and s.get("workers_answering") == 2, "two workers")
        check(port, admin, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    except BaseException:
        proc.kill()
        print((tmp_path / "twistd.out").read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        output.close()
        for origin in origins:
            origin.sock.close()
    out = (tmp_path / "twistd.out").read_text()
    assert "Traceback" not in out, out


def test_two_workers_share_the_listener_add_up_their_metrics_and_survive_a_sigkill(tmp_path) -> None:
    a, b = _NamedOrigin(b"A"), _NamedOrigin(b"B")
    log = tmp_path / "access.log"
    pids: list[int] = []

    def check(port: int, admin: int, proc: Any) -> None:
        status = _admin(admin, "/api/status")
        pids.extend(status["pid"])
        assert len(set(pids)) == 2 and proc.pid not in pids
        answers = [_get(port, f"/r{i}") for i in range(20)]
        assert all(x.startswith(b"HTTP/1.1 200") for x in answers)
        metrics = _admin(admin, "/metrics")
        assert _metric(metrics, "rproxy_requests_total", code="2xx") == 20
        assert _metric(metrics, "rproxy_request_duration_seconds_count") == 20
        assert _metric(metrics, "rproxy_workers_running") == 2
        served = _admin(admin, "/api/status")
        [pool] = served["pools"]
        assert sum(x["requests"] for x in pool["backends"]) == 20

        # Each worker writes its lines within a second, with one write per flush.
        _until(lambda: sum(1 for line in log.read_text().splitlines() if line.startswith("/r")) == 20,
               "every line flushed")

        # A worker killed between requests: it is replaced, and no request fails (connections the kernel
        # gave to its socket meanwhile wait in the supervisor's socket for the replacement).
        for i in range(40):
            if i == 10:
                os.kill(pids[0], signal.SIGKILL)
            answer = _get(port, f"/k{i}")
            assert answer.startswith(b"HTTP/1.1 200"), (i, answer)
        status = _until(lambda: (s := _admin(admin, "/api/status")) and s.get("workers_answering") == 2
                        and pids[0] not in s["pid"] and s, "the killed worker replaced")
        assert pids[1] in status["pid"]
        pids[:] = status["pid"]
        assert _metric(_admin(admin, "/metrics"), "rproxy_worker_restarts_total") == 1

        # A drain reaches both workers, and the one started later too.
        drained = _admin(admin, "/api/drain", {"pool": "web", "backend": f"tcp:127.0.0.1:{a.port}"})
        assert drained["draining"] is True and drained["workers"] == 2
        bodies = {_get(port, "/d").partition(b"\r\n\r\n")[2] for _ in range(10)}
        assert bodies == {b"B"}

    _run_group(tmp_path, [a, b], check,
               server=f'access_log = "{log}"\naccess_log_format = "$request_uri $status"')

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    for pid in pids:
        _until(lambda pid=pid: gone(pid), "workers gone")
    # Both workers appended to the one access log: every request is in it once.
    lines = log.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("/r")) == 20
    # The killed worker's last second of lines is lost with it (SIGKILL: nothing is flushed); every
    # request after the kill is logged by the workers that ran.
    assert {f"/k{i}" for i in range(10, 40)} <= {line.split()[0] for line in lines}


# ---------------------------------------------------------------------------
# Health checks once for the group


class _HealthOrigin(_NamedOrigin):
    """
    C{/healthz} answers 200 or 503 as C{healthy} says, and each health check
    is counted with its time; any other path answers the origin's name.
    """

    def __init__(self, name: bytes) -> None:
        self.healthy = True
        self.probes: list[float] = []
        super().__init__(name)

    def answer(self, head: bytes) -> tuple[bytes, bytes]:
        if not head.startswith(b"GET /healthz "):
            return super().answer(head)
        self.probes.append(time.monotonic())
        return (b"200 OK", b"ok") if self.healthy else (b"503 Unavailable", b"sick")


def _bodies(port: int, n: int) -> list[bytes]:
    """C{n} requests, each on its own connection (the kernel gives them to either worker)."""
    return [_get(port, f"/x{i}").partition(b"\r\n\r\n")[2] for i in range(n)]


def test_two_workers_probe_each_backend_once_per_interval(tmp_path) -> None:
    origin = _HealthOrigin(b"A")

    def check(port: int, admin: int, proc: Any) -> None:
        time.sleep(1.0)  # every first probe (at a random offset within one interval) made
        start, window = time.monotonic(), 4.0
        time.sleep(window)
        probes = sum(1 for t in origin.probes if start <= t < start + window)
        # One prober: 4 s / (0.5 s +/- 10%) is 8 or 9 probes; one per worker would be twice that.
        assert 6 <= probes <= 10, probes

    _run_group(tmp_path, [origin], check, health='type = "http", path = "/healthz", interval = 0.5, timeout = 1')


def test_a_failing_backend_leaves_the_rotation_of_both_workers(tmp_path) -> None:
    a, b = _HealthOrigin(b"A"), _HealthOrigin(b"B")

    def check(port: int, admin: int, proc: Any) -> None:
        assert set(_bodies(port, 20)) == {b"A", b"B"}
        a.healthy = False  # A still answers requests, but its health checks fail
        name = f"tcp:127.0.0.1:{a.port}"
        # Both workers took A out: one state change each, summed over the group.
        _until(lambda: _metric(_admin(admin, "/metrics"), "rproxy_backend_state_changes_total", backend=name) == 2,
               "A out of both workers' rotation")
        assert set(_bodies(port, 40)) == {b"B"}
        a.healthy = True
        _until(lambda: _metric(_admin(admin, "/metrics"), "rproxy_backend_state_changes_total", backend=name) == 4,
               "A back in both workers")
        assert set(_bodies(port, 40)) == {b"A", b"B"}

    _run_group(tmp_path, [a, b], check,
               health='type = "http", path = "/healthz", interval = 0.3, timeout = 1, fall = 1, rise = 1')


def test_a_worker_restarted_after_sigkill_already_knows_a_backend_is_down(tmp_path) -> None:
    a, b = _HealthOrigin(b"A"), _HealthOrigin(b"B")
    a.healthy = False

    def check(port: int, admin: int, proc: Any) -> None:
        name = f"tcp:127.0.0.1:{a.port}"
        _until(lambda: _metric(_admin(admin, "/metrics"), "rproxy_backend_state_changes_total", backend=name) == 2,
               "A out of both workers' rotation")
        pids = _admin(admin, "/api/status")["pid"]
        os.kill(pids[0], signal.SIGKILL)
        _until(lambda: (s := _admin(admin, "/api/status")) and s.get("workers_answering") == 2
               and pids[0] not in s["pid"], "the killed worker replaced")
        # A long interval: the new worker's own probe, if it made one, would come seconds later.
        assert set(_bodies(port, 40)) == {b"B"}
        assert _metric(_admin(admin, "/metrics"), "rproxy_backend_healthy", backend=name) == 0

    _run_group(tmp_path, [a, b], check,
               health='type = "http", path = "/healthz", interval = 4, timeout = 1, fall = 1, rise = 1')


def test_a_reload_gives_the_supervisor_the_new_health_checks(tmp_path) -> None:
    a, b = _HealthOrigin(b"A"), _HealthOrigin(b"B")
    a.healthy = False

    def check(port: int, admin: int, proc: Any) -> None:
        assert set(_bodies(port, 20)) == {b"A", b"B"}  # no health checks yet
        assert a.probes == []
        config = tmp_path / "rproxy.toml"
        config.write_text(config.read_text() + 'health = { type = "http", path = "/healthz", interval = 0.3, '
                          'timeout = 1, fall = 1, rise = 1 }\n')
        proc.send_signal(signal.SIGHUP)
        name = f"tcp:127.0.0.1:{a.port}"
        _until(lambda: _metric(_admin(admin, "/metrics"), "rproxy_backend_state_changes_total", backend=name) == 2,
               "A out of both workers' rotation")
        assert set(_bodies(port, 40)) == {b"B"}

    _run_group(tmp_path, [a, b], check)


def test_two_workers_behind_a_load_balancer_read_its_proxy_headers(tmp_path) -> None:
    """A haproxy: listener under the supervisor: each worker reads the PROXY header on the socket it shares."""
    log = tmp_path / "access.log"
    clients = [f"203.0.113.{i}" for i in range(1, 9)]

    def check(port: int, admin: int, proc: Any) -> None:
        for client in clients:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"PROXY TCP4 {client} 192.0.2.1 40000 80\r\n".encode()
                      + b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
            with s:
                assert _read_all(s).startswith(b"HTTP/1.1 200")
        lines = _until(lambda: log.exists() and len(log.read_text().splitlines()) == len(clients) and log.read_text(),
                       "every request in the access log")
        assert sorted(line.split()[0] for line in lines.splitlines()) == sorted(clients)
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")  # no header: closed, nothing answered
        with s:
            assert _read_all(s) == b""

    _run_group(tmp_path, [_NamedOrigin(b"A")], check, listen="haproxy:", server=f'access_log = "{log}"')


class _StubSupervisor:
    """What L{GroupSource.when_ready} reads of the supervisor."""

    def __init__(self, clock: Any) -> None:
        self.reactor = clock
        self.drains = {("web", "tcp:127.0.0.1:8001"): True}
        self.stopping = False
        self.workers: list[Any] = []


def _reapplying(clock: Any, supervisor: Any) -> tuple[Any, list[tuple[str, str, Any]], list[Any]]:
    """A GroupSource whose calls to the worker wait for the test to answer them; log events are kept."""
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogPublisher

    from rproxy_tw.workers import GroupSource, _Worker

    source = GroupSource(supervisor)  # type: ignore[arg-type]
    calls: list[tuple[str, str, Any]] = []

    def call(worker: Any, method: str, path: str, body: Any = None) -> Any:
        d: Deferred[Any] = Deferred()
        calls.append((method, path, d))
        return d

    source._call = call  # type: ignore[method-assign]
    worker = _Worker(index=0, admin_path="/nonexistent", process=object(), started_at=clock.seconds())
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    source.when_ready(worker)
    clock.advance(0.05)
    return worker, calls, events


def test_drains_re_applied_to_a_worker_that_stops_meanwhile_log_no_error() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, globalLogPublisher

    clock = Clock()
    supervisor = _StubSupervisor(clock)
    worker, calls, events = _reapplying(clock, supervisor)
    try:
        assert [(m, p) for m, p, _ in calls] == [("GET", "/api/listeners")]
        calls[0][2].callback((200, []))
        assert [(m, p) for m, p, _ in calls[1:]] == [("POST", "/api/drain")]
        supervisor.stopping = True  # SIGTERM: the worker goes away under the POST
        calls[1][2].errback(ConnectionLost())
        clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert worker.ready
    assert len(calls) == 2  # no retry while stopping
    assert not [e for e in events if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


def test_drains_that_fail_to_reach_a_running_worker_are_tried_again() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, globalLogPublisher

    clock = Clock()
    supervisor = _StubSupervisor(clock)
    worker, calls, events = _reapplying(clock, supervisor)
    try:
        calls[0][2].callback((200, []))
        calls[1][2].errback(ConnectionLost())
        clock.advance(0.1)
        assert [(m, p) for m, p, _ in calls[2:]] == [("GET", "/api/listeners")]
        calls[2][2].callback((200, []))
        method, path, posted = calls[3]
        assert (method, path) == ("POST", "/api/drain")
        posted.callback((200, {}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and "trying again" in warnings[0]["log_format"]
    assert "ConnectionLost" in warnings[0]["error"]
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
    assert len(calls) == 4
