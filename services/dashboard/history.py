"""The last minutes of every workload's figures, for the dashboard's sparklines.

Plain code over plain values: the poller hands ``History.add`` one short-window stat
answer per tick, and pages ask for one namespace's series. Every tick shares one time
axis, so a series is a list aligned with ``times`` (``None`` where the workload had no
row at that tick). Bounded in ticks and in workloads per tick whatever the mesh holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shoal.schemas.metrics import StatRow

# Ticks kept: 5 minutes at one tick every 2 s ("the last minutes" of the issue; what a
# 150 px wide sparkline can show at one point per pixel).
HISTORY_TICKS = 150
# Workloads remembered per tick; past this the rest are not charted (they still show in
# the tables, which come straight from the metrics service). 50 is the size the
# dashboard must stay responsive at; 5000 leaves a margin of 100.
MAX_WORKLOADS_PER_TICK = 5000


@dataclass(frozen=True)
class Sample:
    """One workload's figures at one tick: requests/s, success rate (0..1), p95 in ms."""

    rps: float
    success: float | None
    p95: float | None

    def as_json(self) -> dict[str, float | None]:
        return {"rps": self.rps, "sr": self.success, "p95": self.p95}


def sample_of(row: StatRow) -> Sample:
    return Sample(rps=row.rps, success=row.success_rate, p95=row.latency_p95_ms)


def namespace_sample(samples: list[Sample]) -> Sample:
    """A namespace's figures from its workloads': rates add up, the success rate and p95
    are weighted by each workload's rate (the exact p95 needs histograms we do not hold;
    weighting is what a glance at a sparkline needs)."""
    rps = sum(s.rps for s in samples)
    rated = [s for s in samples if s.success is not None and s.rps > 0]
    weight = sum(s.rps for s in rated)
    success = (sum(s.success * s.rps for s in rated if s.success is not None) / weight
               if weight else None)
    timed = [s for s in samples if s.p95 is not None and s.rps > 0]
    weight = sum(s.rps for s in timed)
    p95 = sum(s.p95 * s.rps for s in timed if s.p95 is not None) / weight if weight else None
    return Sample(rps=round(rps, 3), success=success, p95=None if p95 is None else round(p95, 3))


@dataclass(frozen=True)
class Tick:
    time: float
    workloads: dict[tuple[str, str], Sample]  # (namespace, workload) -> sample


class History:
    """A ring of ticks; the oldest falls off when the ring is full."""

    def __init__(self, ticks: int = HISTORY_TICKS) -> None:
        self._ticks: deque[Tick] = deque(maxlen=ticks)

    def __len__(self) -> int:
        return len(self._ticks)

    def add(self, time: float, rows: list[StatRow]) -> Tick:
        workloads = {(row.namespace, row.name): sample_of(row)
                     for row in rows[:MAX_WORKLOADS_PER_TICK]}
        tick = Tick(time, workloads)
        if self._ticks and time <= self._ticks[-1].time:
            return self._ticks[-1]  # a clock step back: keep the axis increasing
        self._ticks.append(tick)
        return tick

    def latest(self) -> Tick | None:
        return self._ticks[-1] if self._ticks else None

    def workloads(self, namespace: str) -> dict[str, object]:
        """``{"times": [...], "series": {name: {"rps": [...], "sr": [...], "p95": [...]}}}``
        for every workload of ``namespace`` seen in the ring."""
        names = sorted({name for tick in self._ticks for ns, name in tick.workloads
                        if ns == namespace})
        series = {name: self._series([tick.workloads.get((namespace, name))
                                      for tick in self._ticks]) for name in names}
        return {"times": [tick.time for tick in self._ticks], "series": series}

    def namespaces(self) -> dict[str, object]:
        """The same shape, one series per namespace (see ``namespace_sample``)."""
        per_tick: list[dict[str, Sample]] = []
        for tick in self._ticks:
            grouped: dict[str, list[Sample]] = {}
            for (ns, _name), sample in tick.workloads.items():
                grouped.setdefault(ns, []).append(sample)
            per_tick.append({ns: namespace_sample(s) for ns, s in grouped.items()})
        names = sorted({ns for tick in per_tick for ns in tick})
        series = {ns: self._series([tick.get(ns) for tick in per_tick]) for ns in names}
        return {"times": [tick.time for tick in self._ticks], "series": series}

    @staticmethod
    def _series(samples: list[Sample | None]) -> dict[str, list[float | None]]:
        return {
            "rps": [None if s is None else s.rps for s in samples],
            "sr": [None if s is None else s.success for s in samples],
            "p95": [None if s is None else s.p95 for s in samples],
        }


def tick_samples(tick: Tick, namespace: str | None) -> dict[str, dict[str, float | None]]:
    """One tick's samples for a page: a namespace's workloads, or (``None``) namespaces."""
    if namespace is not None:
        return {name: sample.as_json() for (ns, name), sample in tick.workloads.items()
                if ns == namespace}
    grouped: dict[str, list[Sample]] = {}
    for (ns, _name), sample in tick.workloads.items():
        grouped.setdefault(ns, []).append(sample)
    return {ns: namespace_sample(s).as_json() for ns, s in grouped.items()}
