"""Turning wrk runs into the figures a reader compares: medians per peer and connection
count, ratios against the direct connection, Envoy and HAProxy, a plain-text table and a
JSON record. Plain code over plain values, no I/O except ``write_json``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import FOREIGN_SHARE_FLAG
from bench.peers import PEERS_BY_NAME, Peer
from bench.wrk import WrkResult


@dataclass(frozen=True)
class Run:
    """One wrk run: a result, or the error that prevented one."""

    peer: str
    connections: int
    rep: int
    result: WrkResult | None = None
    error: str | None = None
    # share of the proxy core other processes used during the run (see bench.cpu)
    foreign_share: float | None = None


@dataclass(frozen=True)
class Summary:
    """The medians over the successful repetitions of one (peer, connections) cell."""

    peer: str
    hops: int
    connections: int
    runs: int
    failed_runs: int
    requests_per_second: float
    p50_us: float
    p99_us: float
    errors: int
    foreign_share_max: float | None = None


def summarize(runs: Sequence[Run], peer_order: Sequence[str],
              connections: Sequence[int]) -> list[Summary]:
    out: list[Summary] = []
    for name in peer_order:
        for conns in connections:
            cell = [r for r in runs if r.peer == name and r.connections == conns]
            ok = [r.result for r in cell if r.result is not None]
            if not cell:
                continue
            hops = PEERS_BY_NAME[name].hops if name in PEERS_BY_NAME else 0
            shares = [r.foreign_share for r in cell if r.foreign_share is not None]
            foreign = max(shares) if shares else None
            if not ok:
                out.append(Summary(name, hops, conns, 0, len(cell), 0.0, 0.0, 0.0, 0, foreign))
                continue
            out.append(Summary(
                peer=name, hops=hops, connections=conns, runs=len(ok),
                failed_runs=len(cell) - len(ok),
                requests_per_second=statistics.median(r.requests_per_second for r in ok),
                p50_us=statistics.median(r.p50_us for r in ok),
                p99_us=statistics.median(r.p99_us for r in ok),
                errors=sum(r.errors for r in ok), foreign_share_max=foreign))
    return out


def _lookup(summaries: Sequence[Summary], peer: str | None, conns: int) -> Summary | None:
    if peer is None:
        return None
    for s in summaries:
        if s.peer == peer and s.connections == conns and s.runs:
            return s
    return None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def comparisons(summary: Summary, peer: Peer | None,
                summaries: Sequence[Summary]) -> dict[str, dict[str, float | None]]:
    """Ratios of this cell's req/s, p50 and p99 against its baselines at the same
    connection count: ``direct``, its Envoy counterpart and its HAProxy counterpart."""
    baselines = {"direct": "direct" if summary.peer != "direct" else None,
                 "envoy": peer.envoy_counterpart if peer else None,
                 "haproxy": peer.haproxy_counterpart if peer else None}
    out: dict[str, dict[str, float | None]] = {}
    for label, name in baselines.items():
        base = _lookup(summaries, name, summary.connections)
        if base is None or not summary.runs:
            continue
        out[f"{label}:{base.peer}"] = {
            "requests_per_second": ratio(summary.requests_per_second,
                                         base.requests_per_second),
            "p50": ratio(summary.p50_us, base.p50_us),
            "p99": ratio(summary.p99_us, base.p99_us),
        }
    return out


def format_latency(us: float) -> str:
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1_000_000:.2f}s"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_share(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share:.0%}" + (" !" if share > FOREIGN_SHARE_FLAG else "")


def format_table(summaries: Sequence[Summary]) -> str:
    """The results table: medians, req/s as a ratio of each baseline, and "others": the
    largest share of the proxy core that other processes took during one of the cell's
    runs ("!" past ``FOREIGN_SHARE_FLAG``: that cell's figures are suspect)."""
    head = ("peer", "hops", "conns", "req/s", "p50", "p99", "errors", "/direct", "/envoy",
            "/haproxy", "others")
    rows: list[tuple[str, ...]] = [head]
    for s in summaries:
        others = _fmt_share(s.foreign_share_max)
        if not s.runs:
            rows.append((s.peer, str(s.hops), str(s.connections), "failed", "-", "-", "-",
                         "-", "-", "-", others))
            continue
        comp = comparisons(s, PEERS_BY_NAME.get(s.peer), summaries)
        by_kind = {key.split(":", 1)[0]: v["requests_per_second"] for key, v in comp.items()}
        errors = str(s.errors) + (f" ({s.failed_runs} runs failed)" if s.failed_runs else "")
        rows.append((s.peer, str(s.hops), str(s.connections),
                     f"{s.requests_per_second:,.0f}", format_latency(s.p50_us),
                     format_latency(s.p99_us), errors,
                     _fmt_ratio(by_kind.get("direct")), _fmt_ratio(by_kind.get("envoy")),
                     _fmt_ratio(by_kind.get("haproxy")), others))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_comparisons(summaries: Sequence[Summary], subjects: Sequence[str]) -> str:
    """One line per measured subject cell: req/s, p50 and p99 as ratios of each baseline."""
    lines = []
    for s in summaries:
        if s.peer not in subjects or not s.runs:
            continue
        for key, values in comparisons(s, PEERS_BY_NAME.get(s.peer), summaries).items():
            base = key.split(":", 1)[1]
            lines.append(
                f"{s.peer}/{base} at {s.connections} conns: req/s "
                f"{_fmt_ratio(values['requests_per_second'])}, p50 "
                f"{_fmt_ratio(values['p50'])}, p99 {_fmt_ratio(values['p99'])}")
    return "\n".join(lines)


def record(settings: dict[str, Any], environment: dict[str, Any],
           unavailable: dict[str, str], runs: Sequence[Run],
           summaries: Sequence[Summary]) -> dict[str, Any]:
    """The JSON record of a run: what was asked, where, every run, and the medians."""
    return {
        "settings": settings,
        "environment": environment,
        "unavailable": unavailable,
        "runs": [dataclasses.asdict(r) for r in runs],
        "summary": [{**dataclasses.asdict(s),
                     "ratios": comparisons(s, PEERS_BY_NAME.get(s.peer), summaries)}
                    for s in summaries],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
