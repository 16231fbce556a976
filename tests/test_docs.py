"""Docs that must stay true: the bus contract table equals the code's."""

from __future__ import annotations

from pathlib import Path

from shoal.schemas import contract, names

REPO = Path(__file__).resolve().parent.parent


def test_bus_contract_table_matches_code() -> None:
    text = (REPO / "docs" / "bus-contract.md").read_text()
    assert contract.markdown_table() in text, (
        "docs/bus-contract.md's table differs from shoal/schemas/contract.py")


def test_contract_names_every_subject_and_bucket() -> None:
    rows = " ".join(row.name for row in contract.CONTRACT)
    for name in (*names.ALL_BUCKETS, names.IDENTITY_CERTIFY, names.REGISTER,
                 names.TAP_PREFIX, names.METRICS_PREFIX, names.METRICS_QUERY,
                 names.POLICY_APPLY, names.EVENTS_PREFIX):
        assert name in rows, name


def test_contract_message_names_are_real_types() -> None:
    import shoal.schemas.endpoints as e
    import shoal.schemas.events as ev
    import shoal.schemas.identity as i
    import shoal.schemas.metrics as m
    import shoal.schemas.policy as p
    import shoal.schemas.tap as t

    known = {name for module in (e, ev, i, m, p, t) for name in dir(module)}
    for row in contract.CONTRACT:
        for part in row.message.replace("->", "|").split("|"):
            assert part.strip() in known, (row.name, part)
