"""
Opt-in: scan a TLS listener with testssl.sh (Debian package C{testssl.sh}),
as a browser-side auditor would.  About 25 seconds, so it runs only with
C{RPROXY_TLS_SCAN=1}:

    RPROXY_TLS_SCAN=1 python -m pytest tests/test_tls_scan.py -q

No protocol, cipher, preference or vulnerability finding may be rated LOW or
worse.  Certificate findings are left out: they describe the test's own
certificate (30 days, no OCSP or CRL URI), not the server.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.endpoints import serverFromString
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.server import Site
from twisted.web.static import Data

from rproxy_tw.tls import tls_server_factory

from .test_tls import PKI, _reactor, pki  # noqa: F401 - pki is a fixture

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")

pytestmark = pytest.mark.skipif(
    not (os.environ.get("RPROXY_TLS_SCAN") and TESTSSL), reason="set RPROXY_TLS_SCAN=1 and install testssl.sh"
)

SERVER_SECTIONS = ("protocols", "grease", "ciphers", "pfs", "serverPreferences", "vulnerabilities")


@pytest_twisted.inlineCallbacks
def test_testssl_finds_nothing_in_protocols_ciphers_or_vulnerabilities(pki: PKI, tmp_path: Any) -> None:
    factory = tls_server_factory(_reactor(), pki.profile("www-ec", "www-rsa"), Site(Data(b"ok", "text/plain")),
                                 watch_interval=None)
    port = yield serverFromString(_reactor(), "tcp:0:interface=127.0.0.1").listen(factory)
    report = str(tmp_path / "scan.json")
    try:
        out, err, code = yield getProcessOutputAndValue(TESTSSL, [
            "--quiet", "--color", "0", "--warnings", "off", "--severity", "LOW", "--jsonfile-pretty", report,
            "-p", "-E", "-S", "-U", "-P", "--add-ca", pki.ca_path, f"127.0.0.1:{port.getHost().port}",
        ], env=dict(os.environ))
    finally:
        yield port.stopListening()
    with open(report) as f:
        scan = json.load(f)
    findings = [
        (section, item["severity"], item["id"], item["finding"])
        for part in scan["scanResult"]
        for section, items in part.items()
        if section in SERVER_SECTIONS and isinstance(items, list)
        for item in items
        if item["severity"] not in ("OK", "INFO")
    ]
    assert findings == [], findings
