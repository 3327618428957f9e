"""The chat model policy, one rule per test, on the default catalog: which model the agent uses and why.

Chain (best first, from config/models.yaml):
    qwen2.5-7b-instruct  LM Studio  tier 3  5600 MB
    qwen2.5-3b-instruct  LM Studio  tier 2  2600 MB
    llama3.2:3b          Ollama     tier 2  2800 MB
    qwen2.5:0.5b         Ollama     tier 1   800 MB
Times are seconds on a virtual clock; nothing here sleeps.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import load_config
from mai.core.chat_policy import Availability, Candidate, ChatPolicy, Choice, FailureVerdict
from messages.errors import InvalidRequest, Reason

MiB = 1024**2
GiB = 1024**3
BIG, MID, LLAMA, TINY = "qwen2.5-7b-instruct", "qwen2.5-3b-instruct", "llama3.2:3b", "qwen2.5:0.5b"
BOTH = Availability(frozenset({"lmstudio", "ollama"}))
LOTS = 12 * GiB


def default_chain() -> list[Candidate]:
    cfg = load_config(env={})
    return [Candidate.from_spec(cfg.model(key)) for key in cfg.roles["chat"]]


def make_policy(**overrides: float) -> ChatPolicy:
    settings_ = dict(cooldown_s=60, hysteresis_s=30, max_retries=2, retry_backoff_s=0.5, min_tokens_per_s=2.0)
    settings_.update(overrides)
    return ChatPolicy(default_chain(), **settings_)


def gib(x: float) -> int:
    return int(x * GiB)


# -- choosing --------------------------------------------------------------------------------------------------


def test_candidates_come_from_the_catalog_with_declared_footprints() -> None:
    chain = default_chain()
    assert [c.key for c in chain] == [BIG, MID, LLAMA, TINY]
    assert chain[0] == Candidate(BIG, "lmstudio", 3, 32768, 5600 * MiB, frozenset({"chat", "tools"}))
    cfg = load_config(env={})
    assert Candidate.from_spec(cfg.model(TINY), footprint_bytes=700 * MiB).footprint_bytes == 700 * MiB


def test_picks_the_best_tier_that_fits() -> None:
    choice = make_policy().choose(LOTS, BOTH, now=0)
    assert choice.key == BIG
    assert choice.reason == "best usable model (tier 3)"


def test_no_known_gpu_limit_means_everything_fits() -> None:
    assert make_policy().choose(None, BOTH, now=0).key == BIG


def test_falls_down_the_chain_as_vram_shrinks() -> None:
    policy, current = make_policy(), None
    picks = []
    for t, grantable in enumerate([gib(6), gib(3.1), gib(2.7), gib(2.0), gib(0.5)]):
        choice = policy.choose(grantable, BOTH, now=t, current=current)
        current = choice.key
        picks.append(current)
    # Each step down happens at once: a model that no longer fits cannot wait out the hysteresis.
    assert picks == [BIG, MID, MID, TINY, None]


def test_nothing_usable_is_a_choice_of_none_with_every_reason() -> None:
    choice = make_policy().choose(gib(0.5), Availability(frozenset({"ollama"})), now=0)
    assert choice == Choice(
        None,
        "no chat model is usable",
        (
            (BIG, "LM Studio unreachable; needs 5.5 GiB, 0.5 GiB grantable"),
            (MID, "LM Studio unreachable; needs 2.5 GiB, 0.5 GiB grantable"),
            (LLAMA, "needs 2.7 GiB, 0.5 GiB grantable"),
            (TINY, "needs 0.8 GiB, 0.5 GiB grantable"),
        ),
    )


def test_unreachable_backend_falls_back_to_the_other_one() -> None:
    choice = make_policy().choose(LOTS, Availability(frozenset({"ollama"})), now=0)
    assert choice.key == LLAMA
    assert dict(choice.rejected)[BIG] == "LM Studio unreachable"


def test_models_not_installed_are_skipped_only_when_the_list_is_known() -> None:
    installed = Availability(frozenset({"lmstudio", "ollama"}), installed=frozenset({LLAMA, TINY}))
    choice = make_policy().choose(LOTS, installed, now=0)
    assert choice.key == LLAMA
    assert dict(choice.rejected)[BIG] == "not installed"
    unknown = Availability(frozenset({"lmstudio", "ollama"}), installed=None)
    assert make_policy().choose(LOTS, unknown, now=0).key == BIG


def test_rejected_says_why_each_other_model_was_not_chosen() -> None:
    choice = make_policy().choose(gib(3.1), BOTH, now=0)
    assert choice.key == MID
    assert choice.rejected == (
        (BIG, "needs 5.5 GiB, 3.1 GiB grantable"),
        (LLAMA, "same tier as qwen2.5-3b-instruct, later in the chain"),
        (TINY, "lower tier (1) than qwen2.5-3b-instruct (2)"),
    )


def test_a_learned_footprint_replaces_the_declared_one() -> None:
    policy = make_policy()
    policy.learn_footprint(BIG, gib(2.9))  # it really needed less than declared
    assert policy.choose(gib(3.1), BOTH, now=0).key == BIG


def test_same_tier_ties_break_on_failures_then_speed_then_chain_order() -> None:
    policy = make_policy()
    budget = gib(3.1)  # MID and LLAMA (both tier 2) fit, BIG does not
    assert policy.choose(budget, BOTH, now=0).key == MID  # chain order

    policy.record_success(LLAMA, now=1, tokens_per_s=40.0)
    policy.record_success(MID, now=1, tokens_per_s=25.0)
    choice = make_policy_choice_fresh(policy, budget, now=2)
    assert choice.key == LLAMA
    assert dict(choice.rejected)[MID] == "same tier as llama3.2:3b, slower (25.0 vs 40.0 tokens/s)"

    policy.record_failure(LLAMA, Reason.PREDICTION_FAILED, now=3)
    choice = make_policy_choice_fresh(policy, budget, now=4)
    assert choice.key == MID
    assert dict(choice.rejected)[LLAMA] == "same tier as qwen2.5-3b-instruct, 1 recent failure"


def make_policy_choice_fresh(policy: ChatPolicy, grantable: int, now: float) -> Choice:
    """A choice as for a fresh start (no current model, so no hysteresis)."""
    return policy.choose(grantable, BOTH, now=now, current=None)


# -- failures --------------------------------------------------------------------------------------------------


def test_failures_retry_with_backoff_then_cool_down_and_the_chain_moves_on() -> None:
    policy = make_policy()  # max_retries=2, retry_backoff_s=0.5, cooldown_s=60
    assert policy.choose(LOTS, BOTH, now=0).key == BIG
    assert policy.record_failure(BIG, Reason.PREDICTION_FAILED, now=10) == FailureVerdict(True, 0.5, None)
    assert policy.record_failure(BIG, Reason.PREDICTION_FAILED, now=11) == FailureVerdict(True, 1.0, None)
    assert policy.record_failure(BIG, Reason.PREDICTION_FAILED, now=12) == FailureVerdict(False, 0.0, 72.0)

    choice = policy.choose(LOTS, BOTH, now=12, current=BIG)
    assert choice.key == MID
    assert choice.reason == "switched from qwen2.5-7b-instruct: cooling down 60 s after: prediction failed"
    assert dict(choice.rejected)[BIG] == "cooling down 60 s after: prediction failed"
    assert policy.cooling_down(now=30) == {BIG: 42.0}

    # Cooled down: BIG is usable again and, being a better tier, comes back once MID has served its hysteresis.
    assert policy.cooling_down(now=72) == {}
    assert policy.choose(LOTS, BOTH, now=72, current=MID).key == MID  # fits again only since this reading
    assert policy.choose(LOTS, BOTH, now=102, current=MID).key == BIG


def test_repeated_cool_downs_double_up_to_ten_times() -> None:
    policy = make_policy(max_retries=0, cooldown_s=60)
    lengths = []
    now = 0.0
    for _ in range(6):
        verdict = policy.record_failure(MID, "prediction_failed", now=now)
        assert not verdict.retry_same
        lengths.append(verdict.cooldown_until - now)
        now = verdict.cooldown_until
    assert lengths == [60, 120, 240, 480, 600, 600]

    policy.record_success(MID, now=now, tokens_per_s=None)  # a success forgets the streak
    assert policy.record_failure(MID, "prediction_failed", now=now).cooldown_until == now + 60


def test_a_success_resets_the_retry_count() -> None:
    policy = make_policy()
    assert policy.record_failure(MID, Reason.TIMEOUT, now=0).delay_s == 0.5
    assert policy.record_failure(MID, Reason.TIMEOUT, now=1).delay_s == 1.0
    policy.record_success(MID, now=2, tokens_per_s=30.0)
    assert policy.record_failure(MID, Reason.TIMEOUT, now=3) == FailureVerdict(True, 0.5, None)


def test_a_missing_model_or_a_memory_refusal_is_not_retried() -> None:
    policy = make_policy()
    assert policy.record_failure(BIG, Reason.MODEL_NOT_FOUND, now=0) == FailureVerdict(False, 0.0, 60.0)
    assert policy.record_failure(MID, "out_of_memory", now=0) == FailureVerdict(False, 0.0, 60.0)
    choice = policy.choose(LOTS, BOTH, now=1)
    assert choice.key == LLAMA
    assert dict(choice.rejected)[BIG] == "cooling down 59 s after: model not found"


def test_a_failure_reason_may_be_a_sentence() -> None:
    policy = make_policy(max_retries=0)
    policy.record_failure(BIG, "LM Studio closed the prediction channel", now=0)
    assert dict(policy.choose(LOTS, BOTH, now=0).rejected)[BIG] == (
        "cooling down 60 s after: LM Studio closed the prediction channel"
    )


def test_unknown_models_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        make_policy().record_failure("gpt-5", "prediction_failed", now=0)
    with pytest.raises(InvalidRequest):
        ChatPolicy([], cooldown_s=1, hysteresis_s=1, max_retries=1, retry_backoff_s=1, min_tokens_per_s=1)


# -- manual switch ---------------------------------------------------------------------------------------------


def test_a_pinned_model_wins_while_it_is_usable() -> None:
    policy = make_policy()
    choice = policy.choose(LOTS, BOTH, now=0, current=BIG, pinned=TINY)
    assert choice.key == TINY  # at once: a manual switch does not wait for hysteresis
    assert choice.reason == "pinned by mai switch"
    assert dict(choice.rejected)[BIG] == "qwen2.5:0.5b is pinned by mai switch"


def test_an_unusable_pin_falls_back_to_the_normal_choice_and_says_why() -> None:
    policy = make_policy()
    choice = policy.choose(gib(3.1), BOTH, now=0, pinned=BIG)
    assert choice.key == MID
    assert choice.reason == (
        "pinned qwen2.5-7b-instruct is not usable (needs 5.5 GiB, 3.1 GiB grantable); best usable model (tier 2)"
    )
    assert policy.choose(gib(3.1), BOTH, now=1, pinned="no-such-model").reason.startswith(
        "pinned no-such-model is not usable (not in the chat chain)"
    )


# -- hysteresis and speed --------------------------------------------------------------------------------------


def test_switching_up_waits_for_hysteresis_switching_down_does_not() -> None:
    policy = make_policy(hysteresis_s=30)
    assert policy.choose(gib(3.1), BOTH, now=0).key == MID

    choice = policy.choose(LOTS, BOTH, now=10, current=MID)  # the VLM unloaded: BIG fits now
    assert choice.key == MID
    assert choice.reason == "keeping qwen2.5-3b-instruct: a better model waits for hysteresis"
    assert dict(choice.rejected)[BIG] == "better, but qwen2.5-3b-instruct has been in use only 10 s of 30 s"

    choice = policy.choose(LOTS, BOTH, now=35, current=MID)  # MID in use 35 s, but BIG fitted only for 25 s
    assert choice.key == MID
    assert dict(choice.rejected)[BIG] == "better, but usable only for 25 s of 30 s"

    choice = policy.choose(LOTS, BOTH, now=40, current=MID)
    assert choice.key == BIG
    assert choice.reason == "upgrade from qwen2.5-3b-instruct: usable for 30 s"

    # The VLM is back one second later: BIG no longer fits, so down at once.
    assert policy.choose(gib(3.1), BOTH, now=41, current=BIG).key == MID


def test_a_better_model_must_fit_in_every_reading_before_an_upgrade() -> None:
    policy = make_policy(hysteresis_s=30)
    assert policy.choose(gib(3.1), BOTH, now=0).key == MID
    for t in range(40, 200, 10):  # the reading flaps: BIG fits every other time
        grantable = LOTS if t % 20 == 0 else gib(3.1)
        assert policy.choose(grantable, BOTH, now=t, current=MID).key == MID


def test_an_upgrade_may_stop_at_a_steady_model_below_a_flapping_one() -> None:
    policy = make_policy(hysteresis_s=30)
    assert policy.choose(gib(1), BOTH, now=0).key == TINY
    for t in range(0, 31, 10):  # MID fits steadily from t=0; BIG only at t=30
        grantable = LOTS if t == 30 else gib(3.1)
        choice = policy.choose(grantable, BOTH, now=t + 1, current=TINY)
    assert choice.key == MID
    assert dict(choice.rejected)[BIG] == "better, but usable only for 0 s of 30 s"


def test_too_slow_is_a_reason_to_switch_at_once() -> None:
    policy = make_policy(min_tokens_per_s=2.0)
    assert policy.choose(LOTS, BOTH, now=0).key == BIG
    policy.record_success(BIG, now=5, tokens_per_s=1.2)  # say, half of it spilled to the CPU
    assert policy.too_slow(BIG)
    choice = policy.choose(LOTS, BOTH, now=6, current=BIG)
    assert choice.key == MID
    assert choice.reason == "switched from qwen2.5-7b-instruct: too slow (1.2 tokens/s, minimum 2)"
    assert dict(choice.rejected)[BIG] == "too slow: 1.2 tokens/s, minimum 2"


def test_a_too_slow_model_is_still_better_than_none() -> None:
    policy = make_policy()
    policy.record_success(TINY, now=0, tokens_per_s=0.5)
    choice = policy.choose(gib(1), BOTH, now=1, current=TINY)
    assert choice.key == TINY
    assert "nothing else is usable" in choice.reason


def test_speed_is_a_moving_average_and_old_measurements_are_forgotten() -> None:
    policy = make_policy(min_tokens_per_s=2.0, memory_s=600)
    policy.record_success(BIG, now=0, tokens_per_s=30.0)
    policy.record_success(BIG, now=1, tokens_per_s=1.0)
    assert policy.learned_speed(BIG) == pytest.approx(15.5)  # one slow reply is not a verdict
    assert not policy.too_slow(BIG)
    for t in range(2, 6):
        policy.record_success(BIG, now=t, tokens_per_s=1.0)
    assert policy.too_slow(BIG)
    assert policy.choose(LOTS, BOTH, now=10).key == MID
    # Ten minutes on, the GPU may be less crowded: BIG gets another chance.
    assert policy.choose(LOTS, BOTH, now=700).key == BIG
    assert not make_policy(min_tokens_per_s=0).too_slow(BIG)


# -- no flapping (property) ------------------------------------------------------------------------------------

# Readings in which at least one model fits (from no model to some model is not a flap: nothing was running).
readings = st.lists(st.sampled_from([gib(1), gib(3.1), gib(6), None]), min_size=2, max_size=2, unique=True)


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=readings,
    gaps=st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=1, max_size=60),
    hysteresis_s=st.floats(min_value=1.0, max_value=60.0),
)
def test_alternating_readings_change_the_model_at_most_once(
    pair: list[int | None], gaps: list[float], hysteresis_s: float
) -> None:
    """Readings that flap between two values (the VLM loading and unloading, say) never make the model flap:
    after the first choice the model changes at most once, whatever the timing."""
    policy = make_policy(hysteresis_s=hysteresis_s)
    now, current, picks = 0.0, None, []
    for step, gap in enumerate(gaps):
        now += gap
        current = policy.choose(pair[step % 2], BOTH, now=now, current=current).key
        picks.append(current)
    changes = sum(1 for a, b in zip(picks, picks[1:]) if a != b)
    assert changes <= 1


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0.1, max_value=50.0), st.sampled_from([gib(0.5), gib(1), gib(3.1), gib(6)])),
        min_size=1,
        max_size=60,
    ),
    hysteresis_s=st.floats(min_value=1.0, max_value=60.0),
)
def test_a_switch_up_only_after_hysteresis_on_steady_readings(
    steps: list[tuple[float, int]], hysteresis_s: float
) -> None:
    """Any readings: a change away from a model that still fits is an upgrade, which needs the old model in use
    for hysteresis_s and the new one fitting in every reading of the last hysteresis_s."""
    policy = make_policy(hysteresis_s=hysteresis_s)
    footprint = {c.key: c.footprint_bytes for c in policy.chain}
    now, current, since, history = 0.0, None, 0.0, []
    for gap, grantable in steps:
        now += gap
        history.append((now, grantable))
        key = policy.choose(grantable, BOTH, now=now, current=current).key
        if current is not None and key != current and footprint[current] <= grantable:
            assert now - since >= hysteresis_s
            fitting_since = now
            for t, g in reversed(history):  # the run of readings, up to now, in which the new model fits
                if footprint[key] > g:
                    break
                fitting_since = t
            assert now - fitting_since >= hysteresis_s
        if key != current:
            since = now
        current = key
