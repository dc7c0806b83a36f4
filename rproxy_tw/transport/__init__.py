"""
Transport helpers shared by every front end (HTTP, raw TCP, the TLS
transport): writing to a socket without Twisted's buffering when it is
empty, and backpressure gates with named reasons.
"""

from zope.interface import Attribute, Interface


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
