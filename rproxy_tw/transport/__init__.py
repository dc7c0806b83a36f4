"""
Transport helpers shared by every front end (HTTP, raw TCP, the TLS
transport): writing to a socket without Twisted's buffering when it is
empty, backpressure gates with named reasons, and what a peer's address
says.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from zope.interface import Attribute, Interface


def describe_address(address: IAddress | None) -> str:
    """A peer or host for log lines: C{203.0.113.7:5555}, C{[2001:db8::7]:443}, C{unix:/run/app.sock}."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = address.host
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    if isinstance(address, UNIXAddress) and address.name is not None:
        name = address.name
        return f"unix:{name.decode('utf-8', 'replace') if isinstance(name, bytes) else name}"
    return str(address)


def ip_of(address: IAddress | None) -> str | None:
    """The IP address of a TCP peer or host, or L{None} (a UNIX socket, no address)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return None


class ILingerlessClose(Interface):
    """
    A transport that can close without a lingering close, for a peer that
    has sent everything it will (its last request read whole): the HTTP/1.1
    connection asks for it by this interface, and any other transport
    closes as C{loseConnection} does.
    """

    def loseConnectionWithoutLinger() -> None:
        """Close once what was written is sent, without waiting for the peer's close."""


class ITimedHandshake(Interface):
    """
    A TLS transport that may cut a slow handshake (and its first bytes)
    itself, on the timer it has anyway: the protocol above then needs no
    deadline of its own for that phase.
    """

    times_handshake = Attribute("Whether this transport cuts a handshake slower than its factory's timeout.")
