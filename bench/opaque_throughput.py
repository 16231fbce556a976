"""Throughput of opaque TCP forwarding (shoal.proxy.opaque.forward_opaque) against a direct
connection, on loopback.

A source thread sends N bytes as fast as it can and shuts down its write side; a sink
thread counts them until EOF; the figure is bytes / (time from the first send to the
sink's EOF). The forwarder runs in its own process on uvloop (as the proxy does), so the
endpoints' Python does not share its interpreter; its CPU time is read from /proc.

    python -m bench.opaque_throughput                # 1 GiB: direct, splice, copy
    python -m bench.opaque_throughput --bytes 256M --pipe-bytes 65536 --modes splice
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
SEND_CHUNK = 1 << 20  # one sendall per MiB from one preallocated buffer
RECV_CHUNK = 1 << 20
START_TIMEOUT_SECONDS = 10.0  # the forwarder process prints its port within this
RUN_TIMEOUT_SECONDS = 300.0  # one transfer; 1 GiB at a pessimistic 10 MB/s is ~100 s
REPO = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


# -- the forwarder process -------------------------------------------------------------------

async def serve_forwarder(upstream_port: int, splice: bool) -> None:
    from shoal.proxy.accept import connect_tcp
    from shoal.proxy.opaque import forward_opaque

    loop = asyncio.get_running_loop()
    server = socket.create_server((LOOPBACK, 0))
    server.setblocking(False)
    print(server.getsockname()[1], flush=True)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(server)
        client.setblocking(False)
        upstream = await connect_tcp(loop, LOOPBACK, upstream_port, 1.0)
        task = loop.create_task(forward_opaque(client, upstream, b"", None, splice=splice))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def forwarder_main(args: argparse.Namespace) -> None:
    import uvloop

    if args.pipe_bytes:
        import shoal.proxy.opaque as opaque

        setattr(opaque, "PIPE_BYTES", args.pipe_bytes)  # noqa: B010 (a Final, on purpose)
        setattr(opaque, "COPY_BUFFER_BYTES", args.pipe_bytes)  # noqa: B010
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_forwarder(args.upstream, args.forwarder == "splice"))


# -- the endpoints ---------------------------------------------------------------------------

class Sink:
    """Counts the bytes of the first connection that brings any, until its EOF (empty
    connections, such as readiness probes, are skipped)."""

    def __init__(self) -> None:
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = int(self.server.getsockname()[1])
        self.received = 0
        self.done_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.server.settimeout(RUN_TIMEOUT_SECONDS)
        buffer = bytearray(RECV_CHUNK)
        with self.server:
            while not self.received:
                conn, _ = self.server.accept()
                conn.settimeout(RUN_TIMEOUT_SECONDS)
                with conn:
                    while n := conn.recv_into(buffer):
                        self.received += n
        self.done_at = time.perf_counter()


def transfer(port: int, size: int, sink: Sink) -> float:
    """Send ``size`` bytes to ``port``; seconds until the sink saw EOF."""
    block = os.urandom(SEND_CHUNK)
    with socket.create_connection((LOOPBACK, port), timeout=RUN_TIMEOUT_SECONDS) as sock:
        started = time.perf_counter()
        sent = 0
        view = memoryview(block)
        while sent < size:
            chunk = view[: min(SEND_CHUNK, size - sent)]
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        sink.thread.join(RUN_TIMEOUT_SECONDS)
    if sink.received != size:
        raise SystemExit(f"sink received {sink.received} of {size} bytes")
    return sink.done_at - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.create_server((LOOPBACK, 0)) as sock:
        return int(sock.getsockname()[1])


def haproxy_command(upstream_port: int, directory: str) -> tuple[list[str], int]:
    """HAProxy (Debian's) in TCP mode, one thread, splice on: a C reference point."""
    port = free_port()
    config = Path(directory) / "haproxy.cfg"
    config.write_text(f"""global
    nbthread 1
defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    option splice-auto
listen opaque
    bind {LOOPBACK}:{port}
    server sink {LOOPBACK}:{upstream_port}
""")
    return ["haproxy", "-db", "-f", str(config)], port


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def run_haproxy(size: int) -> tuple[float, float]:
    import tempfile

    sink = Sink()
    with tempfile.TemporaryDirectory() as directory:
        command, port = haproxy_command(sink.port, directory)
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            cpu_before = cpu_seconds(child.pid)
            elapsed = transfer(port, size, sink)
            return size / elapsed / 1e6, cpu_seconds(child.pid) - cpu_before
        finally:
            child.terminate()
            child.wait(START_TIMEOUT_SECONDS)


def run_mode(mode: str, size: int, pipe_bytes: int) -> tuple[float, float]:
    """(MB/s, forwarder CPU seconds) for one mode."""
    if mode == "haproxy":
        return run_haproxy(size)
    sink = Sink()
    if mode == "direct":
        return size / transfer(sink.port, size, sink) / 1e6, 0.0
    command = [sys.executable, "-m", "bench.opaque_throughput", "--forwarder", mode,
               "--upstream", str(sink.port), "--pipe-bytes", str(pipe_bytes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready = threading.Event()
        line: list[str] = []

        def read_port() -> None:
            line.append(child.stdout.readline())  # type: ignore[union-attr]
            ready.set()

        threading.Thread(target=read_port, daemon=True).start()
        if not ready.wait(START_TIMEOUT_SECONDS) or not line[0].strip():
            raise SystemExit(f"the {mode} forwarder did not start")
        port = int(line[0])
        cpu_before = cpu_seconds(child.pid)
        elapsed = transfer(port, size, sink)
        cpu = cpu_seconds(child.pid) - cpu_before
        return size / elapsed / 1e6, cpu
    finally:
        child.terminate()
        child.wait(START_TIMEOUT_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", default="1G", type=parse_size, help="per transfer (1G)")
    parser.add_argument("--modes", default="direct,splice,copy",
                        help="comma-separated: direct, splice, copy, haproxy")
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfers per mode; the median is printed (3)")
    parser.add_argument("--pipe-bytes", type=parse_size, default=0,
                        help="override PIPE_BYTES / COPY_BUFFER_BYTES in the forwarder")
    parser.add_argument("--forwarder", choices=["splice", "copy"], help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forwarder:
        forwarder_main(args)
        return
    size = args.bytes
    pipe = f", pipe {args.pipe_bytes} B" if args.pipe_bytes else ""
    print(f"opaque TCP throughput, {size / (1 << 20):.0f} MiB per transfer, median of "
          f"{max(1, args.repeat)}, loopback, {os.cpu_count()} CPUs{pipe}")
    results: dict[str, float] = {}
    for mode in args.modes.split(","):
        runs = sorted(run_mode(mode.strip(), size, args.pipe_bytes)
                      for _ in range(max(1, args.repeat)))
        rate = runs[len(runs) // 2][0]
        cpu = sorted(cpu for _, cpu in runs)[len(runs) // 2]
        results[mode] = rate
        ratio = f"  {rate / results['direct']:.2f}x direct" if "direct" in results else ""
        cpu_text = f"  forwarder CPU {cpu:.2f} s ({cpu / (size / 1e9):.2f} s/GB)" if cpu else ""
        print(f"{mode:>7}: {rate:8.0f} MB/s{ratio}{cpu_text}", flush=True)


if __name__ == "__main__":
    main()
