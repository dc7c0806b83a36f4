"""
What the proxy writes to an origin or to a client goes out when the reactor
turn ends, with everything else written in the turn; large writes, closes
and aborts keep their order and meaning.  On a memory reactor: the turn ends
when the clock is advanced by 0.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from rproxy_tw.transport.turn import SEND_AT_ONCE, EndOfTurn

from .conftest import chunk, request, response
from .test_http_server import Harness, TurnEndingTransport, one_response, take


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


class CountingTransport(TurnEndingTransport):
    """Counts the writes it is given (each would be a send on a socket) and whether it was aborted."""

    writes = 0
    aborted = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def test_the_answers_of_one_turn_reach_their_clients_when_it_ends() -> None:
    h = Harness()
    first, client1 = h.client()
    second, client2 = h.client()
    first.dataReceived(request(target=b"/one"))
    second.dataReceived(request(target=b"/two"))
    up1, origin1 = h.accept_origin()
    up2, origin2 = h.accept_origin()
    take(origin1), take(origin2)
    up1.dataReceived(response(200, b"one"))
    up2.dataReceived(response(200, b"two"))
    assert on_the_wire(client1) == b"" and on_the_wire(client2) == b""
    h.reactor.advance(0)
    assert one_response(on_the_wire(client1)).body == b"one"
    assert one_response(on_the_wire(client2)).body == b"two"


def test_a_head_and_the_body_read_after_it_leave_in_one_send() -> None:
    h = Harness()
    proto, counting = h.client(transport_type=CountingTransport)
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    take(origin)
    # The origin's head, then its chunked body, in three reads of one turn.
    up.dataReceived(response(200, headers=[(b"Transfer-Encoding", b"chunked")], length=False))
    up.dataReceived(chunk(b"hello "))
    up.dataReceived(chunk(b"world") + b"0\r\n\r\n")
    assert counting.writes == 0
    h.reactor.advance(0)
    assert counting.writes == 1
    assert one_response(on_the_wire(counting)).body == b"hello world"


def test_a_large_answer_goes_to_the_client_at_once_after_what_waited() -> None:
    h = Harness()
    proto, client = h.client()
    size = SEND_AT_ONCE * 2
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    take(origin)
    up.dataReceived(response(200, headers=[(b"Content-Length", b"%d" % (size + 5))], length=False) + b"first")
    assert on_the_wire(client) == b""  # the head and the first bytes wait for the turn's end
    up.dataReceived(b"y" * size)
    head, _, body = on_the_wire(client).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"first" + b"y" * size  # in order, without waiting for the turn to end


def test_a_closing_answer_is_sent_before_the_close() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, origin = h.accept_origin()
    take(origin)
    up.dataReceived(response(200, b"bye"))
    # Closed in the same turn: what waited went first, without the turn ending.
    assert client.disconnecting
    assert one_response(on_the_wire(client)).body == b"bye"


def test_an_answer_cut_by_its_origin_reaches_the_client_as_far_as_it_came() -> None:
    h = Harness()
    proto, client = h.client(transport_type=CountingTransport)
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    take(origin)
    up.dataReceived(response(200, headers=[(b"Transfer-Encoding", b"chunked")], length=False)
                    + chunk(b"partial") + b"zz\r\n")  # not a chunk size
    # Too late for a 502: the client gets the head and the first chunk, then the cut.
    sent = on_the_wire(client)
    assert sent.startswith(b"HTTP/1.1 200 OK\r\n") and sent.endswith(chunk(b"partial"))
    assert client.aborted
