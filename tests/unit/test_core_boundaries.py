"""The edge value of each small core's rule lands on the side its docstring says (found by the mutation pass,
tools/mutation.sh: each test here failed on a mutant that moved an edge and no other test noticed)."""

from __future__ import annotations

from mai.core.restart import RestartPolicy
from mai.core.subscriptions import Subscribers
from messages.resources import GpuProcess
from tests.unit.test_chat_policy import BIG, MID, make_policy


def test_a_child_that_lived_exactly_stable_after_s_starts_again_from_the_initial_delay() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=30.0, stable_after_s=60.0)
    assert policy.delay(5, lived_s=60.0) == (0.5, 1)  # "a child that lived this long starts again"
    assert policy.delay(5, lived_s=59.9) == (16.0, 6)


def test_a_successor_does_not_restore_a_subscription_that_lapses_at_that_very_moment() -> None:
    old = Subscribers()
    old.add("lapsing", now=0.0, ttl_s=20.0)
    old.add("live", now=0.0, ttl_s=20.1)
    new = Subscribers()
    assert new.restore(old.entries(), now=20.0) == 1  # live() drops an entry at exactly its expiry: so does restore
    assert "lapsing" not in new and new.live(20.0) == ["live"]


def test_a_model_exactly_at_the_minimum_speed_is_not_too_slow() -> None:
    policy = make_policy(min_tokens_per_s=2.0)
    assert policy.learned_speed(BIG) is None and not policy.too_slow(BIG)  # nothing measured: no verdict
    policy.record_success(BIG, now=0.0, tokens_per_s=2.0)
    policy.record_success(MID, now=0.0, tokens_per_s=1.9)
    assert policy.learned_speed(BIG) == 2.0 and not policy.too_slow(BIG)  # "below min_tokens_per_s" is too slow
    assert policy.learned_speed(MID) == 1.9 and policy.too_slow(MID)


def test_no_clip_pid_known_claims_no_row_and_any_real_pid_can_be_clips() -> None:
    from mai.core.attribution import Owner, owner_of

    assert owner_of(GpuProcess(0, "", 5), clip_pid=0) is Owner.OTHER  # 0: CLIP's process not known yet
    assert owner_of(GpuProcess(1, "python3", 5), clip_pid=1) is Owner.CLIP  # a container's first process


def test_a_parts_processes_are_summed_and_equal_others_are_listed_by_name() -> None:
    from mai.core.attribution import Owner, split_use

    rows = [GpuProcess(10, "ollama", 300), GpuProcess(11, "llama-server", 900, "ollama"), GpuProcess(20, "zed", 50),
            GpuProcess(21, "alacritty", 50), GpuProcess(22, "kwin", 50)]
    use = split_use(rows, clip_pid=0)
    assert use.mai == ((Owner.OLLAMA, 1200),)  # the server and its runner: one part
    assert use.others == (("alacritty", 50), ("kwin", 50), ("zed", 50))  # equal bytes: by name
