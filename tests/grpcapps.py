"""Backends for the HTTP/2 and gRPC proxy tests, none built on the proxy's own code:
gRPC servers from grpcio (generic handlers over raw bytes, so no generated code), and
nginx speaking h2c with prior knowledge for curl and h2load.

gRPC methods of service ``t.Echo`` (every response carries ``x-backend`` metadata):
  Unary          echo the request            Fail      abort with UNKNOWN
  Sleep          sleep int(request) ms, echo ServerStream  int(request) messages, each
                                                   after ``stream_gap`` seconds
  ClientStream   total length of the stream  Bidi      echo each message
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from .apps import LOOPBACK, free_port

SERVICE = "t.Echo"
# Messages up to 64 MiB both ways (the 10 MB test; grpcio's default cap is 4 MB).
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
# Handler threads: the balancing test runs ~70 slow calls per backend at once.
HANDLER_THREADS = 100
STOP_GRACE_SECONDS = 1.0
NGINX_START_TIMEOUT_SECONDS = 10.0


class GrpcBackend:
    """A grpcio server on a free loopback port, counting the calls it served."""

    def __init__(self, name: str, *, options: list[tuple[str, Any]] | None = None,
                 stream_gap: float = 0.0) -> None:
        self.name = name
        # Held until start(): a port chosen now but bound later could be handed to the
        # proxies started in between (free_port only knows what is bound).
        self._reservation = socket.socket()
        self._reservation.bind((LOOPBACK, 0))
        self.port = int(self._reservation.getsockname()[1])
        self.stream_gap = stream_gap
        self.calls: Counter[str] = Counter()
        self.metadata_keys: set[str] = set()  # every request metadata key the app saw
        self.lock = threading.Lock()
        self.options = options or []
        self.server: grpc.Server | None = None

    def start(self) -> GrpcBackend:
        """Start serving. Start child processes before this: forking while gRPC's threads
        run can break the child between fork and exec."""
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(HANDLER_THREADS),
                                  handlers=[handler],
                                  options=[*MESSAGE_OPTIONS, *self.options])
        self._reservation.close()
        if self.server.add_insecure_port(f"{LOOPBACK}:{self.port}") != self.port:
            raise RuntimeError(f"{self.name}: cannot bind {LOOPBACK}:{self.port}")
        self.server.start()
        return self

    def stop(self) -> None:
        self._reservation.close()
        if self.server is not None:
            self.server.stop(STOP_GRACE_SECONDS).wait()

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            self.metadata_keys.update(key for key, _ in context.invocation_metadata())
        context.send_initial_metadata((("x-backend", self.name),))

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Unary", context)
        return request

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Fail", context)
        context.abort(grpc.StatusCode.UNKNOWN, "doughnut is not a vote")
        raise AssertionError("unreachable")

    def _sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Sleep", context)
        time.sleep(int(request) / 1000.0)
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("ServerStream", context)
        for index in range(int(request)):
            if self.stream_gap:
                time.sleep(self.stream_gap)
            yield b"message %d" % index

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("ClientStream", context)
        return b"%d" % sum(len(message) for message in requests)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Bidi", context)
        yield from requests


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


class NginxH2c:
    """nginx answering h2c with prior knowledge: ``GET /`` -> "hello from <name>"."""

    def __init__(self, name: str, workdir: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (scripts/system-packages.sh)")
        self.binary = binary
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    keepalive_requests 1000000;
    server {{
        listen {LOOPBACK}:{self.port} http2;
        location / {{
            add_header x-backend {name};
            return 200 "hello from {name}\\n";
        }}
    }}
}}
""")

    def start(self) -> NginxH2c:
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-c", str(self.conf), "-e",
             str(self.workdir / "error.log")], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + NGINX_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["curl", "-s", "--max-time", "2", "--http2-prior-knowledge",
                 f"http://{LOOPBACK}:{self.port}/"], capture_output=True, check=False)
            if result.returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
