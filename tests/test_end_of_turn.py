"""
What the proxy writes to an origin goes out when the reactor turn ends,
with every other request of the turn; large writes, closes and aborts keep
their order and meaning.  On a memory reactor: the turn ends when the clock
is advanced by 0.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from rproxy_tw.transport.turn import SEND_AT_ONCE, EndOfTurn

from .conftest import request, response
from .test_http_server import Harness, one_response, take


def on_the_wire(origin: StringTransport) -> bytes:
    """What the origin has been sent so far, without ending the turn."""
    return StringTransport.value(origin)


def test_calls_are_made_in_order_when_the_turn_ends_with_one_timed_call() -> None:
    clock = Clock()
    turn = EndOfTurn(clock)
    made: list[Any] = []
    turn.add(made.append, 1)
    turn.add(made.append, 2)
    assert made == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert made == [1, 2]
    assert clock.getDelayedCalls() == []


def test_a_failing_call_is_logged_and_the_others_are_made() -> None:
    clock = Clock()
    turn = EndOfTurn(clock)
    made: list[Any] = []
    seen: list[dict[str, Any]] = []
    turn.add(lambda: 1 / 0)
    turn.add(made.append, "after")
    globalLogPublisher.addObserver(seen.append)
    try:
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert made == ["after"]
    [failed] = [e for e in seen if e.get("log_level") == LogLevel.critical]
    assert failed["log_failure"].check(ZeroDivisionError)


def test_a_call_added_while_calls_are_made_gets_a_timed_call_of_its_own() -> None:
    clock = Clock()
    turn = EndOfTurn(clock)
    made: list[Any] = []
    turn.add(lambda: turn.add(made.append, "next"))
    turn.add(made.append, "first")
    clock.advance(0)  # a Clock makes a call due now at once; a reactor, on its next turn
    assert made == ["first", "next"]
    assert clock.getDelayedCalls() == []


def test_the_requests_of_one_turn_reach_their_origins_when_it_ends() -> None:
    h = Harness()
    first, _c1 = h.client()
    second, _c2 = h.client()
    first.dataReceived(request(target=b"/one"))
    second.dataReceived(request(target=b"/two"))
    _u1, origin1 = h.accept_origin()
    _u2, origin2 = h.accept_origin()
    assert on_the_wire(origin1) == b"" and on_the_wire(origin2) == b""
    h.reactor.advance(0)
    assert on_the_wire(origin1).startswith(b"GET /one HTTP/1.1\r\n")
    assert on_the_wire(origin2).startswith(b"GET /two HTTP/1.1\r\n")


def test_a_large_body_write_goes_at_once_after_what_waited() -> None:
    h = Harness()
    proto, _client = h.client()
    size = SEND_AT_ONCE * 2 + 10
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"%d" % size)]) + b"small")
    _up, origin = h.accept_origin()
    assert on_the_wire(origin) == b""  # head and first bytes wait for the turn's end
    big = b"x" * (SEND_AT_ONCE * 2)
    proto.dataReceived(big)
    sent = on_the_wire(origin)
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST / HTTP/1.1\r\n")
    assert body == b"small" + big  # in order, without waiting for the turn to end
    proto.dataReceived(b"tail!")
    assert on_the_wire(origin) == sent
    h.reactor.advance(0)
    assert on_the_wire(origin) == sent + b"tail!"


def test_a_closed_origin_connection_is_sent_what_waited_first() -> None:
    h = Harness()
    proto, _client = h.client()
    proto.dataReceived(request())
    _up, origin = h.accept_origin()
    # The upstream connection is closed in the turn its request was written in.
    proto.current.conn.close()
    assert on_the_wire(origin).startswith(b"GET / HTTP/1.1\r\n")
    assert origin.disconnecting


def test_an_aborted_origin_connection_sends_nothing_more() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    _up, origin = h.accept_origin()
    proto.current.conn.abort()
    h.reactor.advance(0)
    assert on_the_wire(origin) == b""


def test_an_answer_after_the_turn_ends_reaches_the_client() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    assert take(origin).startswith(b"GET / HTTP/1.1\r\n")  # reading the wire ends the turn
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
