"""Backends for the proxy tests, built on the standard library (not on the proxy's own
engine, so the proxy is tested against an independent HTTP implementation), each in its
own thread so tests may block freely: an HTTP app, a WebSocket echo, a TCP echo with
half-close. All bind to loopback on a free port and count the connections they accept.

HTTP app routes:
  GET /            -> "hello from <name>"          GET /slow?ms=N -> sleeps, then 200
  GET /fail        -> 500                           GET /chunked?n=N -> N chunks, trailer
  POST|PUT /echo   -> {"length", "sha256"} of the body (Content-Length or chunked)
  GET /big?bytes=N -> N bytes                       HEAD anything -> headers only
  GET /headers     -> the request headers as JSON (hop-by-hop checks)
Every response carries ``x-backend: <name>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"
READ_CHUNK = 64 * 1024
SOCKET_TIMEOUT = 30.0  # every blocking wait in these apps is bounded


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: the sockets stay bound until all are chosen, so the
    kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, app: HttpApp) -> None:
        self.app = app
        super().__init__((LOOPBACK, app.port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100 Continue for Expect
    server: _Server
    timeout = SOCKET_TIMEOUT

    def setup(self) -> None:
        super().setup()
        with self.server.app.lock:
            self.server.app.connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain",
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend", self.server.app.name)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _count(self) -> None:
        app = self.server.app
        with app.lock:
            app.requests += 1
            app.paths.append(self.path)

    def _read_body(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, READ_CHUNK))
                    if not data:
                        return
                    remaining -= len(data)
                    yield data
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length") or 0)
            while remaining:
                data = self.rfile.read(min(remaining, READ_CHUNK))
                if not data:
                    return
                remaining -= len(data)
                yield data

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._count()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        app = self.server.app
        if app.delay_s:
            time.sleep(app.delay_s)
        if app.status != 200:
            self._reply(app.status, b"failing on purpose\n")
        elif url.path == "/slow":
            time.sleep(int(query.get("ms", ["100"])[0]) / 1000)
            self._reply(200, b"slow\n")
        elif url.path == "/fail":
            self._reply(500, b"failed\n")
        elif url.path == "/big":
            self._reply(200, b"x" * int(query.get("bytes", ["1000"])[0]))
        elif url.path == "/headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self._reply(200, body, "application/json")
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("trailer", "x-checksum")
            self.send_header("x-backend", app.name)
            self.end_headers()
            if self.command == "HEAD":
                return
            for i in range(int(query.get("n", ["3"])[0])):
                data = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\nx-checksum: done\r\n\r\n")
        else:
            self._reply(200, f"hello from {app.name}\n".encode())

    def do_POST(self) -> None:
        self._count()
        digest = hashlib.sha256()
        length = 0
        for data in self._read_body():
            digest.update(data)
            length += len(data)
        body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
        self._reply(200, body, "application/json")

    do_PUT = do_POST


class HttpApp:
    """An HTTP/1.1 app in a thread. ``status`` != 200 makes every GET fail with it;
    ``delay_s`` delays every GET (a slow backend)."""

    def __init__(self, name: str, *, status: int = 200, delay_s: float = 0.0) -> None:
        self.name = name
        self.port = free_port()
        self.status = status
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.paths: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpApp:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo everything; on the client's EOF, finish sending and shut down writing."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(SOCKET_TIMEOUT)
        server: _EchoServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.connections += 1
        while True:
            data = sock.recv(READ_CHUNK)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        with server.lock:
            server.half_closed += 1


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # As _Server's: socketserver's default backlog of 5 drops connections under load
    # while the accepting thread waits for the GIL (a proxy's inbound connect timeout
    # is 100 ms).
    request_queue_size = 128

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.half_closed = 0
        super().__init__((LOOPBACK, port), _EchoHandler)


class TcpEcho:
    def __init__(self) -> None:
        self.port = free_port()
        self.server = _EchoServer(self.port)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebSocketEcho:
    """A WebSocket echo server (the websockets library) in a thread."""

    def __init__(self) -> None:
        from websockets.sync.server import ServerConnection, serve

        def echo(connection: ServerConnection) -> None:
            with contextlib.suppress(Exception):
                for message in connection:
                    connection.send(message)

        self.port = free_port()
        self.server = serve(echo, LOOPBACK, self.port)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
