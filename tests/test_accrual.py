"""Failure accrual as plain code: ejection after N consecutive failures, a real request as
the probe, exponential jittered backoff capped at the maximum, repeatable with a seed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.proxy.accrual import (
    PROBE_LOST_SECONDS,
    AccrualState,
    FailureAccrual,
    FailureAccrualConfig,
)

NO_JITTER = FailureAccrualConfig(jitter=0.0)


def state_of(accrual: FailureAccrual) -> AccrualState:
    """Read through a call, so mypy does not narrow the property across state changes."""
    return accrual.state


def _fail(accrual: FailureAccrual, times: int, now: float) -> None:
    for _ in range(times):
        accrual.on_dispatch(now)
        accrual.record(False, now)


def test_ejects_after_exactly_n_consecutive_failures() -> None:
    accrual = FailureAccrual(FailureAccrualConfig(), random.Random(1))
    _fail(accrual, 6, now=0.0)
    assert accrual.available(0.0) and state_of(accrual) is AccrualState.HEALTHY
    _fail(accrual, 1, now=0.0)
    assert state_of(accrual) is AccrualState.EJECTED
    assert not accrual.available(0.5)


def test_a_success_resets_the_count() -> None:
    accrual = FailureAccrual(FailureAccrualConfig(), random.Random(1))
    for _ in range(10):
        _fail(accrual, 6, now=0.0)
        accrual.record(True, 0.0)
    assert state_of(accrual) is AccrualState.HEALTHY


def test_probe_success_brings_the_endpoint_back() -> None:
    accrual = FailureAccrual(NO_JITTER, random.Random(1))
    _fail(accrual, 7, now=10.0)
    assert accrual.ejected_until == pytest.approx(11.0)
    assert not accrual.available(10.99)
    assert accrual.available(11.0) and accrual.probe_due(11.0)
    accrual.on_dispatch(11.0)  # this request is the probe
    assert state_of(accrual) is AccrualState.PROBING
    assert not accrual.available(11.0)  # one probe at a time
    accrual.record(True, 11.05)
    assert state_of(accrual) is AccrualState.HEALTHY and accrual.available(11.05)
    # and the backoff started over: the next ejection is the minimum again
    _fail(accrual, 7, now=20.0)
    assert accrual.ejected_until == pytest.approx(21.0)


def test_backoff_grows_and_is_capped() -> None:
    accrual = FailureAccrual(NO_JITTER, random.Random(1))
    now = 0.0
    _fail(accrual, 7, now)
    waits = []
    for _ in range(9):
        waits.append(accrual.ejected_until - now)
        now = accrual.ejected_until
        accrual.on_dispatch(now)
        accrual.record(False, now)  # the probe failed
    assert waits == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60])


@given(iteration=st.integers(min_value=0, max_value=2000), seed=st.integers(0, 2**32),
       jitter=st.floats(min_value=0, max_value=1),
       low=st.floats(min_value=0.001, max_value=100), span=st.floats(min_value=1, max_value=100))
def test_backoff_is_within_base_and_max(iteration: int, seed: int, jitter: float, low: float,
                                        span: float) -> None:
    config = FailureAccrualConfig(min_backoff_s=low, max_backoff_s=low * span, jitter=jitter)
    base = min(config.max_backoff_s, low * 2.0 ** min(iteration, 64))
    wait = config.backoff(iteration, random.Random(seed))
    assert base <= wait <= config.max_backoff_s
    assert wait <= base * (1 + jitter) + 1e-9


def test_jitter_spreads_backoffs_and_is_repeatable_with_a_seed() -> None:
    config = FailureAccrualConfig()
    first = [config.backoff(0, rng) for rng in [random.Random(7)] for _ in range(20)]
    again = [config.backoff(0, rng) for rng in [random.Random(7)] for _ in range(20)]
    assert first == again
    assert len(set(first)) > 10  # jittered, not constant
    assert all(1.0 <= wait < 1.5 for wait in first)


def test_late_results_while_ejected_are_ignored() -> None:
    accrual = FailureAccrual(NO_JITTER, random.Random(1))
    _fail(accrual, 7, now=0.0)
    accrual.record(True, 0.2)  # a request sent before the ejection answers late
    assert state_of(accrual) is AccrualState.EJECTED and not accrual.available(0.5)
    accrual.record(False, 0.3)
    assert accrual.ejected_until == pytest.approx(1.0)  # not pushed back


def test_a_lost_probe_does_not_keep_the_endpoint_out_forever() -> None:
    accrual = FailureAccrual(NO_JITTER, random.Random(1))
    _fail(accrual, 7, now=0.0)
    accrual.on_dispatch(1.0)  # probe sent; its result never comes back
    assert not accrual.available(1.0 + PROBE_LOST_SECONDS - 1)
    assert accrual.available(1.0 + PROBE_LOST_SECONDS)


@pytest.mark.parametrize("kwargs", [
    {"consecutive_failures": 0}, {"min_backoff_s": 0}, {"min_backoff_s": 5, "max_backoff_s": 1},
    {"jitter": 1.5},
])
def test_bad_config_is_a_clear_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailureAccrualConfig(**kwargs)  # type: ignore[arg-type]
