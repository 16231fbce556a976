"""Helpers that run control-plane services for tests: in-process (the real runtime and
logic on the test's event loop) or as real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from shoal.services.runtime import ServiceRuntime

from .conftest import Bus

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 15.0


@contextlib.asynccontextmanager
async def in_process(bus: Bus, name: str,
                     install: Callable[[ServiceRuntime], object]) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime(name, "0.1.0", bus.settings("controller"), handle_signals=False)
    install(runtime)
    task = asyncio.create_task(runtime.run())
    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
        while not runtime.ready:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    try:
        yield runtime
    finally:
        runtime.stop()
        await asyncio.wait_for(task, READY_TIMEOUT_SECONDS)


def start_process(bus: Bus, service: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", f"shoal.services.{service}", *args], cwd=REPO,
        env=bus.env("controller"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)


async def wait_for_log(proc: subprocess.Popen[bytes], fragment: bytes,
                       timeout: float = READY_TIMEOUT_SECONDS) -> bytes:
    """Read the child's output until `fragment` appears (in a thread: pipes block)."""
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> bytes:
        seen = b""
        for line in stdout:
            seen += line
            if fragment in line:
                return seen
        raise AssertionError(f"process exited before {fragment!r}:\n{seen.decode()}")

    return await asyncio.wait_for(asyncio.to_thread(read), timeout)
