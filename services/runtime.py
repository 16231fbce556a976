"""The runtime every control-plane service uses: connect as the controller role,
reconnect forever, serve request handlers as a ``nats.micro`` service in a queue group,
turn failures into typed error replies, expose health, and stop gracefully.

Concurrency contract: nats-py runs one subscription's callbacks one at a time, in order,
so a handler never races itself within a replica; replicas race each other only through
KV, where writers use compare-and-set. Graceful stop drains every subscription (no new
requests, pending ones finished), waits for background tasks, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusSettings
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.errors import HTTP_STATUS_OF, ErrorCode, ErrorReply

log = logging.getLogger("shoal.service")

DRAIN_TIMEOUT_SECONDS = 10.0  # in-flight requests get this long to finish on SIGTERM
TASK_STOP_TIMEOUT_SECONDS = 5.0
HEALTH_READ_TIMEOUT_SECONDS = 2.0

Req = TypeVar("Req")


class ServiceFailure(Exception):
    """A request failed in a way the caller should see; ``code`` says whose fault."""

    code: ErrorCode = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceFailure):
    code = "bad_request"


class Forbidden(ServiceFailure):
    code = "forbidden"


class Unavailable(ServiceFailure):
    code = "unavailable"


async def respond_failure(request: Request, code: ErrorCode, message: str) -> None:
    body = encode(ErrorReply(code=code, message=message, subject=request.subject))
    await request.respond_error(str(HTTP_STATUS_OF[code]), message, data=body)


Handler = Callable[[Req], Awaitable[msgspec.Struct]]


@dataclass(frozen=True)
class RequestEndpoint(Generic[Req]):
    name: str
    subject: str
    decoder: Decoder[Req]
    handler: Handler[Req]
    queue_group: str


@dataclass
class ServiceContext:
    """Live handles a service's logic gets once connected."""

    nc: Client
    js: JetStreamContext
    name: str
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


SetupFn = Callable[[ServiceContext], Awaitable[None]]
TaskFn = Callable[[ServiceContext], Coroutine[Any, Any, None]]
MessageFn = Callable[[Msg], Awaitable[None]]


class ServiceRuntime:
    """Wire handlers and tasks, then ``await run()`` until SIGTERM/SIGINT or ``stop()``."""

    def __init__(
        self,
        name: str,
        version: str,
        settings: BusSettings,
        *,
        description: str = "",
        health_port: int | None = None,
        create_buckets: bool = True,
        handle_signals: bool = True,
    ) -> None:
        self.name = name
        self.version = version
        self.settings = settings
        self.description = description
        self.health_port = health_port
        self.create_buckets = create_buckets
        self.handle_signals = handle_signals
        self._endpoints: list[RequestEndpoint[Any]] = []
        self._subscriptions: list[tuple[str, str | None, MessageFn]] = []
        self._tasks: list[TaskFn] = []
        self._setup: list[SetupFn] = []
        self._stop = asyncio.Event()
        self._ready = False
        self.context: ServiceContext | None = None
        self.micro: Service | None = None
        self.started_at = time.time()

    def add_request_handler(
        self, name: str, subject: str, request_type: Any, handler: Handler[Any],
        queue_group: str,
    ) -> None:
        decoder: Decoder[Any] = Decoder(request_type, subject)
        self._endpoints.append(RequestEndpoint(name, subject, decoder, handler, queue_group))

    def add_subscription(self, subject: str, callback: MessageFn,
                         queue_group: str | None = None) -> None:
        """A plain subscription for streams (registrations, reports): no reply."""
        self._subscriptions.append((subject, queue_group, callback))

    def add_task(self, task: TaskFn) -> None:
        """A background loop; it should return when ``context.stopping`` is set."""
        self._tasks.append(task)

    def on_setup(self, setup: SetupFn) -> None:
        self._setup.append(setup)

    def stop(self) -> None:
        self._stop.set()

    @property
    def ready(self) -> bool:
        return self._ready

    def _wrap(self, endpoint: RequestEndpoint[Any]) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            try:
                message = endpoint.decoder.decode(request.data, request.subject)
            except WireDecodeError as error:
                log.warning("%s: %s", self.name, error)
                await respond_failure(request, "bad_request", str(error))
                return
            try:
                reply = await endpoint.handler(message)
            except ServiceFailure as failure:
                await respond_failure(request, failure.code, failure.message)
                return
            except Exception as error:  # a bug: log it whole, tell the caller little
                log.exception("%s: handler %s failed", self.name, endpoint.name)
                message = f"internal error: {type(error).__name__}"
                await respond_failure(request, "internal", message)
                return
            await request.respond(encode(reply))

        return handle

    def _wrap_message(self, subject: str, callback: MessageFn) -> MessageFn:
        async def handle(msg: Msg) -> None:
            try:
                await callback(msg)
            except WireDecodeError as error:
                log.warning("%s: dropped: %s", self.name, error)
            except Exception:
                log.exception("%s: message on %s failed", self.name, subject)

        return handle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._stop.set)
        health = await self._start_health()
        nc = await connect(self.settings, f"shoal-{self.name}")
        try:
            js = nc.jetstream()
            if self.create_buckets:
                await ensure_buckets(js)
            ctx = ServiceContext(nc=nc, js=js, name=self.name)
            self.context = ctx
            for setup in self._setup:
                await setup(ctx)
            for subject, queue, callback in self._subscriptions:
                await nc.subscribe(subject, queue=queue or "",
                                   cb=self._wrap_message(subject, callback))
            if self._endpoints:
                self.micro = await add_service(
                    nc, ServiceConfig(name=f"shoal-{self.name}", version=self.version,
                                      description=self.description or None))
                for endpoint in self._endpoints:
                    await self.micro.add_endpoint(EndpointConfig(
                        name=endpoint.name, subject=endpoint.subject,
                        queue_group=endpoint.queue_group, handler=self._wrap(endpoint)))
            tasks = [asyncio.create_task(task(ctx)) for task in self._tasks]
            self._ready = True
            log.info("%s %s ready on %s", self.name, self.version, self.settings.redacted())
            await self._stop.wait()
            log.info("%s stopping: draining in-flight requests", self.name)
            self._ready = False
            ctx.stopping.set()
            await self._finish_tasks(tasks)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_SECONDS)
            if not nc.is_closed:
                await nc.close()
            if health is not None:
                health.close()
            log.info("%s stopped", self.name)

    async def _finish_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_SECONDS)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s task failed: %r", self.name, task.exception())

    async def _start_health(self) -> asyncio.Server | None:
        """``GET /live`` (the process runs) and ``GET /ready`` (connected and serving)."""
        if self.health_port is None:
            return None

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), HEALTH_READ_TIMEOUT_SECONDS)
                path = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
                connected = self.context is not None and self.context.nc.is_connected
                if path == b"/live":
                    status, body = b"200 OK", b"live\n"
                elif path == b"/ready" and self._ready and connected:
                    status, body = b"200 OK", b"ready\n"
                elif path == b"/ready":
                    status, body = b"503 Service Unavailable", b"not ready\n"
                else:
                    status, body = b"404 Not Found", b"not found\n"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: " + str(len(body)).encode() +
                             b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(serve, "127.0.0.1", self.health_port)
