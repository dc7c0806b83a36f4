"""
Server endpoint strings (C{tcp:8080:interface=127.0.0.1}) read without
building an endpoint.

The config checks each listener's string, and finds two listeners that would
bind the same address, before anything listens.  Twisted reads these strings
only on its way to building an endpoint (its tokenizer is private), so this
module reads the documented grammar itself: parameters separated by C{:}, a
keyword parameter C{key=value} split at its first C{=}, and a backslash that
makes the next character literal (C{unix:/tmp/a\\:b}).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Mapping

import attr

__all__ = ["PROXY_HEADER_PREFIX", "EndpointString", "behind_proxy_header", "bind_address", "parse", "server_problem"]

PROXY_HEADER_PREFIX = "haproxy:"
"""What a listener's endpoint string starts with when a load balancer in front sends PROXY headers."""


def behind_proxy_header(description: str) -> tuple[bool, str]:
    """Whether C{description} asks for PROXY headers, and the endpoint string under the C{haproxy:} prefix."""
    if description.startswith(PROXY_HEADER_PREFIX):
        return True, description[len(PROXY_HEADER_PREFIX):]
    return False, description


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EndpointString:
    """One endpoint string, split: C{tcp:8080:backlog=9} is C{("tcp", ("8080",), {"backlog": "9"})}."""

    kind: str
    args: tuple[str, ...]
    kwargs: Mapping[str, str]


def parse(description: str) -> EndpointString:
    """Split C{description} as Twisted's C{serverFromString} and C{clientFromString} do."""
    params: list[tuple[str, ...]] = []
    current: list[str] = []
    parts: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            params.append(tuple(parts))
            current, parts = [], []
        elif char == "=" and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    params.append(tuple(parts))
    args = tuple(p[0] for p in params if len(p) == 1)
    kwargs = {p[0]: p[1] for p in params if len(p) == 2}
    return EndpointString(args[0] if args else "", args[1:], kwargs)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not in 0-65535")
    return port


def _existing(path: str | None) -> None:
    if path is not None and not os.path.exists(path):
        raise ValueError(f"no such file: {path}")


def _tcp(port: str, interface: str = "", backlog: str = "50") -> None:
    _port(port)
    int(backlog)


def _unix(address: str, mode: str = "666", backlog: str = "50", lockfile: str = "1") -> None:
    int(mode, 8)
    int(backlog)
    if lockfile not in ("0", "1"):
        raise ValueError(f"lockfile must be 0 or 1, not {lockfile!r}")


def _ssl(port: str, privateKey: str = "server.pem", certKey: str | None = None,  # noqa: N803 - Twisted's names
         sslmethod: str | None = None, interface: str = "", backlog: str = "50",
         extraCertChain: str | None = None, dhParameters: str | None = None) -> None:  # noqa: N803
    _port(port)
    int(backlog)
    for path in (privateKey, certKey, extraCertChain, dhParameters):
        _existing(path)


def _systemd(domain: str, index: str | None = None, name: str | None = None) -> None:
    if domain not in ("INET", "INET6", "UNIX"):
        raise ValueError(f"domain must be INET, INET6 or UNIX, not {domain!r}")
    if (index is None) == (name is None):
        raise ValueError("give one of index= and name=")
    if index is not None:
        int(index)


_BUILT_IN: dict[str, Callable[..., None]] = {
    "tcp": _tcp, "tcp6": _tcp, "unix": _unix, "ssl": _ssl, "systemd": _systemd,
}
"""The server endpoint types Twisted itself knows, with the parameters each takes."""


def server_problem(description: str) -> str | None:
    """
    What is wrong with the parameters of a built-in server endpoint string
    (a port that is no number, a keyword its type does not take, a missing
    key file), or L{None}; other types (plugins) are their own judges.
    """
    endpoint = parse(description)
    check = _BUILT_IN.get(endpoint.kind)
    if check is None:
        return None
    try:
        inspect.signature(check).bind(*endpoint.args, **endpoint.kwargs)
        check(*endpoint.args, **endpoint.kwargs)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def bind_address(description: str) -> tuple[Any, ...] | None:
    """
    What a server endpoint binds, comparable between spellings (C{tcp:8080}
    and C{tcp:port=8080}): C{("ip", host, port)}, C{("unix", path)},
    C{("systemd", domain, index or name)}, or L{None} when unknown (a plugin's
    type, a malformed string, or port 0, which never collides).
    """
    description = behind_proxy_header(description)[1]
    if server_problem(description) is not None:
        return None
    endpoint = parse(description)
    kind = endpoint.kind
    if kind not in _BUILT_IN:
        return None
    bound = inspect.signature(_BUILT_IN[kind]).bind(*endpoint.args, **endpoint.kwargs).arguments
    if kind == "unix":
        path = bound["address"]
        return ("unix", path if path.startswith("\0") else os.path.abspath(path))
    if kind == "systemd":
        return ("systemd", bound["domain"], bound.get("index", bound.get("name")))
    port = int(bound["port"])
    if port == 0:
        return None
    host = bound.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    return ("ip", host, port)
