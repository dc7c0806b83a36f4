"""
All cores: C{[server] workers = N} runs N reactor processes under one
supervisor process.

The supervisor opens every listener's sockets (before twistd drops
privileges) and hands them to the workers, which adopt them
(C{adoptStreamPort}): for C{tcp:} listeners one C{SO_REUSEPORT} socket per
worker on the same address, among which the kernel spreads new connections
evenly (a restarted worker takes its socket back; what the kernel queued
there meanwhile waits for it); otherwise (C{[server] reuseport = false},
C{unix:}, C{systemd:}) one socket all workers share, where a worker that
dies leaves the others accepting.  The supervisor restarts a worker that
dies (backing off when it dies young), passes SIGHUP, SIGUSR1 and SIGTERM
on, and serves the admin listener for the whole group: it asks each
worker, over a private unix socket, for its status and metrics and adds
them up; drains and reloads go to every worker, and a drain is applied
again to a worker that restarts.

Health checks run once for the group: the supervisor runs the active
monitors (L{GroupHealth}) and writes the table of the backends they hold down
to every worker's stdin, one JSON line each time it changes.  A worker waits
for the first line before it serves, so a worker (re)started while a backend
is down never sends it a request; it applies each table to its pools as its
own verdicts (L{rproxy_tw.upstream.health.VerdictBoard}).  Passive health
stays each worker's own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from typing import Any, Callable

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .admin.api import AdminSite, IAdminSource
from .admin.metrics import gauge_family, merge_snapshots
from .admin.status import merge_status
from .endpoint_string import behind_proxy_header, parse
from .events import BackendStateChanged, EventBus, IEventObserver
from .listener import DEFAULT_BACKLOG
from .config import ConfigError, ProxyConfig
from .logs import observer as log_observer
from .upstream.health import VerdictBoard, Verdicts, monitor_for, verdicts_of
from .upstream.pool import BackendPool
from .transport.tcp_server import adopt_tcp_port, adopts_tcp

__all__ = ["GroupHealth", "Supervisor", "VerdictPipe", "VerdictReceiver", "listening_socket",
           "listening_sockets", "worker_count"]


def worker_count(workers: int | str) -> int:
    """C{workers} as a number: C{"auto"} is one per core this process may run on."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


def listening_sockets(description: str, copies: int = 1) -> list[socket.socket]:
    """
    The listening sockets of a listener's endpoint string for the workers:
    one to share (C{tcp:}, C{tcp6:}, C{unix:} and C{systemd:}), or C{copies}
    C{tcp:}/C{tcp6:} sockets on the same address with C{SO_REUSEPORT}, one
    per worker, among which the kernel spreads new connections evenly.

    @raise CannotListenError: it cannot listen (port in use...).
    @raise ValueError: another kind of endpoint (it cannot be shared).
    """
    if copies == 1:
        return [listening_socket(description)]
    first = listening_socket(description, reuseport=True)
    port = first.getsockname()[1]  # the port tcp:0 was given: the others join it
    sockets = [first]
    try:
        for _ in range(copies - 1):
            sockets.append(listening_socket(description, reuseport=True, port=port))
    except CannotListenError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listening_socket(description: str, reuseport: bool = False, port: int | None = None) -> socket.socket:
    """
    A listening socket for a listener's endpoint string, to be shared by the
    workers: C{tcp:}, C{tcp6:}, C{unix:} and C{systemd:} (the socket systemd passed).

    @param reuseport: set C{SO_REUSEPORT} (C{tcp:} and C{tcp6:}), to join other sockets on that address.
    @param port: listen on this port rather than the description's.
    @raise CannotListenError: it cannot listen (port in use...).
    @raise ValueError: another kind of endpoint (it cannot be shared).
    """
    endpoint = parse(description)
    kind, args, kwargs = endpoint.kind, endpoint.args, endpoint.kwargs
    if kind == "systemd":
        count = int(os.environ.get("LISTEN_FDS", "0"))
        index = int(kwargs.get("index", "0"))
        if os.environ.get("LISTEN_PID") != str(os.getpid()) or index >= count:
            raise ValueError(f"{description}: systemd passed no socket with index {index}")
        family = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}[kwargs.get("domain", "INET")]
        return socket.socket(family, socket.SOCK_STREAM, fileno=3 + index)
    backlog = int(kwargs.get("backlog", DEFAULT_BACKLOG))
    if kind in ("tcp", "tcp6"):
        port = int(args[0] if args else kwargs["port"]) if port is None else port
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        host = kwargs.get("interface", "::" if kind == "tcp6" else "")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        address: Any = (host, port)
    elif kind == "unix":
        path = args[0] if args else kwargs["address"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = path
    else:
        raise ValueError(f"{description}: only tcp:, tcp6:, unix: and systemd: listeners can be shared by workers")
    try:
        sock.bind(address)
        if kind == "unix" and "mode" in kwargs:
            os.chmod(address, int(kwargs["mode"], 8))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(str(address), None, e) from None
    sock.setblocking(False)
    return sock


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """A worker's listener: the socket the supervisor opened, at file descriptor C{fd}."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Deferred[Any]:
        if self.family in (socket.AF_INET, socket.AF_INET6) and adopts_tcp(self.reactor):
            return succeed(adopt_tcp_port(self.reactor, self.fd, self.family, factory))
        return succeed(self.reactor.adoptStreamPort(self.fd, self.family, factory))


@implementer(IStreamServerEndpoint)
class _NotShared:
    """A listener a reload added under the supervisor: it has no shared socket until a restart."""

    def __init__(self, description: str) -> None:
        self.description = description

    def listen(self, factory: Any) -> Deferred[Any]:
        raise CannotListenError(self.description, None, "added by a reload: restart the supervisor to share it")


# ---------------------------------------------------------------------------
# Health checks, once for the group


@implementer(IEventObserver)
class GroupHealth(MultiService):
    """
    The group's active health checks, run once in the supervisor: the same
    L{HealthMonitor<rproxy_tw.upstream.health.HealthMonitor>} one process
    runs, over pools of the supervisor's own that serve no traffic (their
    backends' C{active_down} is all they hold).  Each time what the monitors
    hold down changes, C{publish} gets the whole table (L{verdicts}).  A
    reload (L{configure}) rebuilds them as a process's reload would: a pool
    whose C{[health]} section is unchanged keeps its monitor, and backends
    that stay keep their verdicts.

    @param monitor_for: the monitor of one pool (tests inject probes and a clock).
    """

    def __init__(self, reactor: Any, config: ProxyConfig, publish: Callable[[Verdicts], None],
                 monitor_for: Callable[[BackendPool, Any], Any] = monitor_for) -> None:
        super().__init__()
        self.reactor = reactor
        self.publish = publish
        self._monitor_for = monitor_for
        self.events = EventBus()
        self.events.subscribe(self)
        self.pools: dict[str, BackendPool] = {}
        self.monitors: dict[str, Any] = {}
        self.verdicts: Verdicts = {}
        """What the monitors hold down, as last published."""
        self.configure(config)

    def configure(self, config: ProxyConfig) -> None:
        """
        Probe what C{config} asks for.  @raise ConfigError: a pool's TLS
        client files cannot be used (nothing has changed then).
        """
        from .service import _endpoint_factory, _same_endpoints

        pools: dict[str, BackendPool] = {}
        for name, pc in config.pools.items():
            if pc.health is None:
                continue
            old = self.pools.get(name)
            reuse = {b.name: b for b in old.backends} if old is not None and _same_endpoints(old.config, pc) else None
            pools[name] = BackendPool(pc, self.reactor, _endpoint_factory(self.reactor, pc, name), reuse=reuse,
                                      events=self.events)
        # Nothing below fails: the new config takes over.
        old_monitors, self.pools, self.monitors = self.monitors, pools, {}
        for name, pool in pools.items():
            pool.take_over()
            monitor = old_monitors.get(name)
            if monitor is not None and monitor.config == pool.config.health:
                monitor.adopt(pool)
            else:
                monitor = self._monitor_for(pool, self.reactor)
            self.monitors[name] = monitor
        for name, monitor in old_monitors.items():
            if self.monitors.get(name) is not monitor:
                monitor.disownServiceParent()
        for monitor in self.monitors.values():
            if monitor.parent is None:
                monitor.setServiceParent(self)
        self._check()

    def observe(self, event: Any) -> None:
        if isinstance(event, BackendStateChanged):
            self._check()

    def _check(self) -> None:
        verdicts = verdicts_of(self.pools.values())
        if verdicts != self.verdicts:
            self.verdicts = verdicts
            self.publish(verdicts)


def verdict_line(verdicts: Verdicts) -> bytes:
    """One message of the supervisor's pipe to a worker: the whole table, one JSON line."""
    return json.dumps({"down": verdicts}, separators=(",", ":")).encode() + b"\n"


@implementer(IPushProducer)
class VerdictPipe:
    """
    The supervisor's end of a worker's stdin (any C{IConsumer}: the
    process).  Each line is the whole verdict table, so while the pipe is
    full (the worker reads slowly) only the latest line waits, written once
    the pipe drains: memory stays bounded, and the worker ends with the
    table in force.
    """

    def __init__(self, consumer: IConsumer) -> None:
        self.consumer = consumer
        self.paused = False
        self.closed = False
        self.waiting: bytes | None = None
        consumer.registerProducer(self, True)

    def send(self, line: bytes) -> None:
        if self.closed:
            return
        if self.paused:
            self.waiting = line
        else:
            self.consumer.write(line)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        line, self.waiting = self.waiting, None
        if line is not None and not self.closed:
            self.consumer.write(line)

    def stopProducing(self) -> None:
        """The pipe closed (the worker ended)."""
        self.closed = True
        self.waiting = None


class VerdictReceiver(LineOnlyReceiver):
    """
    A worker's end of the supervisor's pipe (its stdin): each line is the
    group's verdict table, given to C{board}; the first one also starts
    the worker serving (C{start}), so that it never sends a request to a
    backend the group already holds down.  The pipe's end means the
    supervisor is gone, even by SIGKILL: C{gone} is called.
    """

    _log = Logger(observer=log_observer)
    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024
    """A line longer than this (a table of tens of thousands of backends down) closes the pipe."""

    def __init__(self, board: VerdictBoard, start: Callable[[], None], gone: Callable[[], None]) -> None:
        self.board = board
        self.start: Callable[[], None] | None = start
        self.gone = gone

    def lineReceived(self, line: bytes) -> None:
        try:
            down = json.loads(line)["down"]
            if not isinstance(down, dict) or not all(isinstance(v, dict) for v in down.values()):
                raise TypeError(type(down).__name__)
        except (ValueError, KeyError, TypeError) as e:
            self._log.error("worker: a line from the supervisor was not a verdict table ({error}); ignored",
                            error=f"{type(e).__name__}: {e}")
            return
        self.board.update(down)
        start, self.start = self.start, None
        if start is not None:
            start()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._log.error("worker: a line from the supervisor longer than {limit} bytes: closing", limit=self.MAX_LENGTH)
        super().lineLengthExceeded(line)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone()


# ---------------------------------------------------------------------------
# The supervisor


@attrs.define(eq=False)
class _Worker:
    index: int
    admin_path: str
    process: Any = None
    started_at: float = 0.0
    quick_deaths: int = 0
    ended: Deferred[None] | None = None
    ready: bool = False
    pipe: VerdictPipe | None = None
    """Its stdin, where the verdict tables go."""


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: _Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def processEnded(self, reason: Any) -> None:
        self.supervisor._ended(self.worker, reason)


class Supervisor(MultiService):
    """
    N worker processes sharing the listeners' sockets, and the admin
    listener of the group.

    @param argv: the C{twistd rproxy} options a worker parses (its config
        file and overrides), so that a worker reads the same config, and
        re-reads it on SIGHUP, as one process would.
    """

    _log = Logger(observer=log_observer)

    RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    """Seconds before restarting a worker that died, by how many times in a row it died within QUICK."""
    QUICK = 10.0

    def __init__(self, config: ProxyConfig, reactor: Any, count: int, argv: list[str],
                 reload_config: Callable[[], ProxyConfig] | None = None) -> None:
        super().__init__()
        for index, listen in enumerate(config.listen):
            if parse(behind_proxy_header(listen.endpoint)[1]).kind not in ("tcp", "tcp6", "unix", "systemd"):
                raise ConfigError(config.source, f"listen[{index}].endpoint",
                                  f"{listen.endpoint!r}: with workers > 1 only tcp:, tcp6:, unix: and systemd: "
                                  "listeners can be shared (haproxy: in front of one of them too)")
        self.config = config
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.reload_config = reload_config
        self.sockets: dict[str, list[socket.socket]] = {}
        """Each listener's sockets: one all workers share, or one per worker (C{[server] reuseport})."""
        self.rundir = tempfile.mkdtemp(prefix="rproxy-workers-")
        os.chmod(self.rundir, 0o700)
        self.workers = [_Worker(i, os.path.join(self.rundir, f"worker-{i}.sock")) for i in range(count)]
        self.stopping = False
        self.restarts = 0
        self.drains: dict[tuple[str, str], bool] = {}
        """Drains asked through the admin API: applied again to a worker that restarts."""
        self.source = GroupSource(self)
        self.health = GroupHealth(reactor, config, self._send_verdicts)
        """The group's active health checks: probes once for all workers."""
        self.health.setServiceParent(self)
        if config.admin is not None:
            site = AdminSite(self.source, lambda: self.config.admin.token if self.config.admin else "")
            from twisted.internet.endpoints import serverFromString

            admin = StreamServerEndpointService(serverFromString(reactor, config.admin.endpoint), site)
            admin._raiseSynchronously = True
            admin.setServiceParent(self)
            self.admin_listener = admin

    # -- start -------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        from .service import ListenError

        for index, listen in enumerate(self.config.listen):
            endpoint = behind_proxy_header(listen.endpoint)[1]  # the worker reads the PROXY header itself
            if endpoint in self.sockets:
                continue
            own = self.config.server.reuseport and parse(endpoint).kind in ("tcp", "tcp6")
            try:
                self.sockets[endpoint] = listening_sockets(endpoint, self.count if own else 1)
            except CannotListenError as e:
                error = e.socketError
                why = getattr(error, "strerror", None) or str(error)
                line = f"listen[{index}]: cannot listen ({why}): {listen.endpoint}"
                self._log.error("{line}", line=line)
                raise ListenError(line) from None
            except ValueError as e:
                raise ConfigError(self.config.source, f"listen[{index}].endpoint", str(e)) from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._log.info("supervisor: starting {count} workers", count=self.count)
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: _Worker) -> None:
        if self.stopping:
            return
        try:
            os.unlink(worker.admin_path)
        except FileNotFoundError:
            pass
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        shared = {}
        for i, (endpoint, sockets) in enumerate(self.sockets.items()):
            sock = sockets[worker.index % len(sockets)]  # a restarted worker takes the same one back
            fds[3 + i] = sock.fileno()
            shared[endpoint] = [3 + i, int(sock.family)]
        spec = {"argv": self.argv, "index": worker.index, "admin": f"unix:{worker.admin_path}", "shared": shared}
        env = dict(os.environ)
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        worker.ready = False
        worker.ended = Deferred()
        worker.started_at = self.reactor.seconds()
        worker.process = self.reactor.spawnProcess(
            _WorkerProtocol(self, worker), sys.executable,
            [sys.executable, "-m", "rproxy_tw.workers", json.dumps(spec)], env=env, childFDs=fds)
        worker.pipe = VerdictPipe(worker.process)
        worker.pipe.send(verdict_line(self.health.verdicts))  # the first line: it may start serving
        self._log.info("supervisor: worker {index} started (pid {pid})", index=worker.index, pid=worker.process.pid)
        self.source.when_ready(worker)

    def _send_verdicts(self, verdicts: Verdicts) -> None:
        line = verdict_line(verdicts)
        for worker in self.workers:
            if worker.pipe is not None:
                worker.pipe.send(line)

    def _ended(self, worker: _Worker, reason: Any) -> None:
        ended, worker.ended = worker.ended, None
        worker.process = worker.pipe = None
        worker.ready = False
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            return
        lived = self.reactor.seconds() - worker.started_at
        worker.quick_deaths = worker.quick_deaths + 1 if lived < self.QUICK else 0
        delay = self.RESTART_DELAYS[min(worker.quick_deaths, len(self.RESTART_DELAYS) - 1)]
        self.restarts += 1
        self._log.warn("supervisor: worker {index} ended ({why}) after {lived:.1f}s: restarting in {delay}s",
                       index=worker.index, why=reason.value, lived=lived, delay=delay)
        self.reactor.callLater(delay, self._spawn, worker)

    # -- signals -----------------------------------------------------------------------

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(signum)
                except Exception:  # noqa: BLE001 - it has just ended: its restart will come
                    pass

    def reload_file(self) -> None:
        """SIGHUP: every worker re-reads the config file; the supervisor takes its admin token and health checks."""
        self.signal_workers(signal.SIGHUP)
        if self.reload_config is not None:
            try:
                self.reconfigure(self.reload_config())
            except ConfigError as e:
                self._log.error("supervisor: reload refused: {error}", error=str(e))

    def reconfigure(self, config: ProxyConfig) -> None:
        """A reload: the admin token and the group's health checks take the new config."""
        self.health.configure(config)
        self.config = config

    def stopService(self) -> Deferred[None]:
        """SIGTERM: each worker drains (for up to its shutdown_timeout), then the supervisor ends."""
        self.stopping = True
        self.signal_workers(signal.SIGTERM)
        waiting = [w.ended for w in self.workers if w.ended is not None]
        timeout = self.config.server.shutdown_timeout + 10.0
        kill = self.reactor.callLater(timeout, self.signal_workers, signal.SIGKILL)
        d = super().stopService()

        def done(_: Any) -> None:
            if kill.active():
                kill.cancel()
            for sockets in self.sockets.values():
                for sock in sockets:
                    sock.close()
            import shutil

            shutil.rmtree(self.rundir, ignore_errors=True)

        return gatherResults([d, *waiting]).addBoth(done)


# ---------------------------------------------------------------------------
# The group's admin view


def _all_answered(answers: list[tuple[Any, Any]]) -> None:
    """A changing call fanned out to the workers: raise unless some answered and every one said yes."""
    if not answers:
        raise RuntimeError("no worker answered")
    errors = [value for _, (code, value) in answers if code != 200]
    if errors:
        raise KeyError(errors[0].get("error", "refused"))


@implementer(IAdminSource)
class GroupSource:
    """The admin API over every worker: reads add up, changes go to all."""

    _log = Logger(observer=log_observer)
    TIMEOUT = 5.0

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.reactor = supervisor.reactor
        self._clients: dict[str, Any] = {}

    def _client(self, worker: _Worker) -> Any:
        """An HTTP client to one worker's private admin socket (kept-alive: the status page polls)."""
        client = self._clients.get(worker.admin_path)
        if client is not None:
            return client
        import treq.client
        from twisted.internet.endpoints import UNIXClientEndpoint
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.iweb import IAgentEndpointFactory

        reactor, timeout, path = self.reactor, self.TIMEOUT, worker.admin_path

        @implementer(IAgentEndpointFactory)
        class _ToWorker:
            def endpointForURI(self, uri: Any) -> Any:
                return UNIXClientEndpoint(reactor, path, timeout=timeout)

        class _QuietPool(HTTPConnectionPool):
            # The one private name here: Twisted's pool logs "Starting factory" for each
            # connection it makes, and the supervisor polls its workers.
            _factory = type("_QuietFactory", (HTTPConnectionPool._factory,), {"noisy": False})  # type: ignore

        pool = _QuietPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        client = self._clients[path] = treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, _ToWorker(),
                                                                                          pool=pool))
        return client

    def _call(self, worker: _Worker, method: str, path: str, body: Any = None) -> Deferred[Any]:
        client = self._client(worker)
        url = "http://worker" + path
        if method == "GET":
            d = client.get(url)
        else:
            d = client.post(url, data=json.dumps(body or {}).encode(), headers={b"Content-Type": [b"application/json"]})
        d.addCallback(lambda response: response.json().addCallback(lambda value: (response.code, value)))
        d.addTimeout(self.TIMEOUT, self.reactor)
        return d

    def _all(self, method: str, path: str, body: Any = None) -> Deferred[list[tuple[_Worker, Any]]]:
        """Each running worker's answer (workers that fail to answer are left out)."""
        workers = [w for w in self.supervisor.workers if w.process is not None]
        d = DeferredList([self._call(w, method, path, body) for w in workers], consumeErrors=True)
        return d.addCallback(lambda results: [(w, value) for w, (ok, value) in zip(workers, results) if ok])

    def when_ready(self, worker: _Worker) -> None:
        """Once a (re)started worker answers, give it the drains asked so far."""
        started = worker.started_at

        def gone() -> bool:
            # This run of the worker ended (its successor gets the drains), or everything is stopping.
            return worker.process is None or worker.started_at != started or self.supervisor.stopping

        def attempt() -> None:
            if gone():
                return
            d = self._call(worker, "GET", "/api/listeners")

            def answered(_: Any) -> Any:
                worker.ready = True
                return gatherResults([self._call(worker, "POST", "/api/" + ("drain" if draining else "undrain"),
                                                 {"pool": pool, "backend": backend})
                                      for (pool, backend), draining in self.supervisor.drains.items()],
                                     consumeErrors=True)

            def again(_: Any) -> None:
                if not gone() and self.reactor.seconds() - started < 60:
                    self.reactor.callLater(0.1, attempt)

            def failed(failure: Failure) -> None:
                # Drains are idempotent: try the whole round again while the worker runs on,
                # else a backend drained in the group would take this worker's traffic.
                if gone():
                    return
                error = failure.value.subFailure.value if isinstance(failure.value, FirstError) else failure.value
                self._log.warn("supervisor: re-applying drains to worker {index} failed ({error}): trying again",
                               index=worker.index, error=repr(error))
                again(failure)

            d.addCallbacks(answered, again).addErrback(failed)

        self.reactor.callLater(0.05, attempt)

    def status(self) -> Deferred[dict[str, Any]]:
        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            views = [value for _, (code, value) in answers if code == 200]
            out = merge_status(views) if views else {"pools": [], "listeners": [], "routes": [], "totals": {}}
            out["workers"] = self.supervisor.count
            out["workers_answering"] = len(views)
            return out

        return self._all("GET", "/api/status").addCallback(merged)

    def metrics(self) -> Deferred[dict[str, Any]]:
        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            snap = merge_snapshots([value for _, (code, value) in answers if code == 200])
            supervisor = self.supervisor
            snap.update(gauge_family("workers", "Worker processes configured", (), [[[], supervisor.count]]))
            snap.update(gauge_family("workers_running", "Worker processes running", (),
                                     [[[], sum(1 for w in supervisor.workers if w.process is not None)]]))
            restarts = gauge_family("worker_restarts", "Workers restarted after they ended", (),
                                    [[[], supervisor.restarts]])
            restarts["worker_restarts"]["type"] = "counter"
            snap.update(restarts)
            return snap

        return self._all("GET", "/api/snapshot").addCallback(merged)

    def drain(self, pool: str, backend: str, draining: bool) -> Deferred[dict[str, Any]]:
        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            _all_answered(answers)
            self.supervisor.drains[(pool, backend)] = draining
            first = answers[0][1][1]
            return {**first, "inflight": sum(value["inflight"] for _, (code, value) in answers),
                    "workers": len(answers)}

        return self._all("POST", "/api/" + ("drain" if draining else "undrain"),
                         {"pool": pool, "backend": backend}).addCallback(merged)

    def purge(self, url: str) -> Deferred[dict[str, Any]]:
        """Every worker has its own cache: each purges, and the counts add up."""
        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            _all_answered(answers)
            return {"url": url, "purged": sum(value["purged"] for _, (code, value) in answers),
                    "workers": len(answers)}

        return self._all("POST", "/api/purge", {"url": url}).addCallback(merged)

    def reload(self) -> Deferred[dict[str, Any]]:
        supervisor = self.supervisor
        if supervisor.reload_config is not None:
            try:
                supervisor.reconfigure(supervisor.reload_config())
            except ConfigError as e:
                return succeed({"ok": False, "error": str(e)})

        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            results = [value for _, (code, value) in answers]
            refused = [r for r in results if not r.get("ok")]
            if refused:
                return {"ok": False, "error": refused[0].get("error"), "workers": len(results)}
            return {"ok": bool(results), "summary": results[0]["summary"] if results else "no worker answered",
                    "workers": len(results)}

        return self._all("POST", "/api/reload").addCallback(merged)


# ---------------------------------------------------------------------------
# A worker process


def _worker_main(spec: dict[str, Any]) -> None:
    # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes one
    # SIGTERM on (a second signal would cut this worker's connections instead of draining them).
    try:
        os.setsid()
    except OSError:
        pass
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .config import AdminConfig
    from .service import ProxyService
    from .tap import Options, _reopen_on_usr1, _second_signal_cuts, tune_process

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(spec["argv"])
    index = spec["index"]

    def for_worker(config: ProxyConfig) -> ProxyConfig:
        admin = AdminConfig(endpoint=spec["admin"], token="")
        return attrs.evolve(config, admin=admin, admin_endpoint=admin.endpoint,
                            server=attrs.evolve(config.server, workers=1))

    shared = {endpoint: AdoptedEndpoint(reactor, fd, family) for endpoint, (fd, family) in spec["shared"].items()}
    board = VerdictBoard(reactor)
    service = ProxyService(for_worker(options.proxy_config), reactor,
                           listen_endpoint_for=lambda description: shared.get(description) or _NotShared(description),
                           active_health=board.follower_for)
    if options["config"]:
        service.load_config = lambda: for_worker(options.reload_config())
    else:
        service.load_config = None
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload_file))
    _reopen_on_usr1(reactor, service)
    _second_signal_cuts(reactor, service)
    log = Logger(observer=log_observer)

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except Exception:  # noqa: BLE001 - the supervisor restarts a worker that ends
            log.failure("worker {index} could not start", index=index)
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        tune_process()  # as twistd's single process does
        log.info("worker {index} (pid {pid}) serving", index=index, pid=os.getpid())

    def gone() -> None:
        # The supervisor gone (even by SIGKILL): stdin, its pipe, ends; so does this worker, gracefully.
        if reactor.running:
            reactor.stop()

    # The supervisor's verdict tables come on stdin: the first one starts the service.
    from twisted.internet import stdio

    stdio.StandardIO(VerdictReceiver(board, start, gone), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY),
                     reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
