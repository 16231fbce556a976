"""Failure accrual for one endpoint: when to stop sending it traffic and when to try again.

This is Linkerd's ``consecutive`` failure accrual, as plain code over plain values (the
caller passes the clock in, seconds of ``time.monotonic()``): after ``consecutive_failures``
failures in a row the endpoint is ejected for a backoff; when the backoff ends ONE real
request is let through as the probe (Linkerd sends no synthetic probes); its success puts
the endpoint back, its failure ejects it again for a longer backoff.

The lifecycle:

    state      available(now)                 event                  next state
    ---------  -----------------------------  ---------------------  ----------------------
    healthy    yes                            N-th failure in a row  ejected (backoff #0)
    ejected    once now >= until (probe due)  dispatch when due      probing
    probing    no (one probe at a time)       success                healthy (backoff reset)
    probing                                   failure                ejected (backoff #k+1)

Results of requests dispatched before the ejection that complete while ejected are
ignored: they say nothing about the endpoint after the ejection. A probe whose result
never comes (the caller lost it) is considered lost after ``PROBE_LOST_SECONDS``, and the
next request may probe again, so an endpoint can never stay out for good.

Backoff follows linkerd2-proxy's ``ExponentialBackoff``: ``base = min(max, min * 2**k)``,
plus a jitter drawn uniformly from ``[0, base * jitter)``, the sum capped at ``max``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

# A probe that has not reported back after this long is taken as lost, so the endpoint
# can be probed again. Linkerd has no such case (its probe is a future that always ends);
# a minute matches its longest backoff and is far above any sane response timeout.
PROBE_LOST_SECONDS = 60.0


class AccrualState(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBING = "probing"


@dataclass(frozen=True)
class FailureAccrualConfig:
    """Linkerd's defaults: 7 failures, backoff 1 s to 1 min, jitter 0.5."""

    consecutive_failures: int = 7
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if not 0 < self.min_backoff_s <= self.max_backoff_s:
            raise ValueError("backoff needs 0 < min_backoff_s <= max_backoff_s")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, iteration: int, rng: random.Random) -> float:
        """The ejection time after the ``iteration``-th consecutive failed probe (from 0)."""
        # 2**k overflows float only past k=1023; cap the exponent well before that.
        base = min(self.max_backoff_s, self.min_backoff_s * 2.0 ** min(iteration, 64))
        if self.jitter == 0:
            return base
        jitter = base * self.jitter * rng.random()
        return base + min(jitter, self.max_backoff_s - base)


class FailureAccrual:
    """One endpoint's accrual state; see the module docstring for the lifecycle."""

    __slots__ = ("_backoffs", "_config", "_failures", "_rng", "_since", "_state", "_until")

    def __init__(self, config: FailureAccrualConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._state = AccrualState.HEALTHY
        self._failures = 0  # consecutive failures while healthy
        self._backoffs = 0  # ejections since the endpoint was last healthy
        self._until = 0.0  # end of the current ejection
        self._since = 0.0  # when the probe was dispatched

    @property
    def state(self) -> AccrualState:
        return self._state

    @property
    def ejected_until(self) -> float:
        """End of the current (or last) ejection, in the caller's clock."""
        return self._until

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def available(self, now: float) -> bool:
        """May a request be sent now? While ejected, only the probe once it is due."""
        state = self._state
        if state is AccrualState.HEALTHY:
            return True
        if state is AccrualState.EJECTED:
            return now >= self._until
        return now - self._since >= PROBE_LOST_SECONDS

    def probe_due(self, now: float) -> bool:
        """Ejected (or probe lost) and the next request to it would be the probe."""
        return self._state is not AccrualState.HEALTHY and self.available(now)

    def on_dispatch(self, now: float) -> None:
        """A request was sent to the endpoint; when a probe was due, this one is it."""
        if self._state is not AccrualState.HEALTHY and self.available(now):
            self._state = AccrualState.PROBING
            self._since = now

    def record(self, success: bool, now: float) -> None:
        """The outcome of a request sent to the endpoint (see the lifecycle table)."""
        state = self._state
        if state is AccrualState.HEALTHY:
            if success:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self._config.consecutive_failures:
                self._eject(now)
        elif state is AccrualState.PROBING:
            if success:
                self._state = AccrualState.HEALTHY
                self._failures = 0
                self._backoffs = 0
            else:
                self._eject(now)
        # EJECTED: a late result of a request sent before the ejection; ignored.

    def _eject(self, now: float) -> None:
        self._until = now + self._config.backoff(self._backoffs, self._rng)
        self._backoffs += 1
        self._failures = 0
        self._state = AccrualState.EJECTED
