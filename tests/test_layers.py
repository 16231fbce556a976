"""No import runs upward: schemas < kernel < proxy | services < cli (DESIGN.md, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# layer folder -> the shoal subpackages it may import
ALLOWED: dict[str, set[str]] = {
    "schemas": {"schemas"},
    "kernel": {"schemas", "kernel"},
    "proxy": {"schemas", "kernel", "proxy"},
    "services": {"schemas", "kernel", "services"},
    "cli": {"schemas", "kernel", "proxy", "services", "cli", "demo"},
    # the demo is an ordinary application: it may use the kernel's generic helpers
    # (logging, child processes) and nothing of the mesh
    "demo": {"kernel", "demo"},
}


def _imports(path: Path, layer: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = ["shoal", layer, *path.relative_to(REPO / layer).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.append(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_upward_imports(layer: str) -> None:
    bad = []
    for path in (REPO / layer).rglob("*.py"):
        for module in _imports(path, layer):
            parts = module.split(".")
            if parts[0] == "shoal" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert not bad, "\n".join(bad)


def test_proxy_and_services_do_not_meet_in_code() -> None:
    assert "services" not in ALLOWED["proxy"] and "proxy" not in ALLOWED["services"]
