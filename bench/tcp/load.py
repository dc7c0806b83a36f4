"""Load generator and backend for bench/tcp.sh (raw TCP proxying, issue 4).

Two roles, each its own process, both pinned to the load core by tcp.sh:

  load.py serve --port-file FILE [--tls-cert C --tls-key K]
      The backend. Listens on free ports of 127.0.0.1 (plain, and TLS when
      given a certificate), writes "PLAIN_PORT TLS_PORT" to FILE, and serves
      each connection in its own thread. A connection starts with a 16-byte
      header from the client, "UP <bytes>" or "DN <bytes>" (space-padded):
        UP: the backend reads that many bytes and throws them away, then
            answers "OK <bytes received>\\n". Plain sockets are read with
            splice(2) through a pipe into /dev/null (no copy to user space;
            LOAD_RECV=copy reads with recv_into into a 1 MiB buffer instead),
            TLS sockets with recv_into.
        DN: the backend sends that many bytes with sendfile(2) from a 64 MiB
            in-memory file (memfd), so the source costs no user-space copy.
      The answer to UP is what ends the client's clock, so no proxy needs to
      pass on a half-close for the figure to be right.

  load.py run --port P --dir up|down --bytes N [--tls --cafile F]
              [--watch-pid PID ...] [--core N ...] [--timeout S]
      The client. UP: sends the header and N bytes with sendfile(2) (plain) or
      1 MiB SSL writes (TLS), and waits for the backend's "OK". DN: sends the
      header and reads N bytes, discarded as the backend does. The clock
      runs from just after connect (and the TLS handshake) to the last byte
      (DN) or the backend's answer (UP). Prints one line:
        RESULT mibps=... seconds=... bytes=... cpu=... busy=A/B cipher=...
      where cpu is the CPU time (user+system, from /proc/PID/stat) that the
      watched processes (the proxy) used during the transfer, as % of one
      core, and busy how busy each --core was meanwhile (from /proc/stat:
      everything but idle and iowait, so softirq time, which the kernel
      charges to no process, and other users' processes count too).

Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import socket
import ssl
import sys
import threading
import time

HEADER = 16
CHUNK = 1 << 20
FILE_SIZE = 64 << 20
F_SETPIPE_SZ = 1031
# Receive with splice(2) into /dev/null rather than recv_into (LOAD_RECV=copy).
SPLICE = os.environ.get("LOAD_RECV", "splice") == "splice" and hasattr(os, "splice")


def _source_file() -> int:
    """A memfd holding FILE_SIZE random bytes, for sendfile(2)."""
    fd = os.memfd_create("tcpbench-source")
    block = os.urandom(CHUNK)
    for _ in range(FILE_SIZE // CHUNK):
        os.write(fd, block)
    return fd


_BLOCK: list[memoryview] = []


def _block() -> memoryview:
    if not _BLOCK:
        _BLOCK.append(memoryview(os.urandom(CHUNK)))
    return _BLOCK[0]


def _send_from_file(sock: socket.socket, fobj, count: int) -> None:
    if isinstance(sock, ssl.SSLSocket):
        # No sendfile through TLS: 1 MiB SSL writes of one random block.
        block = _block()
        while count:
            k = min(count, CHUNK)
            sock.sendall(block[:k])
            count -= k
        return
    # socket.sendfile() honours the socket's timeout; it stops at the end of
    # the file, so send the file as many times as needed.
    while count:
        n = min(count, FILE_SIZE)
        sent = sock.sendfile(fobj, 0, n)
        if sent != n:
            raise OSError(f"sendfile sent {sent} of {n} bytes")
        count -= n


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _recv_count(sock: socket.socket, n: int, buf: memoryview) -> int:
    """Reads and discards n bytes (fewer on EOF); returns how many arrived."""
    if SPLICE and not isinstance(sock, ssl.SSLSocket):
        return _splice_count(sock, n)
    got = 0
    while got < n:
        k = sock.recv_into(buf, min(len(buf), n - got))
        if not k:
            break
        got += k
    return got


class _Discard:
    """A pipe and /dev/null: splice(2) moves socket pages into the pipe and
    from there to /dev/null, so received bytes are never copied to user space."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # stays at the default 64 KiB
        self.null = os.open(os.devnull, os.O_WRONLY)

    def close(self) -> None:
        for fd in (self.r, self.w, self.null):
            os.close(fd)


_discard = threading.local()


def _splice_count(sock: socket.socket, n: int) -> int:
    d = getattr(_discard, "d", None)
    if d is None:
        d = _discard.d = _Discard()
    fd = sock.fileno()
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    got = 0
    while got < n:
        try:
            k = os.splice(fd, d.w, min(CHUNK, n - got), flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TimeoutError(f"nothing received for {timeout} s after {got} of {n} bytes")
            continue
        if not k:
            break
        got += k
        while k:
            k -= os.splice(d.r, d.null, k, flags=os.SPLICE_F_MOVE)
    return got


# --- backend -----------------------------------------------------------------


def _serve_conn(conn: socket.socket, fobj) -> None:
    buf = memoryview(bytearray(CHUNK))
    try:
        conn.settimeout(300)
        try:
            header = _recv_exact(conn, HEADER).decode("ascii").split()
        except (EOFError, OSError, UnicodeDecodeError):
            return  # a liveness probe (connect and close), or garbage
        if len(header) != 2 or header[0] not in ("UP", "DN") or not header[1].isdigit():
            return
        n = int(header[1])
        if header[0] == "UP":
            got = _recv_count(conn, n, buf)
            conn.sendall(f"OK {got}\n".encode())
        else:
            _send_from_file(conn, fobj, n)
        # Wait for the client to close first, so that the TIME_WAIT sockets
        # pile up on the client's side, not on the listening port's.
        while conn.recv_into(buf):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _accept_loop(lsock: socket.socket, fobj, wrap=None) -> None:
    while True:
        conn, _ = lsock.accept()
        if wrap is not None:
            try:
                conn.settimeout(30)
                conn = wrap(conn)
            except (OSError, ssl.SSLError):
                conn.close()
                continue
        threading.Thread(target=_serve_conn, args=(conn, fobj), daemon=True).start()


def serve(args: argparse.Namespace) -> None:
    fobj = open(_source_file(), "rb", buffering=0)
    plain = socket.create_server(("127.0.0.1", 0), backlog=64)
    ports = [str(plain.getsockname()[1]), "-"]
    threads = [threading.Thread(target=_accept_loop, args=(plain, fobj), daemon=True)]
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        tls = socket.create_server(("127.0.0.1", 0), backlog=64)
        ports[1] = str(tls.getsockname()[1])
        wrap = lambda c: ctx.wrap_socket(c, server_side=True)  # noqa: E731
        threads.append(threading.Thread(target=_accept_loop, args=(tls, fobj, wrap), daemon=True))
    for t in threads:
        t.start()
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(" ".join(ports) + "\n")
    os.rename(tmp, args.port_file)
    for t in threads:
        t.join()


# --- client ------------------------------------------------------------------


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _core_ticks(cores: list[int]) -> list[int]:
    """Busy time of each core so far (all but idle and iowait), from /proc/stat."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals]
                ticks[int(name[3:])] = sum(v[:8]) - v[3] - v[4]  # up to steal, less idle and iowait
    return [ticks.get(c, 0) for c in cores]


def run(args: argparse.Namespace) -> int:
    n = args.bytes
    sock = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cipher = "-"
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.cafile)
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
        c = sock.cipher()
        cipher = f"{c[1]}/{c[0]}" if c else "?"
    buf = memoryview(bytearray(CHUNK))
    _block()
    fobj = open(_source_file(), "rb", buffering=0) if args.dir == "up" and not args.tls else None
    hz = os.sysconf("SC_CLK_TCK")
    cpu0 = _cpu_ticks(args.watch_pid)
    busy0 = _core_ticks(args.core)
    t0 = time.monotonic()
    if args.dir == "up":
        sock.sendall(f"UP {n}".ljust(HEADER).encode())
        _send_from_file(sock, fobj, n)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            answer += chunk
        got = int(answer.split()[1]) if answer.startswith(b"OK ") else -1
    else:
        sock.sendall(f"DN {n}".ljust(HEADER).encode())
        got = _recv_count(sock, n, buf)
    dt = time.monotonic() - t0
    busy1 = _core_ticks(args.core)
    busy = "/".join(f"{(b1 - b0) / hz / dt * 100:.0f}" for b0, b1 in zip(busy0, busy1)) or "-"
    cpu = (_cpu_ticks(args.watch_pid) - cpu0) / hz / dt * 100 if args.watch_pid else float("nan")
    sock.close()
    if got != n:
        print(f"ERROR: {args.dir}: {got} of {n} bytes arrived", file=sys.stderr)
        return 1
    print(f"RESULT mibps={n / dt / 2**20:.1f} seconds={dt:.3f} bytes={n} cpu={cpu:.0f} busy={busy} cipher={cipher}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port-file", required=True)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--dir", choices=("up", "down"), required=True)
    r.add_argument("--bytes", type=int, default=1 << 30)
    r.add_argument("--tls", action="store_true")
    r.add_argument("--cafile")
    r.add_argument("--watch-pid", type=int, action="append", default=[])
    r.add_argument("--core", type=int, action="append", default=[])
    r.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
