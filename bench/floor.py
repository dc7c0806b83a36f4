"""
The floor for a Python proxy that terminates TLS with the standard library's
ssl module: one process, one epoll loop (selectors), no Twisted, no routing,
no header rewriting, no timeouts, no limits.  Clients speak HTTP/1.1 GETs
without bodies; each request goes to the origin over a kept-alive connection
from a free list, the response (Content-Length only) comes back as it is and
the client's connection closes after it if the client asked for that.  TLS
runs on the socket itself (OpenSSL reads and writes the descriptor), the
least Python per connection that stdlib TLS allows.

It is not a proxy anyone should run: it measures what Python and the ssl
module cost, so that rproxy's connection-per-request figures (bench/h2.sh,
PROXIES=floor) can be read against what any Python proxy could do here.

    python bench/floor.py PORT TLS_PORT ORIGIN_PORT CERT KEY
"""

import selectors
import socket
import ssl
import sys

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Origin:
    def __init__(self, loop, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.loop = loop
        self.client = None
        self.buf = b""
        self.need = None

    def request(self, client, head):
        self.client, self.buf, self.need = client, b"", None
        self.loop.sel.register(self.sock, READ, self.readable)
        self.sock.send(head)

    def readable(self, mask):
        data = self.sock.recv(262144)
        if not data:
            raise SystemExit("origin closed")
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else 0
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            self.loop.sel.unregister(self.sock)
            client, data = self.client, self.buf
            self.client = self.buf = None
            self.loop.free.append(self)
            client.respond(data)


class Client:
    def __init__(self, loop, sock, context):
        self.loop = loop
        self.sock = sock
        self.buf = b""
        self.out = b""
        self.close_after = False
        self.closed = False
        self.handshaking = context is not None
        if context is not None:
            self.sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        loop.sel.register(self.sock, READ, self.readable)
        self.readable(READ)

    def readable(self, mask):
        try:
            if self.handshaking:
                self.sock.do_handshake()
                self.handshaking = False
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.close()
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        self.close_after = b"connection: close" in head.lower()
        path = head[:head.find(b"\r\n")].split(b" ")[1]
        origin = self.loop.free.pop() if self.loop.free else Origin(self.loop, self.loop.origin_port)
        origin.request(self, b"GET " + path + b" HTTP/1.1\r\nHost: origin\r\n\r\n")

    def respond(self, data):
        if self.closed:
            return
        if self.close_after:
            line = data.find(b"\r\n") + 2
            data = data[:line] + b"Connection: close\r\n" + data[line:]
        self.out = data
        self.writable(WRITE)

    def writable(self, mask):
        try:
            while self.out:
                sent = self.sock.send(self.out[:262144])
                self.out = self.out[sent:]
        except (ssl.SSLWantWriteError, BlockingIOError):
            self.loop.sel.modify(self.sock, WRITE, self.writable)
            return
        except OSError:
            self.close()
            return
        if self.close_after:
            self.close()
        else:
            self.loop.sel.modify(self.sock, READ, self.readable)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.loop.sel.unregister(self.sock)
        if isinstance(self.sock, ssl.SSLSocket) and not self.handshaking:
            try:
                self.sock.unwrap()  # close_notify, as nginx sends
            except (ssl.SSLError, OSError, ValueError):
                pass
        self.sock.close()


class Loop:
    def __init__(self, origin_port):
        self.sel = selectors.EpollSelector()
        self.free = []
        self.origin_port = origin_port

    def listen(self, port, context):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(511)
        sock.setblocking(False)

        def accept(mask):
            for _ in range(64):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    return
                conn.setblocking(False)
                Client(self, conn, context)

        self.sel.register(sock, READ, accept)

    def run(self):
        select = self.sel.select
        while True:
            for key, mask in select():
                key.data(mask)


def main(port, tls_port, origin_port, cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    loop = Loop(int(origin_port))
    loop.listen(int(port), None)
    loop.listen(int(tls_port), context)
    loop.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
