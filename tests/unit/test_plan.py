"""The planner, scenario by scenario: what the GPU gate does next, and why (see `mai.core.plan`'s docstring)."""

from __future__ import annotations

import pytest

from mai.core.chat_gate import grantable_bytes, mode_claims_bytes
from mai.core.plan import (
    CONFIRM_FREE,
    LOAD_VLM,
    MOVE_CLIP_CPU,
    MOVE_CLIP_GPU,
    READ_VRAM,
    UNLOAD_VLM,
    YIELD_CHAT,
    Demand,
    Goal,
    ModePolicy,
    World,
    plan_steps,
    resolve_vlm,
)
from messages.errors import MaiError, Reason

GIB = 2**30
MIB = 2**20
AUTOPILOT = ModePolicy("unloaded", "gpu")
RECORDING = ModePolicy("loaded", "cpu")
IDLE = ModePolicy("keep", "keep")


def world(**changes: object) -> World:
    """A 12 GiB GPU with 1 GiB used by others, a 6 GiB VLM and a 0.6 GiB CLIP, reserve 0.5 GiB."""
    base = dict(
        vlm_model="qwen2.5vl:7b", vlm_state="unloaded", vlm_footprint_bytes=6 * GIB, clip_placement="cpu",
        clip_footprint_bytes=600 * MIB, reserve_bytes=512 * MIB, gpu=True, free_bytes=11 * GIB,
    )
    base.update(changes)
    return World(**base)  # type: ignore[arg-type]


def kinds(plan) -> list[str]:
    return [s.kind for s in plan.steps]


# --- the modes ----------------------------------------------------------------------------------------------------


def test_recording_moves_clip_off_the_gpu_confirms_then_loads_the_vlm():
    plan = plan_steps(world(clip_placement="gpu", free_bytes=10 * GIB), RECORDING, Demand())
    assert kinds(plan) == [MOVE_CLIP_CPU, CONFIRM_FREE, LOAD_VLM]
    assert plan.describe() == ("move CLIP to cpu", "confirm VRAM recovered", "load qwen2.5vl:7b")
    assert plan.next_step.kind == MOVE_CLIP_CPU


def test_autopilot_unloads_confirms_then_moves_clip_to_the_gpu():
    plan = plan_steps(world(vlm_state="loaded", free_bytes=5 * GIB), AUTOPILOT, Demand())
    assert kinds(plan) == [UNLOAD_VLM, CONFIRM_FREE, MOVE_CLIP_GPU]
    assert plan.steps[0].nbytes == 6 * GIB and plan.steps[0].cause == "mode"


def test_idle_changes_nothing():
    assert plan_steps(world(vlm_state="loaded", clip_placement="gpu"), IDLE, Demand()).done


def test_a_reached_mode_has_an_empty_plan():
    assert plan_steps(world(vlm_state="loaded"), RECORDING, Demand()).done
    assert plan_steps(world(clip_placement="gpu"), AUTOPILOT, Demand()).done


def test_an_unload_alone_is_still_confirmed():
    """Invariant 4: even with nothing to allocate next, the sampler confirms the VRAM came back."""
    plan = plan_steps(world(vlm_state="loaded", clip_placement="gpu"), ModePolicy("unloaded", "keep"), Demand())
    assert kinds(plan) == [UNLOAD_VLM, CONFIRM_FREE]


def test_a_finished_unload_is_confirmed_before_anything_else():
    plan = plan_steps(world(unconfirmed_bytes=6 * GIB, unconfirmed_vlm=True), AUTOPILOT, Demand())
    assert kinds(plan) == [CONFIRM_FREE, MOVE_CLIP_GPU]


def test_freed_clip_bytes_are_confirmed_only_when_an_allocation_relies_on_them():
    w = world(unconfirmed_bytes=600 * MIB)
    assert kinds(plan_steps(w, RECORDING, Demand())) == [CONFIRM_FREE, LOAD_VLM]
    assert plan_steps(w, IDLE, Demand()).done


# --- on demand, and who yields ----------------------------------------------------------------------------------


def test_a_lease_in_autopilot_loads_the_vlm_next_to_clip_when_both_fit():
    plan = plan_steps(world(clip_placement="gpu", free_bytes=10 * GIB), AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == [LOAD_VLM]
    assert plan.vlm_goal == Goal("loaded", "demand")


def test_clip_yields_to_the_cpu_when_vlm_and_clip_do_not_both_fit():
    tight = world(clip_placement="gpu", free_bytes=6 * GIB)  # 6 GiB free + 0.6 GiB CLIP - 0.5 reserve
    plan = plan_steps(tight, AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == [MOVE_CLIP_CPU, CONFIRM_FREE, LOAD_VLM]
    assert plan.clip_goal == Goal("cpu", "yield")
    assert "CLIP yields to the CPU" in plan.notes[0]


def test_clip_keeps_its_place_when_yielding_would_not_make_the_vlm_fit():
    plan = plan_steps(world(clip_placement="gpu", free_bytes=4 * GIB), AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == []
    (refusal,) = plan.refusals
    assert refusal.kind == LOAD_VLM and refusal.needed_bytes == 6 * GIB and refusal.free_bytes == 4 * GIB
    assert refusal.evictable == ("clip",) and refusal.cause == "demand"
    assert "load qwen2.5vl:7b needs 6.0 GB, 4.0 GB free with 0.5 GB reserved; could yield: clip" == refusal.message


def test_a_pinned_clip_does_not_yield_and_the_load_is_refused_instead():
    plan = plan_steps(world(clip_placement="gpu", free_bytes=6 * GIB), AUTOPILOT, Demand(on_demand=1, clip_pin="gpu"))
    assert kinds(plan) == [] and plan.refusals[0].kind == LOAD_VLM


def test_a_stale_estimate_is_read_again_before_anything_is_refused():
    """Never refuse on a guess: the estimate undercounts free VRAM until a reading shows what was freed."""
    plan = plan_steps(world(free_bytes=4 * GIB, uncertain_bytes=3 * GIB), RECORDING, Demand())
    assert kinds(plan) == [READ_VRAM] and not plan.refusals
    hopeless = plan_steps(world(free_bytes=4 * GIB, uncertain_bytes=1 * GIB), RECORDING, Demand())
    assert kinds(hopeless) == [] and hopeless.refusals  # no reading could make 6 GiB fit


def test_the_mode_refuses_a_load_that_does_not_fit_and_names_nothing_to_evict():
    plan = plan_steps(world(free_bytes=5 * GIB), RECORDING, Demand())
    assert plan.refusals[0].evictable == () and plan.refusals[0].cause == "mode"
    assert not plan.done


def test_clip_stays_on_the_cpu_next_to_a_loaded_vlm_it_does_not_fit_beside():
    plan = plan_steps(world(vlm_state="loaded", free_bytes=500 * MIB), ModePolicy("keep", "gpu"), Demand())
    assert plan.done and plan.clip_goal == Goal("cpu", "yield")


def test_a_pinned_clip_that_does_not_fit_is_refused_naming_the_vlm():
    plan = plan_steps(world(vlm_state="loaded", free_bytes=500 * MIB), IDLE, Demand(clip_pin="gpu"))
    assert plan.refusals[0].kind == MOVE_CLIP_GPU and plan.refusals[0].evictable == ("vlm",)
    assert plan.refusals[0].cause == "pin"


# --- the chat model yields to the mode ---------------------------------------------------------------------------


def test_the_chat_model_yields_when_the_vlm_fits_only_with_its_bytes():
    plan = plan_steps(world(free_bytes=4 * GIB, chat_model="qwen3:8b", chat_bytes=5 * GIB), RECORDING, Demand())
    assert kinds(plan) == [YIELD_CHAT, CONFIRM_FREE, LOAD_VLM] and not plan.refusals
    yield_step = plan.steps[0]
    assert yield_step.description == "yield chat qwen3:8b for load qwen2.5vl:7b" and yield_step.cause == "mode"
    assert yield_step.nbytes == 5 * GIB and yield_step.short_bytes == 6 * GIB - (4 * GIB - 512 * MIB)


def test_the_chat_model_keeps_its_bytes_when_the_vlm_fits_without_them():
    plan = plan_steps(world(chat_model="qwen3:8b", chat_bytes=5 * GIB), RECORDING, Demand())
    assert kinds(plan) == [LOAD_VLM]


def test_a_stale_estimate_is_read_again_before_the_chat_model_is_evicted():
    stale = world(free_bytes=4 * GIB, uncertain_bytes=3 * GIB, chat_model="qwen3:8b", chat_bytes=5 * GIB)
    assert kinds(plan_steps(stale, RECORDING, Demand())) == [READ_VRAM]
    # ...and when only a reading plus the yield could make room, the reading comes first too.
    both = world(free_bytes=1 * GIB, uncertain_bytes=3 * GIB, chat_model="qwen3:8b", chat_bytes=3 * GIB)
    assert kinds(plan_steps(both, RECORDING, Demand())) == [READ_VRAM]


def test_clip_keeps_its_place_when_the_chat_models_bytes_make_room_for_an_on_demand_vlm():
    w = world(clip_placement="gpu", free_bytes=4 * GIB, chat_model="qwen3:4b", chat_bytes=3 * GIB)
    plan = plan_steps(w, AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == [YIELD_CHAT, CONFIRM_FREE, LOAD_VLM]
    assert plan.clip_goal == Goal("gpu", "mode") and plan.steps[0].cause == "demand"


def test_clip_and_the_chat_model_both_yield_when_neither_alone_makes_room():
    w = world(clip_placement="gpu", free_bytes=4 * GIB + 512 * MIB, chat_model="qwen3:1.7b", chat_bytes=1536 * MIB)
    plan = plan_steps(w, AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == [MOVE_CLIP_CPU, YIELD_CHAT, CONFIRM_FREE, LOAD_VLM]
    assert plan.clip_goal == Goal("cpu", "yield")


def test_the_chat_model_yields_for_clip_in_autopilot():
    plan = plan_steps(world(free_bytes=800 * MIB, chat_model="qwen3:1.7b", chat_bytes=1200 * MIB), AUTOPILOT, Demand())
    assert kinds(plan) == [YIELD_CHAT, CONFIRM_FREE, MOVE_CLIP_GPU]
    assert plan.steps[0].short_bytes == 600 * MIB - (800 * MIB - 512 * MIB)


def test_a_refusal_names_the_chat_model_among_what_could_yield():
    plan = plan_steps(world(free_bytes=3 * GIB, chat_model="qwen3:1.7b", chat_bytes=GIB), RECORDING, Demand())
    (refusal,) = plan.refusals
    assert refusal.evictable == ("chat qwen3:1.7b",) and kinds(plan) == []
    assert refusal.message.endswith("could yield: chat qwen3:1.7b")


def test_without_a_gpu_the_chat_model_never_yields():
    plan = plan_steps(world(gpu=False, free_bytes=GIB, chat_model="qwen3:8b", chat_bytes=5 * GIB), RECORDING, Demand())
    assert kinds(plan) == [LOAD_VLM]


def test_a_waiting_chat_load_gets_freed_bytes_confirmed_first():
    w = world(unconfirmed_bytes=600 * MIB)
    assert plan_steps(w, IDLE, Demand()).done
    assert kinds(plan_steps(w, IDLE, Demand(chat_load_waiting=True))) == [CONFIRM_FREE]


def test_the_chat_agent_gets_a_reading_once_the_mode_has_nothing_to_send():
    w = world(uncertain_bytes=GIB)
    plan = plan_steps(w, IDLE, Demand(chat_needs_reading=True))
    assert kinds(plan) == [READ_VRAM] and plan.steps[0].cause == "chat"
    assert kinds(plan_steps(w, RECORDING, Demand(chat_needs_reading=True))) == [LOAD_VLM]  # the mode first
    down = world(uncertain_bytes=GIB, down={"vlm": "Ollama unreachable"})
    assert kinds(plan_steps(down, RECORDING, Demand(chat_needs_reading=True))) == [READ_VRAM, LOAD_VLM]


# --- what the gate can grant a chat model (mai.core.chat_gate) --------------------------------------------------------


def test_grantable_is_free_less_reserve_less_the_modes_claims_plus_the_chat_models_own_bytes():
    w = world(chat_model="qwen3:4b", chat_bytes=3 * GIB)
    plan = plan_steps(w, RECORDING, Demand())
    assert mode_claims_bytes(w, plan) == 6 * GIB
    assert grantable_bytes(w, plan) == 11 * GIB - 512 * MIB - 6 * GIB + 3 * GIB


def test_clip_on_its_way_to_the_gpu_is_claimed_too():
    w = world()
    assert grantable_bytes(w, plan_steps(w, AUTOPILOT, Demand())) == 11 * GIB - 512 * MIB - 600 * MIB


def test_claims_hold_for_blocked_steps_but_not_for_refused_ones():
    blocked = world(retry_wait={LOAD_VLM: "load_failed: boom; retry after 5 s"})
    assert mode_claims_bytes(blocked, plan_steps(blocked, RECORDING, Demand())) == 6 * GIB
    down = world(down={"vlm": "Ollama unreachable"})  # issue 12, hole 6: a part that is down claims nothing
    assert mode_claims_bytes(down, plan_steps(down, RECORDING, Demand())) == 0
    refused = world(free_bytes=5 * GIB)
    plan = plan_steps(refused, RECORDING, Demand())
    assert plan.refusals and grantable_bytes(refused, plan) == 5 * GIB - 512 * MIB


def test_freed_bytes_count_and_the_grantable_is_never_negative():
    assert grantable_bytes(world(free_bytes=GIB, unconfirmed_bytes=GIB), plan_steps(world(), IDLE, Demand())) == \
        2 * GIB - 512 * MIB
    tiny = world(free_bytes=100 * MIB)
    assert grantable_bytes(tiny, plan_steps(tiny, IDLE, Demand())) == 0


def test_grantable_is_the_host_reading_without_a_gpu_and_zero_without_a_reading():
    # Issue 12, hole 7: never unlimited; without a GPU reading the host memory reading (psutil) bounds chat.
    no_gpu = world(gpu=False, free_bytes=6 * GIB)
    assert grantable_bytes(no_gpu, plan_steps(no_gpu, IDLE, Demand())) == 6 * GIB - 512 * MIB
    unread = world(gpu=None, free_bytes=None)
    assert grantable_bytes(unread, plan_steps(unread, IDLE, Demand())) == 0


# --- what blocks a step -------------------------------------------------------------------------------------------


def test_older_leases_block_the_unload_but_stay_in_the_plan():
    plan = plan_steps(world(vlm_state="loaded", free_bytes=5 * GIB), AUTOPILOT, Demand(leases_held=1))
    assert kinds(plan) == [UNLOAD_VLM, CONFIRM_FREE, MOVE_CLIP_GPU]
    assert plan.steps[0].blocked == "waiting for 1 lease(s) to end" and plan.next_step is None
    assert plan.describe()[0] == "unload qwen2.5vl:7b (waiting for 1 lease(s) to end)"


def test_unknown_state_waits_for_an_observation():
    plan = plan_steps(world(vlm_state="unknown"), RECORDING, Demand())
    assert plan.steps[0].kind == LOAD_VLM and "unknown" in plan.steps[0].blocked


def test_an_unknown_part_is_never_refused_on_a_reading_that_may_hold_its_own_bytes():
    # A restarted coordinator: the VLM (or CLIP) may be loaded already, its bytes counted as used in the reading.
    vlm = plan_steps(world(vlm_state="unknown", free_bytes=4 * GIB), RECORDING, Demand())
    assert vlm.refusals == () and vlm.steps[-1].kind == LOAD_VLM and "unknown" in vlm.steps[-1].blocked
    clip = plan_steps(world(clip_placement="unknown", free_bytes=256 * MIB), AUTOPILOT, Demand())
    assert clip.refusals == () and clip.steps[-1].kind == MOVE_CLIP_GPU and "unknown" in clip.steps[-1].blocked


def test_nothing_moves_before_the_first_vram_reading():
    plan = plan_steps(world(gpu=None, free_bytes=None, vlm_state="loaded"), AUTOPILOT, Demand())
    assert plan.next_step is None and plan.steps[0].blocked == "waiting for the first VRAM reading"


def test_a_part_that_is_down_blocks_its_steps_with_the_reason():
    plan = plan_steps(world(down={"vlm": "Ollama unreachable"}), RECORDING, Demand())
    assert plan.steps[0].blocked == "vlm unavailable: Ollama unreachable"


def test_a_part_down_since_the_start_says_why_rather_than_that_its_state_is_unknown():
    # Ollama unreachable when Mai starts: the loader never observed the VLM; `mai mode` names the cause to fix.
    plan = plan_steps(world(vlm_state="unknown", down={"vlm": "Ollama at http://127.0.0.1:11434 is unreachable"}),
                      RECORDING, Demand())
    (load,) = [s for s in plan.steps if s.kind == LOAD_VLM]
    assert load.blocked == "vlm unavailable: Ollama at http://127.0.0.1:11434 is unreachable"


def test_autopilot_without_ollama_still_puts_clip_on_the_gpu():
    # Never seen and unreachable: there is nothing known to unload, and no way to; CLIP is fitted against the reading.
    down = {"vlm": "Ollama at http://127.0.0.1:11434 is unreachable"}
    plan = plan_steps(world(vlm_state="unknown", clip_placement="cpu", down=down), AUTOPILOT, Demand())
    assert [s.kind for s in plan.steps] == [MOVE_CLIP_GPU] and plan.next_step is not None
    assert any("no VLM unload" in note for note in plan.notes)
    # Known to be loaded when Ollama went away: its unload waits for Ollama, and CLIP waits behind it (its bytes).
    plan = plan_steps(world(vlm_state="loaded", clip_placement="cpu", down=down), AUTOPILOT, Demand())
    assert plan.steps[0].kind == UNLOAD_VLM and plan.next_step is None


def test_a_failed_step_waits_for_its_retry():
    plan = plan_steps(world(retry_wait={LOAD_VLM: "load_failed: boom; retry after 5 s"}), RECORDING, Demand())
    assert plan.next_step is None and "retry after" in plan.steps[0].blocked


# --- without a GPU ---------------------------------------------------------------------------------------------


def test_without_a_gpu_clip_stays_on_the_cpu_and_the_vlm_loads_without_a_fit_check():
    no_gpu = world(gpu=False, free_bytes=1 * GIB, clip_placement="cpu")
    plan = plan_steps(no_gpu, AUTOPILOT, Demand(on_demand=1))
    assert kinds(plan) == [LOAD_VLM] and plan.clip_goal == Goal("cpu", "no_gpu")


def test_when_the_gpu_goes_away_clip_comes_back_to_the_cpu_without_a_confirm():
    plan = plan_steps(world(gpu=False, clip_placement="gpu"), AUTOPILOT, Demand())
    assert kinds(plan) == [MOVE_CLIP_CPU]


# --- goals ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("demand", "policy", "goal"),
    [
        (Demand(on_demand=1, ensure_unloaded=1, idle_due=True), AUTOPILOT, Goal("loaded", "demand")),
        (Demand(ensure_unloaded=1), RECORDING, Goal("unloaded", "ensure")),
        (Demand(idle_due=True, grace=True), RECORDING, Goal("unloaded", "idle")),
        (Demand(grace=True), AUTOPILOT, Goal("keep", "grace")),
        (Demand(policy_suspended=True), RECORDING, Goal("keep", "idle")),
        (Demand(leases_held=2), AUTOPILOT, Goal("unloaded", "mode")),  # older leases drain; they are not demand
        (Demand(), IDLE, Goal("keep", "mode")),
    ],
)
def test_vlm_goal_precedence(demand, policy, goal):
    assert resolve_vlm(policy, demand) == goal


def test_mode_policy_rejects_unknown_values_with_what_is_accepted():
    with pytest.raises(MaiError) as err:
        ModePolicy("sometimes", "gpu")
    assert err.value.reason == Reason.INVALID_CONFIG and "loaded, unloaded, keep" in str(err.value)


# --- a part that is down, or not heard from yet, blocks only what needs it (issue 12, holes 1 and 6) ---------------


def test_a_clip_that_is_down_and_not_on_the_gpu_needs_no_move_and_recording_loads_the_vlm():
    # The mover could not create the model (no weights): it reported the failure before its placement.
    down = {"clip": "CLIP model 'ViT-B-32' unavailable: no weights; retrying in 5 s"}
    plan = plan_steps(world(clip_placement="unknown", down=down), RECORDING, Demand())
    assert kinds(plan) == [LOAD_VLM] and plan.next_step.kind == LOAD_VLM
    assert plan_steps(world(clip_placement="cpu", down=down), RECORDING, Demand()).next_step.kind == LOAD_VLM


def test_a_clip_not_heard_from_yet_does_not_hold_back_a_vlm_load_that_fits_without_it():
    # A fresh mover starts on the CPU; the reading shows whatever a CLIP on the GPU would hold.
    plan = plan_steps(world(clip_placement="unknown"), RECORDING, Demand())
    assert plan.next_step is not None and plan.next_step.kind == LOAD_VLM
    assert plan.steps[0].kind == MOVE_CLIP_CPU and plan.steps[0].blocked  # still shown until the mover reports
    assert not plan.done


def test_a_vlm_load_that_fits_only_if_an_unheard_clip_leaves_the_gpu_waits_rather_than_being_refused():
    plan = plan_steps(world(clip_placement="unknown", free_bytes=6 * GIB), RECORDING, Demand())
    assert not plan.refusals and plan.next_step is None
    assert plan.holding_step.kind == LOAD_VLM and "CLIP placement unknown" in plan.holding_step.blocked


def test_a_blocked_step_that_frees_counted_bytes_still_holds_back_what_relies_on_them():
    down = {"clip": "CLIP mover gone"}
    plan = plan_steps(world(clip_placement="gpu", free_bytes=5 * GIB, down=down), RECORDING, Demand())
    assert plan.next_step is None and plan.holding_step.kind == MOVE_CLIP_CPU


def test_a_part_that_is_down_claims_and_keeps_no_room_from_chat():
    # 12 GiB, no Ollama: the 6 GiB the VLM cannot use are the chat model's to take (it yields when Ollama is back).
    down = world(down={"vlm": "Ollama unreachable"}, chat_min_bytes=1280 * MIB, chat_leaves_room=True)
    for policy in (RECORDING, AUTOPILOT, IDLE):  # CLIP's room is claimed (AUTOPILOT) or kept (off the GPU) alike
        assert grantable_bytes(down, plan_steps(down, policy, Demand())) == 11 * GIB - 512 * MIB - 600 * MIB, policy
    clip_down = world(down={"clip": "no weights"}, chat_min_bytes=1280 * MIB, chat_leaves_room=True)
    plan = plan_steps(clip_down, AUTOPILOT, Demand())
    assert mode_claims_bytes(clip_down, plan) == 0 and grantable_bytes(clip_down, plan) == 11 * GIB - 512 * MIB - 6 * GIB


def test_nothing_yields_is_refused_or_read_again_for_a_part_that_is_down():
    down = world(free_bytes=3 * GIB, chat_model="qwen3:8b", chat_bytes=5 * GIB, uncertain_bytes=GIB,
                 down={"vlm": "Ollama unreachable"})
    plan = plan_steps(down, RECORDING, Demand())
    assert kinds(plan) == [LOAD_VLM] and not plan.refusals and plan.steps[0].blocked.startswith("vlm unavailable")
    clip_down = world(free_bytes=GIB // 2, chat_model="qwen3:8b", chat_bytes=5 * GIB, down={"clip": "no weights"})
    plan = plan_steps(clip_down, AUTOPILOT, Demand())
    assert kinds(plan) == [MOVE_CLIP_GPU] and not plan.refusals and plan.steps[0].blocked.startswith("clip unavailable")
