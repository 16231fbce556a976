"""The service runtime with real processes: replicas share a queue group and one killed
mid-run leaves the other answering; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import signal

from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.policy import PolicyAccepted, PolicyApplyReply, PolicyApplyRequest

from .conftest import Bus
from .services import start_process, wait_for_log

DOC = "namespace: replicas\nservice: web\n"


async def _apply_ok(nc: Client) -> bool:
    try:
        msg = await nc.request(names.POLICY_APPLY, encode(PolicyApplyRequest(text=DOC)),
                               timeout=1.0)
    except Exception:
        return False
    reply: PolicyApplyReply = Decoder(PolicyApplyReply, "").decode(msg.data)
    return isinstance(reply, PolicyAccepted)


async def test_killed_replica_leaves_the_other_answering(bus: Bus, operator: Client) -> None:
    first = start_process(bus, "policy")
    second = start_process(bus, "policy")
    try:
        await wait_for_log(first, b"ready on")
        await wait_for_log(second, b"ready on")
        results = [await _apply_ok(operator) for _ in range(10)]
        assert all(results)
        first.kill()  # abrupt: no drain, no goodbye
        first.wait(5)
        # NATS notices the dead connection at once (socket closed); every request after
        # the kill must be answered by the survivor.
        results = [await _apply_ok(operator) for _ in range(20)]
        assert all(results), results
        assert second.poll() is None
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


async def test_sigterm_drains_and_exits_zero(bus: Bus, operator: Client) -> None:
    proc = start_process(bus, "destination")
    try:
        await wait_for_log(proc, b"ready on")
        proc.send_signal(signal.SIGTERM)
        output = await wait_for_log(proc, b"stopped", timeout=15)
        assert b"draining" in output
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
