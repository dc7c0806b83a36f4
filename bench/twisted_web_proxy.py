"""
The stock Twisted reverse proxy, as a reference point for the benchmark.

C{twisted.web.proxy.ReverseProxyResource} at the root of a plain C{Site}, so
that rproxy's numbers can be read against what Twisted already ships. Run by
bench/run.sh as::

    python bench/twisted_web_proxy.py LISTEN_PORT ORIGIN_PORT

It listens on 127.0.0.1 only and writes no access log, like the other proxies
in the benchmark; warnings and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import Site


class _QuietSite(Site):
    """
    A Site without an access log: the other proxies run with theirs off.
    """

    def log(self, request: Request) -> None:
        pass


def _parseArgs(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="twisted.web.proxy.ReverseProxyResource on 127.0.0.1"
    )
    parser.add_argument("listen_port", type=int, help="port to listen on")
    parser.add_argument("origin_port", type=int, help="origin port on 127.0.0.1")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = _parseArgs(argv)

    # Warnings and errors only: the default observer would buffer every event.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ]
    )

    # twisted.web.proxy imports the global reactor at module level, so import
    # it here, after argument parsing, to keep --help cheap.
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.web.proxy import ReverseProxyResource

    root = ReverseProxyResource("127.0.0.1", args.origin_port, b"")
    site = _QuietSite(root)
    endpoint = serverFromString(reactor, f"tcp:{args.listen_port}:interface=127.0.0.1")

    exitCode = [0]

    def listenFailed(failure: Failure) -> None:
        sys.stderr.write(f"cannot listen on {args.listen_port}: {failure.value}\n")
        exitCode[0] = 1
        reactor.stop()  # type: ignore[attr-defined]

    def listening(port: IListeningPort) -> None:
        sys.stderr.write(
            f"twisted.web.proxy on {port.getHost()} -> 127.0.0.1:{args.origin_port}\n"
        )

    endpoint.listen(site).addCallbacks(listening, listenFailed)
    reactor.run()  # type: ignore[attr-defined]
    return exitCode[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
