"""The identity service and the ``shoal identity`` commands as real processes: two
replicas in one queue group (one killed, the other still answers), the CLI's init /
token / show / rotate commands, and ``shoal up`` creating identity material and running
the identity service with no extra step."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.kernel import identity_store as store
from shoal.kernel import pki
from shoal.kernel.bus import connect
from shoal.kernel.config import BusSettings, read_bus_file
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.events import CertificateIssued, ControlEvent
from shoal.schemas.identity import CertifyIssued, CertifyRefused, CertifyReply, CertifyRequest

from .conftest import REPO, Bus
from .identity_support import SCHEME, clear_trust_bundle, free_port, join_token, make_material

pytestmark = pytest.mark.usefixtures("buckets")

WEB = SCHEME.identity("web", "emojivoto")
READY_TIMEOUT_SECONDS = 20.0
CLI_TIMEOUT_SECONDS = 30.0
REPLY: Decoder[CertifyIssued | CertifyRefused] = Decoder(CertifyReply, names.IDENTITY_CERTIFY)
EVENT: Decoder[ControlEvent] = Decoder(ControlEvent, names.EVENTS_ALL)


def shoal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real program (what an operator types)."""
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=REPO,
                          env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_SECONDS, check=False)


def shoal_in_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The same command line through the CLI's own entry, in this process: the
    interpreter start (2 s here) paid once per test instead of once per command."""
    from typer.testing import CliRunner

    from shoal.cli.main import app

    result = CliRunner(env=env).invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout,
                                       result.stderr)


def spawn(argv: list[str], env: dict[str, str], capture: bool = False) -> subprocess.Popen[str]:
    """Start a child (returns at once; its output is read with to_thread)."""
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, text=True,
                            start_new_session=True)


async def wait_http_ready(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"service exited with {proc.returncode}"
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("identity replica not ready in time")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_two_replicas_share_the_load_and_one_survives_the_other(
        bus: Bus, tmp_path: Path, operator: Client,
        processes: list[subprocess.Popen[str]]) -> None:
    await clear_trust_bundle(bus)
    identity_dir, _ = make_material(tmp_path)
    ports = [free_port(), free_port()]
    for port in ports:
        processes.append(spawn(
            [sys.executable, "-m", "shoal.services.identity", "--identity-dir",
             str(identity_dir), "--health-port", str(port), "--log-level", "warning"],
            env=bus.env("controller")))
    for port, proc in zip(ports, processes, strict=True):
        await wait_http_ready(port, proc)
    sources: list[str] = []

    async def on_event(msg: Msg) -> None:
        event = EVENT.decode(msg.data)
        if isinstance(event, CertificateIssued):
            sources.append(event.source)

    await operator.subscribe(names.event_subject("identity"), cb=on_event)
    token = join_token(identity_dir, "emojivoto", "web")
    request = encode(CertifyRequest(identity=WEB, token=token,
                                    csr_pem=pki.build_csr(pki.generate_key(), WEB)))
    proxy = await bus.client("proxy")

    async def certify_many(count: int) -> list[CertifyIssued | CertifyRefused]:
        replies = []
        for _ in range(count):
            msg = await proxy.request(names.IDENTITY_CERTIFY, request, timeout=5.0)
            replies.append(REPLY.decode(msg.data))
        return replies

    try:
        first = await certify_many(30)
        async with asyncio.timeout(3):
            while len(sources) < 30:
                await asyncio.sleep(0.02)
        pids = {f"identity-{proc.pid}" for proc in processes}
        assert set(sources) == pids  # the queue group spread the requests over both
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(5)
        sources.clear()
        second = await certify_many(30)
    finally:
        await proxy.close()
    assert all(isinstance(r, CertifyIssued) for r in first + second)
    async with asyncio.timeout(3):
        while len(sources) < 30:
            await asyncio.sleep(0.02)
    assert set(sources) == {f"identity-{processes[1].pid}"}


def test_identity_commands(bus: Bus, tmp_path: Path) -> None:
    asyncio.run(clear_trust_bundle(bus))
    env = bus.env("operator")
    ident, anchor = tmp_path / "identity", tmp_path / "anchor"
    dirs = ["--dir", str(ident), "--anchor-dir", str(anchor)]
    created = shoal("identity", "init", *dirs, "--anchor-days", "30", "--issuer-days", "10",
                    "--trust-domain", "example.org", env=env)
    assert created.returncode == 0, created.stderr
    assert "CN=root.identity.shoal.example.org" in created.stdout
    assert (anchor / "anchor.key").stat().st_mode & 0o777 == 0o600
    assert not (ident / "anchor.key").exists()  # the service's directory has no anchor key
    issuer = pki.certs_from_pem((ident / store.ISSUER_CERT_FILE).read_bytes())[0]
    assert 9.9 < (issuer.not_valid_after_utc - issuer.not_valid_before_utc).days + 1 <= 11
    again = shoal_in_process("identity", "init", *dirs, env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    token = shoal_in_process("identity", "token", "--dir", str(ident), "-n", "emojivoto",
                             "-s", "web", "--ttl", "2h", env=env)
    assert token.returncode == 0 and token.stdout.startswith("shoal-jt1.")
    assert "web.emojivoto.serviceaccount.identity.shoal.example.org" in token.stderr
    for bad in (["-n", "Not_A_Label", "-s", "web"], ["-n", "a", "-s", "b", "--ttl", "soon"]):
        refused = shoal_in_process("identity", "token", "--dir", str(ident), *bad, env=env)
        assert refused.returncode == 1 and refused.stderr.startswith("error:"), refused.stderr
        assert "Traceback" not in refused.stderr

    # show: no bundle on the bus yet, then the one rotate-anchor publishes.
    empty = shoal_in_process("identity", "show", "--dir", str(ident), env=env)
    assert empty.returncode == 0 and "none in shoal_trust" in empty.stdout
    added = shoal_in_process("identity", "rotate-anchor", "--step", "add", *dirs, env=env)
    assert added.returncode == 0, added.stderr
    assert "published to shoal_trust" in added.stdout
    shown = shoal_in_process("identity", "show", "--dir", str(ident), env=env)
    assert "2 anchor(s), trust domain example.org" in shown.stdout, shown.stdout
    status = shoal_in_process("identity", "rotate-anchor", *dirs, env=env)
    assert "next: --step issuer" in status.stdout
    early = shoal_in_process("identity", "rotate-anchor", "--step", "remove", *dirs, env=env)
    assert early.returncode == 1 and "after --step issuer" in early.stderr
    moved = shoal_in_process("identity", "rotate-anchor", "--step", "issuer", *dirs, env=env)
    assert moved.returncode == 0 and "step 2/3" in moved.stdout, moved.stderr
    rotated = shoal_in_process("identity", "rotate-issuer", *dirs, env=env)
    assert rotated.returncode == 0, rotated.stderr
    new_anchor = store.load_anchor(anchor, next_anchor=True).cert
    issuer = pki.certs_from_pem((ident / store.ISSUER_CERT_FILE).read_bytes())[0]
    assert pki.is_signed_by(issuer, new_anchor)  # rotate-issuer follows the rotation
    removed = shoal_in_process("identity", "rotate-anchor", "--step", "remove", "--force",
                               *dirs, env=env)
    assert removed.returncode == 0 and "3/3" in removed.stdout, removed.stderr
    assert [pki.fingerprint(a) for a in store.read_bundle(ident)] == [
        pki.fingerprint(new_anchor)]

    # show --cert: a leaf from this hierarchy, described and verified.
    import datetime as dt

    from shoal.services.identity.authority import Authority

    material = store.load_service_material(ident, dt.datetime.now(dt.UTC))
    name = material.settings.scheme.identity("web", "emojivoto")
    reply = Authority(material).issue(name, pki.build_csr(pki.generate_key(), name),
                                      dt.datetime.now(dt.UTC))
    assert isinstance(reply, CertifyIssued)
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_text(reply.leaf_pem + "".join(reply.intermediates_pem))
    described = shoal_in_process("identity", "show", "--dir", str(ident), "--cert",
                                 str(leaf_file), env=env)
    assert described.returncode == 0, described.stdout + described.stderr
    assert "1 anchor(s)" in described.stdout
    assert f"identity   {name}" in described.stdout
    assert f"serial     {reply.serial}" in described.stdout
    assert "verifies   yes" in described.stdout
    missing = shoal_in_process("identity", "show", "--cert", str(tmp_path / "nope.pem"),
                               env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


async def test_shoal_up_runs_identity_with_no_extra_step(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    up = spawn([sys.executable, "-m", "shoal.cli", "up", "--state-dir", str(state)],
               env={**env, "PYTHONUNBUFFERED": "1"}, capture=True)
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            line = await asyncio.to_thread(up.stdout.readline)
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        assert "new trust anchor and issuer" in text, text
        assert any(line.startswith("identity") and "ready" in line and "not ready" not in line
                   for line in lines), text
        token = shoal("identity", "token", "--state-dir", str(state), "-n", "emojivoto",
                      "-s", "web", env=env)
        assert token.returncode == 0, token.stderr
        bus = read_bus_file(state)
        creds = bus.credentials["proxy"]
        nc = await connect(BusSettings(url=bus.url, user=creds.user, password=creds.password),
                           "test-up-proxy", allow_reconnect=False)
        try:
            msg = await nc.request(names.IDENTITY_CERTIFY, encode(CertifyRequest(
                identity=WEB, token=token.stdout.strip(),
                csr_pem=pki.build_csr(pki.generate_key(), WEB))), timeout=5.0)
        finally:
            await nc.close()
        assert isinstance(REPLY.decode(msg.data), CertifyIssued)
        shown = await asyncio.to_thread(shoal_in_process, "identity", "show", "--state-dir",
                                        str(state), env=env)
        assert "1 anchor(s), trust domain cluster.local" in shown.stdout, shown
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert up.returncode == 0
