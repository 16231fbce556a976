"""Certificates issued per second by one identity service replica.

Starts an embedded NATS and one ``shoal.services.identity`` process (pinned alone to
core 1 when there are two cores or more, the load generator on core 0), then keeps
``--concurrency`` certify requests in flight from a proxy-role connection for
``--duration`` seconds after a warm-up, each a fresh CSR and join token check, and prints
the rate and the latency percentiles. Every request must be issued; a refusal aborts.

    python -m bench.identity_certify [--duration 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.kernel import identity_store as store
from shoal.kernel import pki, tokens
from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusSettings, bus_environment, generate_credentials
from shoal.kernel.natsd import EmbeddedNats
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.identity import CertifyIssued, CertifyRefused, CertifyReply, CertifyRequest

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_SECONDS = 20.0
REQUEST_TIMEOUT_SECONDS = 5.0
IDENTITIES = 64  # distinct workloads (keys, CSRs, tokens) cycled through
REPLY: Decoder[CertifyIssued | CertifyRefused] = Decoder(CertifyReply, names.IDENTITY_CERTIFY)


def _requests(identity_dir: Path) -> list[bytes]:
    scheme = store.read_settings(identity_dir).scheme
    key = store.load_signing_key(identity_dir)
    out = []
    for n in range(IDENTITIES):
        identity = scheme.identity(f"bench-{n}", "bench")
        out.append(encode(CertifyRequest(
            identity=identity, token=tokens.mint(key, "bench", f"bench-{n}", 3600, time.time()),
            csr_pem=pki.build_csr(pki.generate_key(), identity))))
    return out


async def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"identity service exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            line = await reader.readline()
            writer.close()
            if b" 200 " in line:
                return
        await asyncio.sleep(0.1)
    raise SystemExit("identity service not ready in time")


async def _load(settings: BusSettings, requests: list[bytes], concurrency: int,
                warmup: float, duration: float) -> tuple[int, float, list[float]]:
    nc = await connect(settings, "bench-identity", allow_reconnect=False)
    latencies: list[float] = []
    counted = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup
    end = measure_from + duration

    async def worker(offset: int) -> None:
        nonlocal counted
        n = offset
        while loop.time() < end:
            sent = loop.time()
            msg = await nc.request(names.IDENTITY_CERTIFY, requests[n % len(requests)],
                                   timeout=REQUEST_TIMEOUT_SECONDS)
            done = loop.time()
            reply = REPLY.decode(msg.data)
            if not isinstance(reply, CertifyIssued):
                raise SystemExit(f"refused: {reply.code}: {reply.reason}")
            if measure_from <= sent and done <= end:
                counted += 1
                latencies.append(done - sent)
            n += concurrency

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await nc.close()
    return counted, duration, latencies


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL)


def _pin_self(core: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {core})


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-identity-"))
    server = EmbeddedNats(state_dir=work, credentials=generate_credentials())
    proc: subprocess.Popen[bytes] | None = None
    try:
        url = server.start()
        operator = server.credentials["operator"]
        nc = await connect(BusSettings(url=url, user=operator.user, password=operator.password),
                           "bench-setup", allow_reconnect=False)
        await ensure_buckets(nc.jetstream())
        await nc.close()
        identity_dir = store.default_identity_dir(work)
        store.init_identity(identity_dir, store.default_anchor_dir(work),
                            store.IdentitySettings(), 365, 365, dt.datetime.now(dt.UTC))
        controller = server.credentials["controller"]
        env = {**os.environ, **bus_environment(BusSettings(
            url=url, user=controller.user, password=controller.password, role="controller"))}
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") and not args.no_pin
        argv = [sys.executable, "-m", "shoal.services.identity", "--identity-dir",
                str(identity_dir), "--health-port", str(port), "--log-level", "warning"]
        if pinned:
            argv = ["taskset", "-c", "1", *argv]
            _pin_self(0)
        proc = _spawn(argv, env)
        await _wait_ready(port, proc)
        requests = _requests(identity_dir)
        proxy = server.credentials["proxy"]
        count, seconds, latencies = await _load(
            BusSettings(url=url, user=proxy.user, password=proxy.password), requests,
            args.concurrency, args.warmup, args.duration)
        latencies.sort()
        p50 = statistics.median(latencies) * 1000 if latencies else 0.0
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0
        where = "service pinned to core 1, load on core 0" if pinned else "unpinned"
        print(f"identity certify, 1 replica ({where}), concurrency {args.concurrency}, "
              f"{seconds:.0f} s after {args.warmup:.0f} s warm-up:")
        print(f"  {count / seconds:,.0f} certificates/s  ({count} issued)  "
              f"latency p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.identity_certify",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    args = parser.parse_args()
    if not (0 < args.duration <= 600 and 0 <= args.warmup <= 60 and
            0 < args.concurrency <= 1024):
        parser.error("duration must be in (0, 600], warmup in [0, 60], concurrency in "
                     "(0, 1024]")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
