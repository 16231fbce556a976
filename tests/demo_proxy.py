"""A forward proxy for tests, standing in for Shoal's outbound proxy: it accepts HTTP
CONNECT (how grpcio uses ``grpc_proxy``) and absolute-form requests (how urllib uses
``http_proxy``), maps the requested authority through a table to a loopback address,
records what it was asked, and relays bytes both ways. Threads and blocking sockets,
every wait with a timeout."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

HEAD_LIMIT = 64 * 1024  # a request head larger than this is refused
IO_TIMEOUT_SECONDS = 10.0  # any read or write that stalls this long ends the tunnel
CHUNK = 64 * 1024


class ForwardProxy:
    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, str]] = []  # (method, target) in arrival order
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(IO_TIMEOUT_SECONDS)
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(CHUNK)
                if not data or len(head) > HEAD_LIMIT:
                    return
                head += data
            head, rest = head.split(b"\r\n\r\n", 1)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            with self._lock:
                self.seen.append((method, target))
            if method == "CONNECT":
                authority = target
            else:
                parts = urlsplit(target)
                authority = parts.netloc
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                request_line = f"{method} {path or '/'} {version}"
            upstream_address = self.routes.get(authority)
            if upstream_address is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection(upstream_address, IO_TIMEOUT_SECONDS)
            with upstream:
                if method == "CONNECT":
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    rewritten = "\r\n".join([request_line, *header_lines]) + "\r\n\r\n"
                    upstream.sendall(rewritten.encode("latin-1"))
                if rest:
                    upstream.sendall(rest)
                back = threading.Thread(target=_relay, args=(upstream, client), daemon=True)
                back.start()
                _relay(client, upstream)
                back.join(IO_TIMEOUT_SECONDS)


def _relay(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
