"""The balancer as plain code: P2C over peak-EWMA, weights, failure accrual, updates that
keep state, and repeatable choices with a seeded rng. Load is simulated on a virtual
clock (no sockets, no sleeping), so traffic shares are exact and the tests are fast."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.proxy.accrual import AccrualState, FailureAccrual, FailureAccrualConfig
from shoal.proxy.balance import Balancer, BalancerConfig, EndpointKey, EndpointState
from shoal.schemas.endpoints import Endpoint


def state_of(accrual: FailureAccrual) -> AccrualState:
    """Read through a call, so mypy does not narrow the property across state changes."""
    return accrual.state


def ep(port: int, weight: int = 100) -> Endpoint:
    return Endpoint(address="127.0.0.1", port=port, weight=weight)


@dataclass(frozen=True)
class Behaviour:
    latency_s: float
    fails: bool = False


def simulate(balancer: Balancer, behaviour: dict[int, Behaviour], requests: int,
             concurrency: int, start: float = 0.0) -> tuple[Counter[int], float]:
    """Closed-loop load: `concurrency` clients, each sending its next request when the
    previous one completes. Returns requests per port and the virtual end time."""
    sent: Counter[int] = Counter()
    events: list[tuple[float, int, EndpointState | None]] = []
    seq = 0
    now = start

    def send(at: float) -> None:
        nonlocal seq
        state = balancer.pick(at)
        seq += 1
        if state is None:  # nothing available: the client retries 10 ms later
            heapq.heappush(events, (at + 0.01, seq, None))
            return
        balancer.on_dispatch(state, at)
        sent[state.key[1]] += 1
        heapq.heappush(events, (at + behaviour[state.key[1]].latency_s, seq, state))

    for _ in range(concurrency):
        send(now)
    done = 0
    while done < requests:
        now, _, state = heapq.heappop(events)
        if state is not None:
            b = behaviour[state.key[1]]
            balancer.on_complete(state, now, b.latency_s, success=not b.fails)
            done += 1
        send(now)
    return sent, now


def test_slow_and_failing_endpoints_get_measurably_less_traffic() -> None:
    balancer = Balancer(rng=random.Random(42))
    balancer.update([ep(1), ep(2), ep(3)], 0.0)
    behaviour = {1: Behaviour(0.010), 2: Behaviour(0.200), 3: Behaviour(0.005, fails=True)}
    sent, end = simulate(balancer, behaviour, requests=6000, concurrency=8)
    total = sum(sent.values())
    print(f"traffic over {end:.1f}s virtual: {dict(sent)}")
    assert sent[1] > 0.85 * total
    assert sent[2] < 0.10 * total  # 20x slower
    assert sent[3] < 0.05 * total  # fails every time: ejected, probed with backoff
    failing = balancer.get(("127.0.0.1", 3))
    assert failing is not None and state_of(failing.accrual) is not AccrualState.HEALTHY


def test_equal_endpoints_share_evenly() -> None:
    balancer = Balancer(rng=random.Random(3))
    balancer.update([ep(1), ep(2), ep(3)], 0.0)
    behaviour = {p: Behaviour(0.010) for p in (1, 2, 3)}
    sent, _ = simulate(balancer, behaviour, requests=3000, concurrency=6)
    assert all(800 < sent[p] < 1200 for p in (1, 2, 3)), sent


def test_weights_bias_the_choice() -> None:
    balancer = Balancer(rng=random.Random(5))
    balancer.update([ep(1, weight=300), ep(2, weight=100)], 0.0)
    behaviour = {1: Behaviour(0.010), 2: Behaviour(0.010)}
    sent, _ = simulate(balancer, behaviour, requests=4000, concurrency=8)
    assert sent[1] > 2 * sent[2], sent


def test_weight_zero_gets_nothing_unless_alone() -> None:
    balancer = Balancer(rng=random.Random(5))
    balancer.update([ep(1), ep(2, weight=0)], 0.0)
    picks = Counter(balancer.pick(float(t)).key[1] for t in range(200))  # type: ignore[union-attr]
    assert picks == {1: 200}
    assert balancer.pick(0.0, exclude=[("127.0.0.1", 1)]).key == ("127.0.0.1", 2)  # type: ignore[union-attr]


def test_an_ejected_endpoint_comes_back_through_a_probe() -> None:
    config = FailureAccrualConfig(jitter=0.0)
    balancer = Balancer(accrual=config, rng=random.Random(1))
    balancer.update([ep(1), ep(2)], 0.0)
    bad = balancer.get(("127.0.0.1", 2))
    assert bad is not None
    for _ in range(7):
        balancer.on_dispatch(bad, 0.0)
        balancer.on_complete(bad, 0.0, 0.001, success=False)
    assert state_of(bad.accrual) is AccrualState.EJECTED
    # While ejected it gets nothing, however cheap it looks.
    assert {balancer.pick(t / 100).key[1] for t in range(99)} == {1}  # type: ignore[union-attr]
    # Once the backoff (1 s) is over, the very next request is the probe.
    probe = balancer.pick(1.0)
    assert probe is bad
    balancer.on_dispatch(bad, 1.0)
    assert balancer.pick(1.0) is not bad  # one probe at a time
    balancer.on_complete(bad, 1.01, 0.001, success=True)
    assert state_of(bad.accrual) is AccrualState.HEALTHY
    sent, _ = simulate(balancer, {1: Behaviour(0.010), 2: Behaviour(0.010)}, 1000, 4,
                       start=1.01)
    assert sent[2] > 300  # back in full rotation


def test_all_ejected_none_due_is_none_then_probe() -> None:
    balancer = Balancer(accrual=FailureAccrualConfig(consecutive_failures=1, jitter=0.0),
                        rng=random.Random(1))
    balancer.update([ep(1), ep(2)], 0.0)
    for state in balancer.endpoints:
        balancer.on_dispatch(state, 0.0)
        balancer.on_connect_error(state, 0.0)
    assert balancer.pick(0.5) is None
    assert balancer.pick(1.0) is not None
    assert Balancer().pick(0.0) is None  # empty


def test_exclude_skips_endpoints() -> None:
    balancer = Balancer(rng=random.Random(1))
    balancer.update([ep(1), ep(2), ep(3)], 0.0)
    for t in range(50):
        state = balancer.pick(float(t), exclude={("127.0.0.1", 1), ("127.0.0.1", 3)})
        assert state is not None and state.key == ("127.0.0.1", 2)
    assert balancer.pick(0.0, exclude=[s.key for s in balancer.endpoints]) is None


def test_removing_endpoints_keeps_the_state_of_the_rest() -> None:
    balancer = Balancer(rng=random.Random(1))
    balancer.update([ep(1), ep(2), ep(3)], 0.0)
    two = balancer.get(("127.0.0.1", 2))
    three = balancer.get(("127.0.0.1", 3))
    assert two is not None and three is not None
    balancer.on_dispatch(two, 0.0)
    balancer.on_dispatch(two, 0.0)
    balancer.on_complete(two, 0.5, 0.5, success=True)  # peak: estimate jumps to 500 ms
    for _ in range(3):
        balancer.on_dispatch(three, 0.5)
        balancer.on_complete(three, 0.5, 0.001, success=False)
    balancer.update([ep(2, weight=50), ep(3), ep(4)], 1.0)
    assert len(balancer) == 3 and balancer.get(("127.0.0.1", 1)) is None
    assert balancer.get(("127.0.0.1", 2)) is two and two.in_flight == 1
    assert two.rtt_estimate(0.5) == pytest.approx(0.5)
    assert two.weight_factor == pytest.approx(0.5)  # the new weight applies
    assert balancer.get(("127.0.0.1", 3)) is three and three.accrual.consecutive_failures == 3
    assert [s.key[1] for s in balancer.endpoints] == [2, 3, 4]
    # a request to a removed endpoint just finishes
    balancer.update([ep(3), ep(4)], 2.0)
    balancer.on_complete(two, 2.0, 0.01, success=True)
    assert two.in_flight == 0 and len(balancer) == 2


def test_peak_ewma() -> None:
    config = BalancerConfig()
    balancer = Balancer(config, rng=random.Random(1))
    balancer.update([ep(1)], 0.0)
    state = balancer.endpoints[0]
    assert state.rtt_estimate(0.0) == pytest.approx(0.030)  # Linkerd's initial RTT
    state.observe_rtt(0.200, 1.0)  # above the estimate: replaces it at once
    assert state.rtt_estimate(1.0) == pytest.approx(0.200)
    state.observe_rtt(0.010, 11.0)  # below: blended with decay exp(-10/10)
    decay = math.exp(-1.0)
    expected = 0.200 * decay + 0.010 * (1 - decay)
    assert state.rtt_estimate(11.0) == pytest.approx(expected)
    assert state.rtt_estimate(21.0) == pytest.approx(expected * decay)  # decays when idle
    balancer.on_dispatch(state, 21.0)
    balancer.on_dispatch(state, 21.0)
    assert state.cost(21.0) == pytest.approx(expected * decay * 3)  # x (in flight + 1)


def test_same_seed_same_choices() -> None:
    def run(seed: int) -> list[int]:
        balancer = Balancer(rng=random.Random(seed))
        balancer.update([ep(p) for p in range(1, 9)], 0.0)
        behaviour = {p: Behaviour(0.001 * p, fails=p == 8) for p in range(1, 9)}
        order: list[int] = []
        for i in range(300):
            state = balancer.pick(i * 0.01)
            assert state is not None
            order.append(state.key[1])
            balancer.on_dispatch(state, i * 0.01)
            b = behaviour[state.key[1]]
            balancer.on_complete(state, i * 0.01 + b.latency_s, b.latency_s, not b.fails)
        return order

    assert run(11) == run(11)
    assert run(11) != run(12)


operations = st.lists(st.tuples(
    st.sampled_from(["pick", "complete", "connect_error", "update", "advance"]),
    st.integers(min_value=0, max_value=7), st.booleans()), max_size=200)


@settings(max_examples=200, deadline=None)
@given(ops=operations, seed=st.integers(0, 1000))
def test_invariants_under_random_operations(ops: list[tuple[str, int, bool]],
                                            seed: int) -> None:
    rng = random.Random(seed)
    balancer = Balancer(accrual=FailureAccrualConfig(consecutive_failures=2), rng=rng)
    balancer.update([ep(p) for p in range(1, 5)], 0.0)
    now = 0.0
    pending: list[EndpointState] = []
    for op, n, flag in ops:
        if op == "pick":
            exclude: set[EndpointKey] = {("127.0.0.1", n)} if flag else set()
            state = balancer.pick(now, exclude)
            if state is not None:
                assert state.key not in exclude
                assert state in balancer.endpoints
                assert state.accrual.available(now)
                balancer.on_dispatch(state, now)
                pending.append(state)
        elif op in ("complete", "connect_error") and pending:
            state = pending.pop(n % len(pending))
            if op == "complete":
                balancer.on_complete(state, now, n / 100, flag)
            else:
                balancer.on_connect_error(state, now)
        elif op == "update":
            ports = [p for p in range(1, 9) if (n >> (p % 4)) & 1 or p == n] or [1]
            balancer.update([ep(p) for p in ports], now)
            assert [s.key[1] for s in balancer.endpoints] == ports
        elif op == "advance":
            now += n * 0.7
        for state in balancer.endpoints:
            assert state.in_flight >= 0
            assert state.cost(now) >= 0
        # the fast path's bookkeeping matches the accrual states
        assert balancer._unhealthy == {s.key for s in balancer.endpoints
                                       if state_of(s.accrual) is not AccrualState.HEALTHY}
    # everything dispatched is accounted for once completed
    for state in pending:
        balancer.on_complete(state, now, 0.001, True)
    assert all(s.in_flight == 0 for s in balancer.endpoints)
