"""The per-service balancer: which endpoint gets the next request.

Linkerd's algorithm, as plain code over plain values (no I/O; the caller passes the clock
in, seconds of ``time.monotonic()``, and a seeded ``random.Random`` makes runs repeatable):

- Power of two choices (P2C): draw two distinct available endpoints at random and send to
  the one with the lower cost.
- Cost = peak-EWMA of round-trip time x (requests in flight + 1) / relative weight, as
  tower's ``PeakEwma`` that linkerd2-proxy balances with. The estimate starts at
  ``default_rtt_s`` (30 ms). A sample above the estimate replaces it at once (peak); a
  sample below it is blended in with ``decay = exp(-elapsed / decay_s)``, and the
  estimate also decays towards zero with the time since its last update when read, so an
  endpoint that stopped getting traffic is tried again.
- Weights: ``Endpoint.weight`` (100 is the norm) divides the cost, as tower's
  ``Weighted`` does for Linkerd's weighted addresses. Weight 0 means "no traffic": such an
  endpoint is chosen only when every available endpoint has weight 0.
- Failure accrual (``accrual.py``) per endpoint: ejected endpoints are skipped. An
  endpoint whose probe is due gets the next request (that request is the probe), so an
  ejected endpoint always gets its chance to come back however costly it looked.

Bookkeeping contract: every ``on_dispatch`` is followed by exactly one ``on_complete``
(a response, successful or not) or ``on_connect_error`` (the connection to the endpoint
failed) for the same state. States of endpoints removed by ``update`` may still receive
those calls; they just finish there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shoal.schemas.endpoints import Endpoint

from .accrual import AccrualState, FailureAccrual, FailureAccrualConfig

EndpointKey = tuple[str, int]  # (address, port)

# Endpoint.weight that counts as 1.0: the schema's default weight.
NORMAL_WEIGHT = 100
# Floor of the RTT estimate in the cost: after hours idle the decayed estimate underflows
# to 0, and a zero would make requests in flight count for nothing. 1 us is below any
# real round trip, so it never changes a choice between measured endpoints.
MIN_RTT_SECONDS = 1e-6


@dataclass(frozen=True)
class BalancerConfig:
    """Linkerd's peak-EWMA defaults: initial RTT 30 ms, decay 10 s."""

    default_rtt_s: float = 0.030
    decay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.default_rtt_s < 0 or self.decay_s <= 0:
            raise ValueError("default_rtt_s must be >= 0 and decay_s > 0")


class EndpointState:
    """One endpoint's live balancing state: RTT estimate, requests in flight, accrual."""

    __slots__ = ("_decay_s", "_rtt_s", "_updated_at", "accrual", "endpoint", "identity",
                 "in_flight", "key", "weight_factor")

    def __init__(self, endpoint: Endpoint, config: BalancerConfig, accrual: FailureAccrual,
                 now: float) -> None:
        self.endpoint = endpoint
        self.key: EndpointKey = (endpoint.address, endpoint.port)
        self.identity = endpoint.identity  # what its proxy must prove ("": no TLS)
        self.in_flight = 0
        self.accrual = accrual
        self.weight_factor = endpoint.weight / NORMAL_WEIGHT
        self._decay_s = config.decay_s
        self._rtt_s = config.default_rtt_s
        self._updated_at = now

    def __repr__(self) -> str:
        return (f"EndpointState({self.key[0]}:{self.key[1]}, rtt={self._rtt_s * 1000:.1f}ms, "
                f"in_flight={self.in_flight}, {self.accrual.state.value})")

    def rtt_estimate(self, now: float) -> float:
        """The peak-EWMA estimate in seconds, decayed to ``now`` (does not change state)."""
        elapsed = now - self._updated_at
        if elapsed <= 0:
            return self._rtt_s
        return self._rtt_s * math.exp(-elapsed / self._decay_s)

    def cost(self, now: float) -> float:
        """Peak-EWMA RTT x (in flight + 1) / relative weight; infinite for weight 0."""
        # On the request path: written out rather than calling rtt_estimate().
        weight = self.weight_factor
        if weight <= 0:
            return math.inf
        elapsed = now - self._updated_at
        rtt = self._rtt_s * math.exp(-elapsed / self._decay_s) if elapsed > 0 else self._rtt_s
        if rtt < MIN_RTT_SECONDS:
            rtt = MIN_RTT_SECONDS
        return rtt * (self.in_flight + 1) / weight

    def observe_rtt(self, rtt_s: float, now: float) -> None:
        """Fold one RTT sample into the estimate (peak: a higher sample wins at once)."""
        elapsed = now - self._updated_at
        if elapsed > 0:
            decay = math.exp(-elapsed / self._decay_s)
            self._updated_at = now
        else:
            decay = 1.0
        estimate = self._rtt_s * decay
        if rtt_s > estimate:
            self._rtt_s = rtt_s
        else:
            self._rtt_s = estimate + max(0.0, rtt_s) * (1.0 - decay)

    def _replace_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.identity = endpoint.identity
        self.weight_factor = endpoint.weight / NORMAL_WEIGHT


class Balancer:
    """P2C over peak-EWMA for one service's endpoints, skipping ejected ones."""

    def __init__(
        self,
        config: BalancerConfig = BalancerConfig(),
        accrual: FailureAccrualConfig = FailureAccrualConfig(),
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._accrual = accrual
        self._rng = rng if rng is not None else random.Random()
        self._states: dict[EndpointKey, EndpointState] = {}
        self._order: list[EndpointState] = []
        self._weighted: list[EndpointState] = []  # weight > 0: the fast path's pool
        self._unhealthy: set[EndpointKey] = set()  # not HEALTHY in accrual: slow path

    def __len__(self) -> int:
        return len(self._order)

    @property
    def endpoints(self) -> list[EndpointState]:
        """The current endpoints, in the order of the last update (a copy)."""
        return list(self._order)

    def get(self, key: EndpointKey) -> EndpointState | None:
        return self._states.get(key)

    def update(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Replace the endpoint set; endpoints that stay keep their RTT, load and accrual.

        A key listed twice keeps its first entry (the destination never writes that).
        """
        states: dict[EndpointKey, EndpointState] = {}
        for endpoint in endpoints:
            key = (endpoint.address, endpoint.port)
            if key in states:
                continue
            state = self._states.get(key)
            if state is None:
                accrual = FailureAccrual(self._accrual, self._rng)
                state = EndpointState(endpoint, self._config, accrual, now)
            elif state.endpoint != endpoint:
                state._replace_endpoint(endpoint)
            states[key] = state
        self._states = states
        self._order = list(states.values())
        self._weighted = [state for state in self._order if state.weight_factor > 0]
        self._unhealthy = {key for key, state in states.items()
                           if state.accrual.state is not AccrualState.HEALTHY}

    def pick(self, now: float, exclude: Collection[EndpointKey] = ()) -> EndpointState | None:
        """The endpoint for the next request, or None when none is available."""
        if not exclude and not self._unhealthy:
            # The common case, kept to a few operations: every endpoint is healthy.
            pool = self._weighted
            count = len(pool)
            if count >= 2:
                return self._p2c(pool, count, now)
            if count == 1:
                return pool[0]
        return self._pick_filtered(now, exclude)

    def _p2c(self, pool: list[EndpointState], count: int, now: float) -> EndpointState:
        rand = self._rng.random
        i = int(rand() * count)
        j = int(rand() * (count - 1))
        if j >= i:
            j += 1
        a, b = pool[i], pool[j]
        return b if b.cost(now) < a.cost(now) else a

    def _pick_filtered(self, now: float,
                       exclude: Collection[EndpointKey]) -> EndpointState | None:
        candidates: list[EndpointState] = []
        zero_weight: list[EndpointState] = []
        for state in self._order:
            if exclude and state.key in exclude:
                continue
            accrual = state.accrual
            if not accrual.available(now):
                continue
            if accrual.probe_due(now):
                return state  # a real request is the probe (Linkerd)
            if state.weight_factor > 0:
                candidates.append(state)
            else:
                zero_weight.append(state)
        if not candidates:
            candidates = zero_weight
        count = len(candidates)
        if count == 0:
            return None
        if count == 1:
            return candidates[0]
        return self._p2c(candidates, count, now)

    def on_dispatch(self, state: EndpointState, now: float) -> None:
        """A request was sent to ``state`` (in flight until on_complete/on_connect_error)."""
        state.in_flight += 1
        state.accrual.on_dispatch(now)  # when a probe is due, this request is it

    def on_complete(self, state: EndpointState, now: float, rtt_s: float,
                    success: bool) -> None:
        """The response came (or the exchange failed after connecting), after ``rtt_s``."""
        if state.in_flight > 0:
            state.in_flight -= 1
        state.observe_rtt(rtt_s, now)
        state.accrual.record(success, now)
        self._track(state)

    def on_connect_error(self, state: EndpointState, now: float) -> None:
        """Connecting to the endpoint failed: a failure for accrual, no RTT sample."""
        if state.in_flight > 0:
            state.in_flight -= 1
        state.accrual.record(False, now)
        self._track(state)

    def _track(self, state: EndpointState) -> None:
        if state.accrual.state is AccrualState.HEALTHY:
            self._unhealthy.discard(state.key)
        elif self._states.get(state.key) is state:  # not a removed endpoint's old state
            self._unhealthy.add(state.key)
