"""
Health checks once for a group of workers, in memory: the supervisor's
monitors (L{GroupHealth}, driven by L{Clock} and fake probes) publish the
table of backends held down; L{VerdictPipe} writes it to a worker's stdin
(a L{StringTransport}); L{VerdictReceiver} reads it there and gives it to the
worker's L{VerdictBoard}, whose L{FollowedHealth} applies it to the worker's
pools as the worker's own active verdicts.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IPushProducer, IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy_tw import parse_config
from rproxy_tw.config import HealthConfig
from rproxy_tw.events import BackendStateChanged, EventBus, EventRecorder
from rproxy_tw.upstream.health import HealthMonitor, PassiveHealth, VerdictBoard
from rproxy_tw.upstream.pool import BackendPool
from rproxy_tw.workers import GroupHealth, VerdictPipe, VerdictReceiver, verdict_line

from .test_health import FakeProbe, make_pool

A, B = "tcp:127.0.0.1:8001", "tcp:127.0.0.1:8002"
HEALTH = HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=2)


def config(pools: dict[str, Any]) -> Any:
    return parse_config({"listen": [{"endpoint": "tcp:0"}], "route": [{"path": "/", "pool": next(iter(pools))}],
                         "pool": pools}, source="test.toml")


def health(**overrides: Any) -> dict[str, Any]:
    return {"type": "tcp", "interval": 2.0, "timeout": 1.0, "rise": 2, "fall": 2, **overrides}


class Group:
    """The supervisor's side: GroupHealth over fake probes, what it published."""

    def __init__(self, cfg: Any) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()
        self.published: list[dict[str, Any]] = []
        self.group = GroupHealth(self.clock, cfg, self.published.append, monitor_for=self._monitor)
        self.group.startService()

    def _monitor(self, pool: BackendPool, reactor: Any) -> HealthMonitor:
        assert pool.config.health is not None
        return HealthMonitor(pool, pool.config.health, self.clock, self.probe, random=random.Random(1))

    def probe_all(self, ok: bool) -> None:
        """Let one interval pass and answer every probe started in it."""
        self.clock.advance(2.5)
        for d in self.probe.pending():
            if ok:
                d.callback(None)
            else:
                d.errback(ConnectionRefusedError("refused"))

    def probe_backend(self, endpoint: str, ok: bool) -> None:
        """Let one interval pass; the probes of C{endpoint} give C{ok}, the others pass."""
        self.clock.advance(2.5)
        for backend, d in self.probe.calls:
            if not d.called:
                if backend.name == endpoint and not ok:
                    d.errback(ConnectionRefusedError("refused"))
                else:
                    d.callback(None)


class Worker:
    """A worker's side: its pool, its board, the follower, and the events its pool published."""

    def __init__(self, health_config: HealthConfig | None = HEALTH, n: int = 2) -> None:
        self.clock = Clock()
        self.board = VerdictBoard(self.clock)
        self.recorder = EventRecorder()
        bus = EventBus()
        bus.subscribe(self.recorder)
        self.pool = make_pool(n, health=health_config, clock=self.clock)
        self.pool.events = bus
        self.follower = self.board.follower_for(self.pool)
        self.started: list[bool] = []
        self.gone: list[bool] = []
        self.receiver = VerdictReceiver(self.board, lambda: self.started.append(True),
                                        lambda: self.gone.append(True))
        self.receiver.makeConnection(StringTransport())

    def picks(self, n: int = 10) -> set[str]:
        return {b.name for b in (self.pool.pick("10.0.0.1") for _ in range(n)) if b is not None}


# ---------------------------------------------------------------------------
# The pipe: the supervisor's end


def test_the_pipe_writes_each_table_as_one_line() -> None:
    stdin = StringTransport()
    pipe = VerdictPipe(stdin)
    verifyObject(IPushProducer, pipe)
    assert stdin.producer is pipe and stdin.streaming
    pipe.send(verdict_line({}))
    pipe.send(verdict_line({"web": {A: "refused"}}))
    lines = stdin.value().splitlines()
    assert [json.loads(line) for line in lines] == [{"down": {}}, {"down": {"web": {A: "refused"}}}]


def test_a_full_pipe_keeps_only_the_latest_table() -> None:
    stdin = StringTransport()
    pipe = VerdictPipe(stdin)
    pipe.pauseProducing()
    for n in range(100):
        pipe.send(verdict_line({"web": {A: f"failure {n}"}}))
    assert stdin.value() == b""
    pipe.resumeProducing()
    assert stdin.value() == verdict_line({"web": {A: "failure 99"}})
    pipe.resumeProducing()  # nothing waits any more
    assert stdin.value().count(b"\n") == 1


def test_a_closed_pipe_takes_nothing_more() -> None:
    stdin = StringTransport()
    pipe = VerdictPipe(stdin)
    pipe.pauseProducing()
    pipe.send(verdict_line({}))
    pipe.stopProducing()
    pipe.resumeProducing()
    pipe.send(verdict_line({}))
    assert stdin.value() == b""


# ---------------------------------------------------------------------------
# The receiver: the worker's end


def test_the_first_table_starts_the_worker_with_the_verdicts_already_applied() -> None:
    worker = Worker()
    worker.follower.startService()
    seen_at_start: list[set[str]] = []
    worker.receiver.start = lambda: seen_at_start.append(worker.picks())
    line = verdict_line({"web": {A: "refused"}})
    worker.receiver.dataReceived(line[:7])  # a line may come in pieces
    assert seen_at_start == []
    worker.receiver.dataReceived(line[7:])
    assert seen_at_start == [{B}]  # the worker starts knowing A is down
    worker.receiver.dataReceived(verdict_line({}))
    assert seen_at_start == [{B}]  # started once
    assert worker.picks() == {A, B}


def test_a_line_that_is_no_table_is_logged_and_changes_nothing() -> None:
    worker = Worker()
    worker.follower.startService()
    with capturedLogs() as events:
        for line in (b"not json\n", b'{"up": {}}\n', b'{"down": ["web"]}\n', b'{"down": {"web": 1}}\n'):
            worker.receiver.dataReceived(line)
    assert len([e for e in events if "not a verdict table" in e["log_format"]]) == 4
    assert worker.started == [] and worker.board.down == {}


def test_the_end_of_the_pipe_means_the_supervisor_is_gone() -> None:
    worker = Worker()
    worker.receiver.connectionLost(None)
    assert worker.gone == [True]


def test_a_line_too_long_closes_the_pipe() -> None:
    worker = Worker()
    worker.receiver.MAX_LENGTH = 64
    with capturedLogs() as events:
        worker.receiver.dataReceived(b"x" * 100)
    assert worker.receiver.transport.disconnecting
    assert any("longer than" in e["log_format"] for e in events)


# ---------------------------------------------------------------------------
# The follower: the group's verdicts as the worker's own


def test_a_verdict_takes_the_backend_out_as_a_local_one_would() -> None:
    worker = Worker()
    worker.follower.startService()
    with capturedLogs() as events:
        worker.board.update({"web": {A: "ConnectionRefusedError: refused"}})
    a = worker.pool.backend(A)
    assert a.active_down and not a.healthy and a.last_error == "ConnectionRefusedError: refused"
    assert worker.recorder.of(BackendStateChanged) == [
        BackendStateChanged("web", A, False, "ConnectionRefusedError: refused")]
    assert [e["log_format"] for e in events if "down:" in e["log_format"]] == ["backend {backend} of pool {pool} down: {why}"]
    assert worker.picks() == {B}
    worker.board.update({"web": {A: "another reason"}})  # still down: no second event
    assert len(worker.recorder.of(BackendStateChanged)) == 1
    worker.board.update({})
    assert a.healthy and not a.active_down
    assert worker.recorder.of(BackendStateChanged)[-1] == BackendStateChanged("web", A, True, "up")
    assert worker.picks() == {A, B}


def test_a_returning_backend_ramps_up_with_slow_start() -> None:
    worker = Worker(HealthConfig(interval=2.0, timeout=1.0, slow_start=10.0))
    worker.follower.startService()
    a = worker.pool.backend(A)
    worker.board.update({"web": {A: "down"}})
    worker.board.update({})
    assert a.effective_weight == 0.1
    worker.clock.advance(5.0)
    assert 0.5 < a.effective_weight < 0.6
    worker.clock.advance(5.0)
    assert a.effective_weight == 1.0


def test_the_group_verdict_does_not_override_a_local_ejection() -> None:
    """Two verdicts, one rotation: passive health stays the worker's own."""
    worker = Worker(n=4)
    worker.follower.startService()
    passive = PassiveHealth(worker.pool, worker.clock)
    a = worker.pool.backend(A)
    for _ in range(5):
        passive.report_failure(a, "connect")
    assert a.ejected_until is not None
    worker.board.update({"web": {A: "down"}})
    worker.board.update({})  # the group says up; the ejection still holds it out
    assert not a.healthy
    worker.clock.advance(10.0)  # the ejection ends
    assert a.healthy


def test_the_verdicts_apply_to_the_pools_a_reload_builds() -> None:
    worker = Worker()
    worker.follower.startService()
    worker.board.update({"web": {A: "down"}})
    reloaded = make_pool(2, health=HEALTH, clock=worker.clock)  # new Backend objects
    worker.follower.adopt(reloaded)
    assert not reloaded.backend(A).healthy and reloaded.backend(B).healthy


def test_a_follower_started_late_applies_the_table_in_force_and_a_stopped_one_no_more() -> None:
    worker = Worker()
    worker.board.update({"web": {A: "down"}})
    assert worker.pool.backend(A).healthy  # not started: not applied
    worker.follower.startService()
    assert not worker.pool.backend(A).healthy
    worker.follower.stopService()
    worker.board.update({})
    assert not worker.pool.backend(A).healthy


def test_a_pool_without_health_checks_has_no_follower() -> None:
    worker = Worker(health_config=None)
    assert worker.follower is None


# ---------------------------------------------------------------------------
# The supervisor's monitors


def test_the_group_publishes_each_change_of_what_is_held_down() -> None:
    group = Group(config({"web": {"backends": [A, B], "health": health()}, "other": {"backends": [B]}}))
    assert list(group.group.monitors) == ["web"]  # a pool without [health] is not probed
    group.probe_all(ok=True)
    assert group.published == []
    group.probe_backend(A, ok=False)
    assert group.published == []  # one failure; fall = 2
    group.probe_backend(A, ok=False)
    assert group.published == [{"web": {A: "ConnectionRefusedError: refused"}}]
    group.probe_backend(A, ok=False)
    assert len(group.published) == 1  # still down: nothing new
    group.probe_all(ok=True)
    group.probe_all(ok=True)
    assert group.published[-1] == {} and len(group.published) == 2


def test_a_reload_keeps_unchanged_monitors_and_their_verdicts_and_drops_removed_pools() -> None:
    first = config({"web": {"backends": [A, B], "health": health()}, "api": {"backends": [B], "health": health()}})
    group = Group(first)
    for _ in range(2):
        group.probe_backend(A, ok=False)
    web_monitor = group.group.monitors["web"]
    assert group.published[-1] == {"web": {A: "ConnectionRefusedError: refused"}}
    # web unchanged, api's health check removed: A stays down, api is no longer probed.
    group.group.configure(config({"web": {"backends": [A, B], "health": health()}, "api": {"backends": [B]}}))
    assert group.group.monitors == {"web": web_monitor} and web_monitor.running
    assert len(group.published) == 1
    # web's health check changed: a new monitor; A, the same backend, stays down until it rises.
    group.group.configure(config({"web": {"backends": [A, B], "health": health(interval=3.0)}}))
    assert group.group.monitors["web"] is not web_monitor and not web_monitor.running
    assert group.group.verdicts == {"web": {A: "ConnectionRefusedError: refused"}}
    # A removed from web: nothing is held down any more.
    group.group.configure(config({"web": {"backends": [B], "health": health(interval=3.0)}}))
    assert group.published[-1] == {}


def test_from_the_supervisors_monitor_to_every_workers_pool() -> None:
    """The whole channel in memory: one monitor, two workers, a worker started after the verdict."""
    workers: list[Worker] = []
    pipes: list[VerdictPipe] = []

    def publish(verdicts: dict[str, Any]) -> None:
        for pipe in pipes:
            pipe.send(verdict_line(verdicts))

    def spawn() -> Worker:
        worker = Worker()
        worker.follower.startService()
        stdin = StringTransport()
        pipe = VerdictPipe(stdin)
        pipe.send(verdict_line(group.group.verdicts))
        workers.append(worker)
        pipes.append(pipe)
        deliver(worker, stdin)
        return worker

    def deliver(worker: Worker, stdin: StringTransport) -> None:
        worker.receiver.dataReceived(stdin.value())
        stdin.clear()

    group = Group(config({"web": {"backends": [A, B], "health": health()}}))
    group.group.publish = publish
    spawn(), spawn()
    assert all(w.started == [True] and w.picks() == {A, B} for w in workers)
    for _ in range(2):
        group.probe_backend(A, ok=False)
    for worker, pipe in zip(workers, pipes):
        deliver(worker, pipe.consumer)
    assert [w.picks() for w in workers] == [{B}, {B}]
    late = spawn()  # a worker restarted now knows at once
    assert late.started == [True] and late.picks() == {B}
    # The probes are the supervisor's only: the workers schedule none.
    assert all(w.clock.getDelayedCalls() == [] for w in workers)


# ---------------------------------------------------------------------------
# A worker's service: followers instead of monitors, across its reloads


@implementer(IStreamServerEndpoint)
class _NeverListening:
    def listen(self, factory: Any) -> Deferred[Any]:
        return Deferred()


def test_a_worker_service_follows_the_board_across_its_reloads() -> None:
    from rproxy_tw import ProxyService
    from rproxy_tw.upstream.health import FollowedHealth

    C = "tcp:127.0.0.1:8003"
    clock = Clock()
    board = VerdictBoard(clock)
    service = ProxyService(config({"web": {"backends": [A, B], "health": health()}}), clock,
                           listen_endpoint_for=lambda description: _NeverListening(),
                           active_health=board.follower_for)
    assert isinstance(service.runtime.monitors["web"], FollowedHealth)
    service.startService()
    assert not any(isinstance(child, HealthMonitor) for child in service)  # this process probes nothing
    # The supervisor reloaded first: it already holds C (added by the reload) down.
    board.update({"web": {A: "down", C: "down"}})
    assert not service.pool("web").backend(A).healthy
    service.reload(config({"web": {"backends": [A, B, C], "health": health()}}))  # the follower is kept
    web = service.pool("web")
    assert [b.healthy for b in web.backends] == [False, True, False]
    service.reload(config({"web": {"backends": [A, B, C], "health": health(interval=5.0)}}))  # a new follower
    assert [b.healthy for b in service.pool("web").backends] == [False, True, False]
    board.update({})
    assert [b.healthy for b in service.pool("web").backends] == [True, True, True]


# ---------------------------------------------------------------------------
# The supervisor with a fake reactor: what each worker is given


class _FakeProcess(StringTransport):
    """A worker process: its stdin is this transport."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    def signalProcess(self, signum: int) -> None:
        pass


class _SpawningClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, _FakeProcess, dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> _FakeProcess:
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, process, childFDs))
        return process


def _supervisor(reuseport: bool) -> tuple[Any, _SpawningClock]:
    from rproxy_tw.workers import Supervisor

    cfg = parse_config({"listen": [{"endpoint": "tcp:0:interface=127.0.0.1"}], "route": [{"path": "/", "pool": "web"}],
                        "pool": {"web": {"backends": [A, B], "health": health()}},
                        "server": {"workers": 2, "reuseport": reuseport}}, source="test.toml")
    clock = _SpawningClock()
    supervisor = Supervisor(cfg, clock, 2, [])
    supervisor.health.monitors["web"].disownServiceParent()  # no probes: the test sets the verdicts
    supervisor.privilegedStartService()
    return supervisor, clock


def _stop(supervisor: Any) -> None:
    supervisor.stopping = True
    for sockets in supervisor.sockets.values():
        for sock in sockets:
            sock.close()


def test_each_worker_gets_its_own_reuseport_socket_and_a_restarted_one_the_same() -> None:
    import socket

    supervisor, clock = _supervisor(reuseport=True)
    try:
        [sockets] = supervisor.sockets.values()
        assert len(sockets) == 2 and len({s.getsockname() for s in sockets}) == 1  # one address
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
        supervisor.startService()
        fds = [spawn[2][3] for spawn in clock.spawned]
        assert fds == [sockets[0].fileno(), sockets[1].fileno()]
        protocol = clock.spawned[0][0]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))  # worker 0 died
        clock.advance(1)
        assert clock.spawned[2][2][3] == sockets[0].fileno()
    finally:
        _stop(supervisor)


def test_without_reuseport_the_workers_share_one_socket() -> None:
    supervisor, clock = _supervisor(reuseport=False)
    try:
        [sockets] = supervisor.sockets.values()
        assert len(sockets) == 1
        supervisor.startService()
        assert [spawn[2][3] for spawn in clock.spawned] == [sockets[0].fileno()] * 2
    finally:
        _stop(supervisor)


def test_every_worker_gets_the_verdicts_first_and_each_change_after() -> None:
    supervisor, clock = _supervisor(reuseport=True)
    try:
        supervisor.startService()
        web = supervisor.health.pools["web"]
        web.backend(A).active_down = True
        web.mark_down(web.backend(A), "refused")  # as the monitor does
        first, second = (spawn[1] for spawn in clock.spawned)
        for process in (first, second):
            assert [json.loads(line) for line in process.value().splitlines()] == [
                {"down": {}}, {"down": {"web": {A: "refused"}}}]
        clock.spawned[0][0].processEnded(Failure(ProcessTerminated(signal=9)))
        clock.advance(1)
        restarted = clock.spawned[2][1]
        assert [json.loads(line) for line in restarted.value().splitlines()] == [{"down": {"web": {A: "refused"}}}]
    finally:
        _stop(supervisor)
