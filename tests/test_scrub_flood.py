"""
A bounded flood on 127.0.0.1: thousands of slowloris and slow-POST
connections from many loopback addresses, plus a burst of requests from
one address, while a legitimate client's requests go on and succeed.
The attack runs in its own process (tests/flood_client.py); about 10 s.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.utils import getProcessOutputAndValue

from rproxy_tw.events import ConnectionRefused, EventRecorder, RequestRefused

from .conftest import proxy_config

inline = pytest_twisted.inlineCallbacks

SLOWLORIS, SLOWPOST, BURST, SECONDS = 2400, 1200, 3000, 8.0


def _file_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards C{wanted} (its children inherit it); what it is now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@inline
def test_a_legitimate_client_is_served_through_a_flood(net):
    # Each attacking connection costs a descriptor here and one in the attacking process.
    room = _file_limit(20000)
    if room < 5000:
        pytest.skip(f"the open-file limit ({room}) is too low for a flood of thousands of connections")
    scale = min(1.0, (room - 1000) / (SLOWLORIS + SLOWPOST + 1000))
    slowloris, slowpost = int(SLOWLORIS * scale), int(SLOWPOST * scale)
    origin = yield net.origin()
    config = proxy_config(origin.backend, limits={
        "header_timeout": 2.0, "min_body_rate": 500, "body_rate_window": 1.0,
        "max_connections_per_ip": 100, "max_requests_in_flight": 1000,
    })
    config["listen"][0]["max_connections"] = 20000
    config["rate_limit"] = {"requests": 100, "per": 1.0, "burst": 200}
    config["waf"] = {}
    proxy = yield net.proxy(config)
    recorder = EventRecorder()
    proxy.service.runtime.events.subscribe(recorder)
    script = os.path.join(os.path.dirname(__file__), "flood_client.py")
    attack = getProcessOutputAndValue(
        sys.executable, [script, "attack", str(proxy.port), str(SECONDS), str(slowloris), str(slowpost), str(BURST)],
        env=dict(os.environ))
    legit_run = getProcessOutputAndValue(sys.executable, [script, "legit", str(proxy.port), str(SECONDS)],
                                         env=dict(os.environ))
    (out, err, code), (legit_out, legit_err, legit_code) = yield gatherResults([attack, legit_run])
    assert code == 0 and legit_code == 0, (err + legit_err).decode()
    result: dict[str, Any] = json.loads(out)
    legit = json.loads(legit_out)
    print("\nflood:", json.dumps(result), "\nlegitimate client:", json.dumps(legit))
    assert legit["statuses"] == {"200": legit["requests"]} and legit["requests"] >= 10
    slowloris, slowpost, burst = (result["outcomes"][k] for k in ("slowloris", "slowpost", "burst"))
    # Counts depend on how fast this machine is; what must hold is that each defence acted.
    assert slowloris.get("408", 0) > 0, "slowloris heads are cut at header_timeout"
    assert slowpost.get("408", 0) > 0, "slow bodies are cut below min_body_rate"
    refused = lambda outcome: outcome.get("reset", 0) + outcome.get("closed_without_answer", 0)  # noqa: E731
    assert refused(slowloris) > 0 and refused(slowpost) > 0, "connections over max_connections_per_ip are closed at once"
    assert burst.get("429", 0) > 0 and burst.get("200", 0) >= 200
    reasons = {e.reason for e in recorder.of(RequestRefused)} | {e.reason for e in recorder.of(ConnectionRefused)}
    assert reasons >= {"rate_limit", "slow_body", "connections_per_ip"}
    assert proxy.service.guard.open.get("127.0.0.1", 0) <= 1
