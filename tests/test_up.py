"""`shoal up` as a user runs it: it starts the bus and the control plane, other commands
find the bus through the state directory, Ctrl-C stops everything with no orphans, and a
restart keeps the buckets."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats

from shoal.kernel.config import read_bus_file
from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.policy import PolicyApplyRequest

from .services import REPO, wait_for_log


def _children(pid: int) -> set[int]:
    """Every descendant of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _start(state: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", "up", "--state-dir", str(state)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def _apply(state: Path) -> bytes:
    bus = read_bus_file(state)
    creds = bus.credentials["operator"]
    nc = await nats.connect(bus.url, user=creds.user, password=creds.password)
    try:
        text = "namespace: up\nservice: web\n"
        msg = await nc.request(names.POLICY_APPLY, encode(PolicyApplyRequest(text=text)),
                               timeout=5)
        kv = await nc.jetstream().key_value(names.BUCKET_POLICY)
        entry = await kv.get("up.web")
        assert entry.value
        return msg.data
    finally:
        await nc.close()


async def test_up_serves_then_stops_cleanly_and_keeps_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = _start(state)
    try:
        output = await wait_for_log(proc, b"Ctrl-C stops everything", timeout=30)
        assert b"destination" in output and b"policy" in output
        assert output.count(b" ready, health") >= 2, output.decode()
        assert (state / "bus.json").stat().st_mode & 0o077 == 0  # credentials: owner only
        descendants = _children(proc.pid)
        assert len(descendants) >= 3  # nats-server + the services
        first = await _apply(state)
        assert b'"version":1' in first

        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
        assert not [pid for pid in descendants if _alive(pid)], "orphans left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    again = _start(state)
    try:
        await wait_for_log(again, b"Ctrl-C stops everything", timeout=30)
        second = await _apply(state)
        assert b'"version":2' in second  # the policy bucket survived the restart
    finally:
        again.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(again.wait, 30) == 0


async def test_killed_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    proc = _start(tmp_path / "state")
    try:
        await wait_for_log(proc, b"Ctrl-C stops everything", timeout=30)
        descendants = _children(proc.pid)
        proc.kill()  # SIGKILL: no chance to clean up; the children must die with it
        proc.wait()
        async with asyncio.timeout(15):
            while [pid for pid in descendants if _alive(pid)]:
                await asyncio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
