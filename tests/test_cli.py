"""The CLI's edges: clear errors and exit codes, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .services import REPO


def _shoal(*args: str, state: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, input=stdin, timeout=30)


def test_policy_apply_without_a_bus_says_how_to_start_one(tmp_path: Path) -> None:
    result = _shoal("policy", "apply", "-f", "-", state=tmp_path, stdin="namespace: a\n")
    assert result.returncode == 1
    assert "shoal up" in result.stderr and "Traceback" not in result.stderr


def test_policy_apply_with_an_unreachable_bus(tmp_path: Path) -> None:
    result = _shoal("policy", "apply", "-f", "-", "--nats", "nats://127.0.0.1:1",
                    state=tmp_path, stdin="namespace: a\n")
    assert result.returncode == 1
    assert "cannot reach the bus" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = _shoal("policy", "apply", state=tmp_path)
    assert result.returncode == 2


def test_schema_export_writes_every_schema(tmp_path: Path) -> None:
    result = _shoal("schema", "export", str(tmp_path / "out"), state=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported == sorted(p.name for p in (REPO / "schemas" / "json").iterdir())
