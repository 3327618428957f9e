"""The idle timer and held leases (DESIGN invariant 8), on the pure Coordinator core in virtual time.

The idle timeout counts from when the VLM was last *used*: a lease held is use, for as long as it is held, so
- the VLM is never unloaded while a lease is held, however long past `idle_timeout_s`;
- after the last lease ends (released, or expired at its TTL) the VLM stays a whole `idle_timeout_s` more.

A timer that ignored held leases unloaded the VLM one tick after a lease longer than the timeout ended (the idle
clock still ran from the grant); these tests pin both sides of the deadline, so either mutation fails them.
"""

from __future__ import annotations

import pytest

from messages.events import IdleUnloaded
from messages.requests import AcquireLease, LeaseGranted, LeaseReleased, ReleaseLease
from messages.steps import UnloadVlm
from tests.unit.test_coordinator import settings, world

IDLE_S = 300.0
LONG_S = 1000.0  # a lease held more than three idle timeouts


def _recording_with_the_vlm_loaded():
    w = world(settings(idle=IDLE_S), initial_mode="recording", vlm_loaded=True)
    w.advance(1)
    assert w.vlm.state == "loaded"
    return w


def _lease(w, request_id: str, ttl_s: float) -> str:
    granted = w.ask(AcquireLease(request_id, "describer", ttl_s=ttl_s), within_s=1)
    assert isinstance(granted, LeaseGranted), granted
    return granted.lease_id


def _assert_unloads_exactly_one_idle_timeout_after(w, ended_at: float) -> None:
    w.advance(ended_at + IDLE_S - 1 - w.now)
    assert w.vlm.state == "loaded" and not w.sent(UnloadVlm), f"unloaded before {IDLE_S} s idle"
    w.advance(2 + 1)  # past the deadline, and the unload itself
    assert w.vlm.state == "unloaded"
    (idle,) = w.events_of(IdleUnloaded)
    assert idle.idle_s == pytest.approx(IDLE_S, abs=1.0)


def test_a_lease_held_far_past_the_idle_timeout_keeps_the_vlm_loaded():
    w = _recording_with_the_vlm_loaded()
    _lease(w, "l1", ttl_s=2 * LONG_S)
    for _ in range(int(LONG_S // 50)):  # every 50 s across three idle timeouts
        w.advance(50)
        assert w.vlm.state == "loaded", f"unloaded at {w.now:.0f} s while a lease was held"
    assert not w.sent(UnloadVlm) and not w.events_of(IdleUnloaded)


def test_the_idle_timeout_counts_from_the_release_of_a_long_lease():
    w = _recording_with_the_vlm_loaded()
    lease_id = _lease(w, "l1", ttl_s=2 * LONG_S)
    w.advance(LONG_S)
    released = w.ask(ReleaseLease("rel", lease_id))
    assert isinstance(released, LeaseReleased) and released.held_s == pytest.approx(LONG_S)
    _assert_unloads_exactly_one_idle_timeout_after(w, ended_at=w.now)


def test_the_idle_timeout_counts_from_the_expiry_of_a_long_lease():
    w = _recording_with_the_vlm_loaded()
    granted_at = w.now
    _lease(w, "l1", ttl_s=LONG_S)
    w.advance(LONG_S + 0.5)
    assert w.logs_of("lease.expired") and w.vlm.state == "loaded"
    _assert_unloads_exactly_one_idle_timeout_after(w, ended_at=granted_at + LONG_S)


def test_one_lease_ending_while_another_is_held_starts_no_idle_clock():
    w = _recording_with_the_vlm_loaded()
    first = _lease(w, "l1", ttl_s=2 * LONG_S)
    w.advance(100)
    second = _lease(w, "l2", ttl_s=2 * LONG_S)
    w.advance(100)
    w.ask(ReleaseLease("rel1", first))
    w.advance(LONG_S)  # the second lease is still held, more than three idle timeouts later
    assert w.vlm.state == "loaded" and not w.sent(UnloadVlm)
    w.ask(ReleaseLease("rel2", second))
    _assert_unloads_exactly_one_idle_timeout_after(w, ended_at=w.now)
