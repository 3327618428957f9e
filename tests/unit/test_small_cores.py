"""The small pure policies: the sampler's publication and recovery rules, retries, restart backoff."""

from __future__ import annotations

from hypothesis import given, strategies as st

from mai.core.restart import RestartPolicy
from mai.core.retry import Backoff, is_retryable
from mai.core.sampler import SamplerCore
from messages.errors import BackendUnavailable, ModelNotFound, OperationTimeout, OutOfMemory
from messages.resources import VramSnapshot
from messages.steps import WaitVramFree

MiB = 2**20


def snap(used_mib: int, total_mib: int = 8192, t: float = 0.0) -> VramSnapshot:
    return VramSnapshot(total_mib * MiB, used_mib * MiB, (total_mib - used_mib) * MiB, "simulated", "sim", t)


def test_sampler_publishes_only_changes_of_at_least_the_threshold():
    core = SamplerCore(threshold_bytes=100 * MiB)
    assert core.observe(snap(1000), 0)[0] is None  # the first reading is the baseline
    assert core.observe(snap(1099), 1)[0] is None
    event = core.observe(snap(1100), 2)[0]
    assert event is not None and event.delta_used_bytes == 100 * MiB
    assert core.observe(snap(1050), 3)[0] is None  # measured from the last publication, not the last sample
    assert core.observe(snap(990), 4)[0].delta_used_bytes == -110 * MiB


@given(st.lists(st.integers(0, 8000), min_size=1, max_size=60))
def test_sampler_publications_add_up_to_the_net_change(readings):
    core = SamplerCore(threshold_bytes=100 * MiB)
    published = [core.observe(snap(u), i)[0] for i, u in enumerate(readings)]
    deltas = [e.delta_used_bytes for e in published if e is not None]
    assert all(abs(d) >= 100 * MiB for d in deltas)
    assert abs(readings[0] * MiB + sum(deltas) - readings[-1] * MiB) < 100 * MiB


def test_wait_until_free_answers_at_75_percent_or_at_the_deadline():
    core = SamplerCore(threshold_bytes=100 * MiB)
    core.observe(snap(7000), 0)
    core.wait(WaitVramFree("s1", baseline_free_bytes=1192 * MiB, expected_bytes=6000 * MiB, fraction=0.75, timeout_s=5), "coord", 0)
    assert core.observe(snap(4000), 1)[1] == []  # 3000 MiB back: 50 %, keep waiting
    (to, answer), = core.observe(snap(2400), 2)[1]  # 4600 MiB back: ≥ 75 %
    assert to == "coord" and answer.complete and answer.recovered_bytes == 4600 * MiB and answer.waited_s == 2
    core.wait(WaitVramFree("s2", baseline_free_bytes=5792 * MiB, expected_bytes=6000 * MiB, timeout_s=5), "coord", 10)
    assert [w.deadline for w in core.waits] == [15]
    (_, late), = core.observe(snap(2400), 15.0)[1]
    assert not late.complete and late.step_id == "s2"  # answered incomplete, never left hanging
    assert core.waits == [] and core.next_poll() is None


def test_a_pending_wait_reads_again_after_10_ms_then_twice_as_long_up_to_the_poll_interval():
    core = SamplerCore(threshold_bytes=100 * MiB, max_poll_s=0.25)
    core.observe(snap(7000), 0.0)
    core.wait(WaitVramFree("s1", baseline_free_bytes=1192 * MiB, expected_bytes=6000 * MiB, timeout_s=1.0), "c", 0.0)
    polls, now = [], 0.0
    while core.next_poll() is not None and now < 0.8:
        core.observe(snap(7000), now)  # the bytes are not back yet
        now = core.next_poll()
        polls.append(round(now, 3))
    # Readings at once, then 10, 30, 70, 150, 310 ms...: an unload's VRAM, back ~300 ms later, is seen within 10 ms
    # of it rather than up to 250 ms late; never more than 250 ms apart, and the deadline is a reading too.
    assert polls[:6] == [0.01, 0.03, 0.07, 0.15, 0.31, 0.56]
    assert max(b - a for a, b in zip(polls, polls[1:])) <= 0.25 + 1e-9
    (_, answer), = core.observe(snap(7000), 1.0)[1]
    assert not answer.complete and core.next_poll() is None


def test_retry_only_transient_failures_with_growing_delays():
    assert is_retryable(BackendUnavailable("down")) and is_retryable(OperationTimeout("slow"))
    assert not is_retryable(ModelNotFound("no such model")) and not is_retryable(OutOfMemory("full"))
    assert not is_retryable(ValueError("bug"))
    backoff = Backoff(0.5, 4.0)
    assert [backoff.delay(a) for a in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_restart_backoff_doubles_and_forgets_after_a_stable_run():
    policy = RestartPolicy(initial_s=0.5, max_s=4.0, stable_after_s=60)
    delays, count = [], 0
    for _ in range(6):
        delay, count = policy.delay(count, lived_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] and count == 6
    assert policy.delay(count, lived_s=120.0) == (0.5, 1)
