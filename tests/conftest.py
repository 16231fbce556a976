"""Shared fixtures: one real nats-server with JetStream per test session, started through
the same module `shoal up` uses, on a random loopback port."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusFile, BusSettings, generate_credentials, write_bus_file
from shoal.kernel.natsd import EmbeddedNats

REPO = Path(__file__).resolve().parent.parent


class Bus:
    def __init__(self, server: EmbeddedNats, state_dir: Path) -> None:
        self.server = server
        self.state_dir = state_dir

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, role: str) -> BusSettings:
        creds = self.server.credentials[role]
        return BusSettings(url=self.url, user=creds.user, password=creds.password, role=role)

    def env(self, role: str = "controller") -> dict[str, str]:
        """Environment for a child process that should join this bus."""
        from shoal.kernel.config import bus_environment

        return {**os.environ, **bus_environment(self.settings(role)),
                "SHOAL_STATE_DIR": str(self.state_dir), "PYTHONUNBUFFERED": "1"}

    async def client(self, role: str, **kwargs: object) -> Client:
        return await connect(self.settings(role), f"test-{role}", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    state_dir = tmp_path_factory.mktemp("bus")
    server = EmbeddedNats(state_dir=state_dir, credentials=generate_credentials())
    server.start()
    write_bus_file(state_dir, BusFile(url=server.url, credentials=server.credentials))
    yield Bus(server, state_dir)
    server.stop()


@pytest.fixture(scope="session")
async def buckets(bus: Bus) -> AsyncIterator[None]:
    nc = await bus.client("operator")
    await ensure_buckets(nc.jetstream())
    await nc.close()
    yield


@pytest.fixture
async def operator(bus: Bus, buckets: None) -> AsyncIterator[Client]:
    nc = await bus.client("operator")
    yield nc
    await nc.close()


def python() -> str:
    return sys.executable


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item (``item.rep_call``), so fixtures can
    show the logs of child processes when a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
