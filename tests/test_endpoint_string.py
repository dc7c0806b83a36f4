"""
Endpoint strings read by rproxy_tw.endpoint_string, held to what Twisted's
public serverFromString makes of the same strings.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from rproxy_tw.endpoint_string import EndpointString, bind_address, parse, server_problem


@pytest.mark.parametrize(("description", "parsed"), [
    ("tcp:8080", EndpointString("tcp", ("8080",), {})),
    ("tcp:port=8080:interface=127.0.0.1", EndpointString("tcp", (), {"port": "8080", "interface": "127.0.0.1"})),
    ("unix:/tmp/a\\:b:mode=600", EndpointString("unix", ("/tmp/a:b",), {"mode": "600"})),
    ("tcp:8080:interface=\\:\\:1", EndpointString("tcp", ("8080",), {"interface": "::1"})),
    ("x:a=b=c", EndpointString("x", (), {"a": "b=c"})),
    ("haproxy:tcp:80", EndpointString("haproxy", ("tcp", "80"), {})),
])
def test_endpoint_strings_split_as_twisted_documents(description: str, parsed: EndpointString) -> None:
    assert parse(description) == parsed


@pytest.mark.parametrize(("description", "problem"), [
    ("tcp:http", "invalid literal for int()"),
    ("tcp:70000", "port 70000 is not in 0-65535"),
    ("tcp:8080:bogus=1", "unexpected keyword argument 'bogus'"),
    ("tcp:interface=127.0.0.1", "missing a required argument: 'port'"),
    ("unix:/tmp/s:mode=9", "invalid literal for int() with base 8"),
    ("ssl:443:privateKey=/nonexistent/key.pem", "no such file: /nonexistent/key.pem"),
    ("systemd:domain=INET", "give one of index= and name="),
])
def test_bad_server_endpoints_say_what_is_wrong(description: str, problem: str) -> None:
    found = server_problem(description)
    assert found is not None and problem in found


@pytest.mark.parametrize("description", ["tcp:8080", "tcp6:port=0:interface=\\:\\:1", "unix:/tmp/x",
                                         "systemd:domain=INET:index=0", "haproxy:tcp:80"])
def test_good_server_endpoints_pass(description: str) -> None:
    assert server_problem(description) is None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(port=st.integers(0, 65535), interface=st.sampled_from(["", "127.0.0.1", "::1", "0.0.0.0"]),
       backlog=st.integers(1, 1000), keyword_port=st.booleans(), order=st.permutations(range(2)))
def test_tcp_bind_addresses_are_what_twisted_listens_on(port: int, interface: str, backlog: int,
                                                        keyword_port: bool, order: list[int]) -> None:
    escaped = interface.replace(":", "\\:")
    options = [f"interface={escaped}" if interface else "", f"backlog={backlog}"]
    description = ":".join(["tcp", f"port={port}" if keyword_port else str(port)]
                           + [options[i] for i in order if options[i]])
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory())
    listened_port, _, listened_backlog, listened_interface = reactor.tcpServers[0]
    assert (listened_port, listened_backlog, listened_interface) == (port, backlog, interface)
    expected = None if port == 0 else ("ip", interface or "0.0.0.0", port)
    assert bind_address(description) == expected


@settings(max_examples=300, derandomize=True, deadline=None)
@given(path=st.text(st.sampled_from("ab:=\\/"), min_size=1, max_size=8))
def test_unix_paths_with_escapes_are_what_twisted_listens_on(path: str) -> None:
    escaped = "".join("\\" + c if c in ":=\\" else c for c in path)
    description = "unix:/tmp/" + escaped
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory())
    assert reactor.unixServers[0][0] == "/tmp/" + path
    assert bind_address(description) == ("unix", os.path.abspath("/tmp/" + path))
