"""
C{twistd rproxy}: command-line options and C{makeService}.

The only module that touches the global reactor.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.python import usage

from .config import ConfigError, load_config, not_enforced_warnings, quick_config
from .service import ListenError, ProxyService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE [--check]] | [--listen ENDPOINT]... [--backend ENDPOINT]..."
    longdesc = (
        "A streaming reverse proxy and TLS terminator. Either --config FILE (TOML; see docs/config.md) "
        "or, for quick use, --listen and --backend endpoint strings (both repeatable): every request "
        "on every listener goes round-robin to the backends."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML)."],
        ["access-log", None, None, 'Access log target: "-" (stdout), a path, or "off". Overrides the config.'],
        ["admin", None, None, "Serve the admin listener (status page, JSON API, /metrics) on this endpoint, "
         "e.g. tcp:9901:interface=127.0.0.1. Overrides the config's [admin] endpoint."],
        ["workers", None, None, 'Worker processes sharing the listeners under one supervisor: a number, or "auto" '
         "(one per core). Overrides the config's [server] workers."],
        ["log-level", None, None, "The least severe of the proxy's own log events written: debug, info (the "
         "default), warn, error or critical. Overrides the config."],
    ]
    optFlags = [["check", None, "Validate the configuration and exit (0 when usable, 1 with the error)."]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["backend"] = []

    def opt_version(self) -> None:
        """Display rproxy's version (and Twisted's) and exit."""
        from twisted import version as twisted_version

        from . import __version__

        sys.stdout.write(f"rproxy_tw {__version__} (Twisted {twisted_version.short()})\n")
        sys.exit(0)

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this server endpoint string (default tcp:8080). Repeatable."""
        self["listen"].append(endpoint)

    def opt_backend(self, endpoint: str) -> None:
        """Proxy to this client endpoint string, e.g. tcp:127.0.0.1:8000. Repeatable."""
        self["backend"].append(endpoint)

    def postOptions(self) -> None:
        if self["config"] and (self["listen"] or self["backend"]):
            raise usage.UsageError("use either --config or --listen/--backend, not both")
        if self["log-level"] is not None:
            from .logs import LEVELS

            if self["log-level"] not in LEVELS:
                raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}, not {self['log-level']!r}")
        try:
            if self["config"]:
                config = self._overridden(load_config(self["config"]))
            elif self["backend"]:
                config = self._overridden(quick_config(self["listen"], self["backend"]))
            else:
                raise usage.UsageError("give --config FILE, or at least one --backend ENDPOINT")
        except ConfigError as e:
            if self["check"]:
                sys.stderr.write(f"{e}\n")
                sys.exit(1)
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            try:
                _check_files(config)
            except ConfigError as e:
                sys.stderr.write(f"{e}\n")
                sys.exit(1)
            for line in not_enforced_warnings(config):
                sys.stderr.write(f"{config.source}: warning: {line}\n")
            sys.stdout.write(f"{config.source}: ok\n")
            sys.exit(0)
        self.proxy_config = config

    def _overridden(self, config: Any) -> Any:
        """C{config} with what the command line overrides (at the start and at every reload)."""
        import attrs

        if self["access-log"] is not None:
            config = attrs.evolve(config, server=attrs.evolve(config.server, access_log=self["access-log"]))
        if self["log-level"] is not None:
            config = attrs.evolve(config, server=attrs.evolve(config.server, log_level=self["log-level"]))
        if self["workers"] is not None:
            workers: int | str = self["workers"]
            if workers != "auto":
                try:
                    workers = int(workers)
                except ValueError:
                    workers = 0
                if workers < 1:
                    raise usage.UsageError(f'--workers must be a positive number or "auto", not {self["workers"]!r}')
            config = attrs.evolve(config, server=attrs.evolve(config.server, workers=workers))
        if self["admin"] is not None:
            from .config import AdminConfig

            admin = attrs.evolve(config.admin or AdminConfig(), endpoint=self["admin"])
            config = attrs.evolve(config, admin=admin, admin_endpoint=admin.endpoint)
        return config

    def reload_config(self) -> Any:
        """The config file read again, with the command line's overrides (SIGHUP).  @raise ConfigError"""
        import os

        # Absolute: twistd --rundir changes the working folder after the options are read.
        path = self._config_path or os.path.abspath(self["config"])
        self._config_path = path
        return self._overridden(load_config(path))

    _config_path: str | None = None


def _check_files(config: Any) -> None:
    """Load what the config names (certificates, keys, CAs) without listening anywhere."""
    from twisted.internet.task import Clock

    from .tls import ServerTLSContexts, StdlibTLSContexts, client_tls_options

    import time

    clock = Clock()
    clock.advance(time.time())  # certificate validity is judged against today, not the epoch
    for profile in config.tls.values():
        if not profile.certificates:
            continue  # an ACME profile: nothing on disk yet (not_enforced_warnings says so)
        # Both TLS libraries a profile may be served with (see tls_server_factory).
        ServerTLSContexts(clock, profile, watch_interval=None)
        if profile.client_ca is None:
            StdlibTLSContexts(clock, profile, watch_interval=None)
    if any(profile.acme for profile in config.tls.values()):
        from .acme.manager import check_acme

        check_acme(config)
    for name, pool in config.pools.items():
        if pool.ca is not None or pool.client_cert is not None:
            client_tls_options("localhost", pool.ca, pool.client_cert, pool.client_key, now=clock.seconds(), pool=name)


def worker_argv(options: Options) -> list[str]:
    """The options a worker parses: the same config file (absolute) and overrides, as one process would."""
    import os

    argv: list[str] = []
    if options["config"]:
        argv += ["--config", os.path.abspath(options["config"])]
    for endpoint in options["listen"]:
        argv += ["--listen", endpoint]
    for endpoint in options["backend"]:
        argv += ["--backend", endpoint]
    for name in ("access-log", "log-level"):
        if options[name] is not None:
            argv += [f"--{name}", options[name]]
    return argv


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    from .workers import Supervisor, worker_count

    count = worker_count(options.proxy_config.server.workers)
    if count > 1:
        reload_config = options.reload_config if options["config"] else None
        try:
            supervisor = Supervisor(options.proxy_config, reactor, count, worker_argv(options), reload_config)
        except ConfigError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(1)
        _supervisor_signals(reactor, supervisor)
        _one_line_listen_errors()
        return supervisor
    try:
        service = ProxyService(options.proxy_config, reactor)
    except ConfigError as e:
        # A certificate or key that cannot be used: one line, no traceback.
        sys.stderr.write(f"{e}\n")
        sys.exit(1)
    if options["config"]:
        import os

        options._config_path = os.path.abspath(options["config"])
        service.load_config = options.reload_config
    else:
        service.load_config = None  # --listen/--backend: no file to read again
    _reload_on_hangup(reactor, service)
    _reopen_on_usr1(reactor, service)
    _second_signal_cuts(reactor, service)
    _one_line_listen_errors()
    reactor.callWhenRunning(tune_process)
    return service


def tune_process() -> None:
    """
    Settings for a long-running server process, made by twistd's entry point
    and by each worker once the proxy runs (an embedding application keeps
    its own): the garbage collector's and the C allocator's.
    """
    tune_garbage_collector()
    tune_allocator()


YOUNG_COLLECTION_THRESHOLD = 10_000
"""
Net allocations of tracked objects between two collections of the youngest
generation (CPython's default: 700).  A connection is freed by reference
counting (no cycle outlives it), but while some fifty are in flight their
live objects push the count past 700 every few dozen requests: measured
under 50 connections per request (`Connection: close`), 337 young
collections in 5 s, none of which found garbage, 3.5 us of CPU per request
(1.5% of it) spent on walking live objects.  At 10,000 the count never got
there under that load; cyclic garbage, where some is made (an error's
traceback), waits at most that many allocations.
"""


def tune_garbage_collector() -> None:
    """
    Set the collector for a long-running server, once the proxy runs: what
    exists then is frozen (L{freeze_startup_objects}), and the youngest
    generation is collected less often (L{YOUNG_COLLECTION_THRESHOLD}).
    An embedding application keeps its own settings: only twistd's entry
    point calls this.
    """
    import gc

    freeze_startup_objects()
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_COLLECTION_THRESHOLD:
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024
"""
Blocks of this size and more get a mapping of their own from glibc's
malloc; smaller ones come from the heap.  The default starts at 128 KiB and
moves with what was freed last, so the 256 KiB reads from an origin and the
bodies parsed out of them come from fresh mappings or from the heap's top
depending on the history of the heap: see L{MALLOC_TRIM_THRESHOLD}.
"""

MALLOC_TRIM_THRESHOLD = 32 * 1024 * 1024
"""
Free bytes at the top of the heap that glibc's malloc keeps before it
gives memory back to the kernel (default: 128 KiB, or twice the moving mmap
threshold).  Measured (bench/README.md, ninth session): after some minutes
of mixed traffic, 1 MiB responses passing through made 100,000 page faults
a second (about 150 per response; 30% of the proxy's CPU in the kernel
zeroing pages) because each large buffer freed at the heap's top was given
back and the next one faulted its pages in again; throughput fell from
about 1,000 to 600 responses a second.  With these two settings: 50 faults a
second and no fall.  The price is at most this much memory held after a
burst.
"""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """
    Set glibc's malloc for a server that moves large buffers (see
    L{MALLOC_TRIM_THRESHOLD}).  Nothing elsewhere (musl, macOS) or when the
    environment sets malloc's tunables itself (C{GLIBC_TUNABLES} or
    C{MALLOC_*_} variables): the operator's choice stands.

    @return: whether the settings were made.
    """
    import ctypes
    import os

    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc = ""  # no confstr, or no such name: not glibc
    if not libc.startswith("glibc "):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either one also stops glibc moving the mmap threshold by itself.
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def freeze_startup_objects() -> None:
    """
    Move what exists once the proxy runs (modules, Twisted, the config and
    its runtime) out of the garbage collector's sight (C{gc.freeze}): the
    oldest generation's passes would otherwise walk every one of those
    long-lived objects again.  Garbage is collected first, so none is kept.
    """
    import gc

    gc.collect()
    gc.freeze()


def _one_line_listen_errors() -> None:
    """
    A listener that cannot listen stops the start (twistd and twist let the
    exception out; twistd also reports it to a daemon's parent): say it in its
    one line on the real stderr, not as a traceback.  The service has logged
    the same line already.
    """
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, ListenError):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"{value}\n")
            stream.flush()
        else:
            previous(kind, value, tb)

    sys.excepthook = excepthook


def _reload_on_hangup(reactor: Any, service: ProxyService) -> None:
    """
    SIGHUP re-reads the config file and applies all of it (certificates and
    keys too) without dropping connections; a file that cannot be used is
    refused in one log line and the running config keeps serving.
    """
    import signal

    if not hasattr(signal, "SIGHUP"):
        return
    previous = signal.getsignal(signal.SIGHUP)

    def hangup(signum: int, frame: Any) -> None:
        reactor.callFromThread(service.reload_file)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, hangup)


def _reopen_on_usr1(reactor: Any, service: Any) -> None:
    """SIGUSR1 reopens the access log file (logrotate's postrotate sends it; no copytruncate needed)."""
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return

    def usr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(service.reopen_logs)

    signal.signal(signal.SIGUSR1, usr1)


def _on_second_stop_signal(reactor: Any, again: Callable[[int], None]) -> None:
    """
    The first SIGTERM (or SIGINT) stops as the reactor does (a graceful
    drain); a second one calls C{again(signum)} on the reactor thread.
    Installed once the reactor runs, around the handlers it installs then.
    """
    import signal

    seen = [0]

    def install() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(number: int, frame: Any, previous: Any = previous) -> None:
                seen[0] += 1
                if seen[0] == 1:
                    previous(number, frame)
                else:
                    reactor.callFromThread(again, number)

            signal.signal(signum, handler)

    reactor.callWhenRunning(install)


def _second_signal_cuts(reactor: Any, service: ProxyService) -> None:
    """
    The first SIGTERM (or SIGINT) stops as the reactor does: the service
    drains for up to C{shutdown_timeout}.  A second one cuts every
    connection still open at once, and the stop completes.
    """
    import signal

    _on_second_stop_signal(
        reactor, lambda number: service.abort_connections(f"{signal.Signals(number).name} again"))


def _supervisor_signals(reactor: Any, supervisor: Any) -> None:
    """SIGHUP and SIGUSR1 go on to every worker; a second SIGTERM too (each worker then cuts what remains)."""
    import signal

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(supervisor.reload_file))
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(supervisor.signal_workers, signal.SIGUSR1))
    _on_second_stop_signal(reactor, lambda number: supervisor.signal_workers(signal.SIGTERM))
