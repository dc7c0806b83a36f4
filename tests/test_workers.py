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

from .test_graceful_stop import _free_port, _read_all
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


def test_two_workers_share_the_listener_add_up_their_metrics_and_survive_a_sigkill(tmp_path) -> None:
    a, b = _NamedOrigin(b"A"), _NamedOrigin(b"B")
    port, admin = _free_port(), _free_port()
    log = tmp_path / "access.log"
    config = tmp_path / "rproxy.toml"
    config.write_text(f"""
[server]
workers = 2
access_log = "{log}"
access_log_format = "$request_uri $status"
shutdown_timeout = 5

[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"

[[listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:{a.port}", "tcp:127.0.0.1:{b.port}"]
""")
    output = open(tmp_path / "twistd.out", "wb")  # a file, not a pipe: nobody reads a pipe until the end
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "rproxy", "--config",
         str(config)], cwd=str(tmp_path), stdout=output, stderr=subprocess.STDOUT)
    try:
        status = _until(lambda: (s := _admin(admin, "/api/status")) and s.get("workers_answering") == 2 and s,
                        "two workers answering")
        pids = status["pid"]
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

        # A worker killed between requests: the other accepts everything meanwhile, and it is replaced.
        for i in range(40):
            if i == 10:
                os.kill(pids[0], signal.SIGKILL)
            answer = _get(port, f"/k{i}")
            assert answer.startswith(b"HTTP/1.1 200"), (i, answer)
        status = _until(lambda: (s := _admin(admin, "/api/status")) and s.get("workers_answering") == 2
                        and pids[0] not in s["pid"] and s, "the killed worker replaced")
        assert pids[1] in status["pid"]
        assert _metric(_admin(admin, "/metrics"), "rproxy_worker_restarts_total") == 1

        # A drain reaches both workers, and the one started later too.
        drained = _admin(admin, "/api/drain", {"pool": "web", "backend": f"tcp:127.0.0.1:{a.port}"})
        assert drained["draining"] is True and drained["workers"] == 2
        bodies = {_get(port, "/d").partition(b"\r\n\r\n")[2] for _ in range(10)}
        assert bodies == {b"B"}
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
        a.sock.close()
        b.sock.close()
    output.close()
    out = (tmp_path / "twistd.out").read_text()
    assert "Traceback" not in out, out
    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    for pid in status["pid"]:
        _until(lambda pid=pid: gone(pid), "workers gone")
    # Both workers appended to the one access log: every request is in it once.
    lines = log.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("/r")) == 20
    # The killed worker's last second of lines is lost with it (SIGKILL: nothing is flushed); every
    # request after the kill is logged by the workers that ran.
    assert {f"/k{i}" for i in range(10, 40)} <= {line.split()[0] for line in lines}
