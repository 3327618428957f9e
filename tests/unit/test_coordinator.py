"""The coordinator core, behaviour by behaviour (DESIGN §3-5). Most scenarios run in `mai.sim.world`: a
simulated GPU, Ollama, CLIP mover and sampler in virtual time, so each test reads as a short story."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from mai.core.coordinator import (
    Coordinator,
    CoordinatorSettings,
    Log,
    ModePolicy,
    PersistFootprint,
    Publish,
    Reply,
    SendStep,
    Tick,
    WakeAt,
)
from messages.conversation import ChatGrant, ChatLoaded, ChatNeeds, ChatUnloaded, ChatYield, GetGrantable, Grantable
from messages.errors import Reason
from messages.events import (
    Degraded,
    IdleUnloaded,
    ModeChanged,
    ModelSwitched,
    PlacementChanged,
    PlanRefused,
    Recovered,
    ResourceChanged,
)
from messages.requests import (
    AcquireLease,
    ClipPlaced,
    EnsureVlm,
    GetStatus,
    LeaseGranted,
    LeaseReleased,
    ModeAccepted,
    ModeReached,
    PlaceClip,
    ReleaseLease,
    SetMode,
    VlmReady,
)
from messages.resources import VramSnapshot
from messages.status import Status
from messages.steps import (
    ClipObserved,
    LoadVlm,
    MoveClip,
    UnloadVlm,
    VlmLoaded,
    VlmObserved,
    VramReading,
    WaitVramFree,
)
from mai.sim.world import DEFAULT_CHAT_MODELS, GIB, MIB, SimWorld, Timings

MODEL = "qwen2.5vl:7b"
HOST = "http://127.0.0.1:11434"


def settings(*, grace: float | None = None, drain: float = 10.0, idle: float = 300.0, **changes) -> CoordinatorSettings:
    base = dict(
        modes={
            "autopilot": ModePolicy("unloaded", "gpu", drain, grace),
            "recording": ModePolicy("loaded", "cpu", drain),
            "idle": ModePolicy("keep", "keep", drain),
        },
        default_mode="idle", vlm_model=MODEL, vlm_host=HOST, num_ctx=8192, vlm_declared_bytes=6 * GIB,
        clip_declared_bytes=600 * MIB, reserve_bytes=512 * MIB, idle_timeout_s=idle, default_lease_ttl_s=120.0,
    )
    base.update(changes)
    return CoordinatorSettings(**base)


def world(cfg: CoordinatorSettings | None = None, **kw) -> SimWorld:
    kw.setdefault("gpu_total_bytes", 12 * GIB)
    kw.setdefault("vlm_true_bytes", 5 * GIB)
    return SimWorld(cfg or settings(), **kw)


def step_names(w: SimWorld) -> list[str]:
    names = []
    for m in w.sent():
        if isinstance(m, MoveClip):
            names.append(f"clip->{m.device}")
        elif isinstance(m, WaitVramFree):
            names.append("confirm" if m.expected_bytes else "read")
        else:
            names.append(type(m).__name__)
    return names


# --- modes ------------------------------------------------------------------------------------------------------------


def test_recording_moves_clip_to_cpu_confirms_then_loads_the_vlm():
    w = world(clip_device="gpu")
    reached = w.ask(SetMode("r1", "recording", wait=True), within_s=30)
    assert isinstance(reached, ModeReached) and reached.mode == "recording"
    assert step_names(w) == ["clip->cpu", "confirm", "LoadVlm"]
    assert reached.steps == ("move CLIP to cpu", "confirm VRAM recovered", f"load {MODEL}")
    (changed,) = w.events_of(ModeChanged)
    assert (changed.mode, changed.previous, changed.steps) == ("recording", "idle", reached.steps)
    assert changed.duration_s == pytest.approx(0.05 + 4.0)  # the CLIP move, then the 4 s load


def test_autopilot_unloads_confirms_the_vram_came_back_then_moves_clip_to_gpu():
    w = world(vlm_loaded=True, initial_mode="recording")
    w.ask(SetMode("a1", "autopilot", wait=True), within_s=30)
    assert step_names(w)[-3:] == ["UnloadVlm", "confirm", "clip->gpu"]
    confirm = w.sent(WaitVramFree)[-1]
    assert confirm.expected_bytes == 5 * GIB  # the footprint learned from what Ollama reported at start
    assert (confirm.fraction, confirm.timeout_s) == (0.75, 5.0)
    assert confirm.baseline_free_bytes == w.ledger.total_bytes - 5 * GIB  # free before the unload
    assert w.core.mode == "autopilot" and w.clip.placement == "gpu" and w.vlm.state == "unloaded"


def test_set_mode_without_wait_is_accepted_at_once_with_the_plan():
    w = world(clip_device="gpu")
    accepted = w.ask(SetMode("r1", "recording"))
    assert accepted == ModeAccepted("r1", "recording", ("move CLIP to cpu", "confirm VRAM recovered", f"load {MODEL}"))
    assert w.core.mode == "idle" and w.core.target_mode == "recording"
    w.advance(30)
    assert w.core.mode == "recording"


def test_a_mode_with_nothing_to_do_is_reached_at_once():
    w = world()
    assert isinstance(w.ask(SetMode("i1", "idle", wait=True)), ModeReached)
    assert not w.events_of(ModeChanged)  # the mode did not change


def test_unknown_mode_is_refused_naming_the_modes_there_are():
    w = world()
    failure = w.ask(SetMode("x", "dancing"))
    assert failure.reason == Reason.INVALID_REQUEST
    assert "autopilot, idle, recording" in failure.message


def test_last_writer_wins_and_the_step_in_flight_is_not_interrupted():
    w = world()
    w.send(SetMode("r1", "recording", wait=True), "alice")
    assert isinstance(w.core.step_in_flight, LoadVlm)
    w.advance(1.0)
    w.send(SetMode("a1", "autopilot", wait=True), "bob")
    superseded = w.reply("r1")
    assert superseded.reason == Reason.SUPERSEDED
    assert len(w.steps) == 1  # still only the load: nothing sent while it is in flight
    w.advance(30)
    assert step_names(w) == ["LoadVlm", "read", "UnloadVlm", "confirm", "clip->gpu"]
    assert isinstance(w.reply("a1"), ModeReached) and w.core.mode == "autopilot"


def test_requests_during_a_step_only_change_the_target():
    w = world()
    w.send(SetMode("r1", "recording"))
    for n, mode in enumerate(["autopilot", "idle", "recording", "autopilot", "recording"]):
        w.send(SetMode(f"m{n}", mode), f"client-{n}")
    assert len(w.steps) == 1 and w.core.target_mode == "recording"
    w.advance(30)
    assert step_names(w) == ["LoadVlm"] and w.core.mode == "recording"


# --- leases, on demand, drain, grace, idle ---------------------------------------------------------------------------


def test_a_lease_in_autopilot_loads_the_vlm_on_demand():
    w = world(initial_mode="autopilot", clip_device="gpu")
    granted = w.ask(AcquireLease("l1", "loop", ttl_s=60), within_s=30)
    assert granted == LeaseGranted("l1", "lease-l1", MODEL, HOST, 8192, 60.0)
    assert w.vlm.state == "loaded" and w.clip.placement == "gpu"  # 12 GiB: both fit, CLIP stays
    assert w.events_of(PlacementChanged)[-1] == PlacementChanged("vlm", "loaded", "demand", at=w.now)


@pytest.mark.parametrize("read_s", [0.0, None], ids=["reading after the load", "that reading lost"])
def test_after_the_last_lease_autopilot_unloads_and_clip_returns(read_s):
    w = world(settings(vlm_declared_bytes=5 * GIB), initial_mode="autopilot", clip_device="gpu",
              gpu_total_bytes=6 * GIB, timings=Timings(read_s=read_s))
    w.ask(AcquireLease("l1", "loop"), within_s=30)
    # 5 + 0.6 GiB do not fit in 6 - 0.5: CLIP yields to the CPU, and stays there while the VLM is in use.
    assert step_names(w) == ["clip->cpu", "confirm", "LoadVlm"]
    assert any("CLIP yields" in f["note"] for f in w.logs_of("plan.note"))
    w.advance(5)
    assert not w.events_of(PlanRefused) and len(w.steps) == 3
    released = w.ask(ReleaseLease("rel", "lease-l1"))
    assert isinstance(released, LeaseReleased) and released.held_s == pytest.approx(5.0)
    w.advance(10)
    if read_s is None:  # the unload's confirmation is measured against a real reading, taken first
        assert step_names(w)[3:] == ["read", "UnloadVlm", "confirm", "clip->gpu"]
    else:  # the reading the coordinator asked for when the load completed is that baseline
        assert step_names(w)[3:] == ["UnloadVlm", "confirm", "clip->gpu"]
    confirm = w.sent(WaitVramFree)[-1]
    assert confirm.baseline_free_bytes == 1 * GIB  # 6 GiB less the loaded VLM, as read: never a guess
    assert w.clip.placement == "gpu"


def test_grace_keeps_an_on_demand_vlm_a_while_after_the_last_lease():
    w = world(settings(grace=5.0, keep_coresident_vlm=False), initial_mode="autopilot", clip_device="gpu")
    w.ask(AcquireLease("l1", "loop"), within_s=30)
    w.ask(ReleaseLease("rel", "lease-l1"))
    w.advance(4.9)
    assert w.vlm.state == "loaded"
    w.advance(1.0)
    assert w.vlm.state == "unloaded"
    # `mai events` and the log say why: the grace ran out (not "mode": AUTOPILOT was entered long before).
    last = w.events_of(PlacementChanged)[-1]
    assert (last.component, last.state, last.reason) == ("vlm", "unloaded", "grace_ended")
    assert w.logs_of("vlm.unloaded")[-1]["reason"] == "grace_ended"


def test_an_on_demand_vlm_that_fits_beside_clip_stays_until_the_idle_timeout():
    w = world(settings(grace=5.0, idle=60.0), initial_mode="autopilot", clip_device="gpu")
    w.ask(AcquireLease("l1", "loop"), within_s=30)
    w.ask(ReleaseLease("rel", "lease-l1"))
    w.advance(30)
    assert w.vlm.state == "loaded" and w.clip.placement == "gpu"  # 6 + 0.6 GiB fit in 12: no reload next call
    w.advance(31)
    assert w.vlm.state == "unloaded" and w.events_of(IdleUnloaded)


def test_the_grace_applies_when_clip_had_to_yield_to_the_vlm():
    w = world(settings(grace=5.0, vlm_declared_bytes=5 * GIB), initial_mode="autopilot", clip_device="gpu",
              gpu_total_bytes=6 * GIB)
    w.ask(AcquireLease("l1", "loop"), within_s=30)
    w.ask(ReleaseLease("rel", "lease-l1"))
    assert w.clip.placement == "cpu"
    w.advance(10)
    assert w.vlm.state == "unloaded" and w.clip.placement == "gpu"  # CLIP has its place back after the grace


def test_a_lease_released_as_autopilot_is_asked_was_the_old_modes_demand():
    w = world(settings(grace=60.0), initial_mode="recording", vlm_loaded=True)
    w.ask(AcquireLease("l1", "describer"), within_s=5)
    w.send(ReleaseLease("rel", "lease-l1"))
    w.send(SetMode("a1", "autopilot"))  # the same instant: no grace, the VLM goes (invariant 1)
    w.advance(10)
    assert w.vlm.state == "unloaded" and w.clip.placement == "gpu"


def test_never_unload_while_a_lease_is_held_then_drain_is_bounded():
    w = world(settings(drain=10.0), initial_mode="recording", vlm_loaded=True)
    w.ask(AcquireLease("l1", "describer", ttl_s=120), within_s=5)
    w.advance(1)
    w.send(SetMode("a1", "autopilot", wait=True))
    status = w.core.status("s", w.now)
    assert status.plan[0] == f"unload {MODEL} (waiting for 1 lease(s) to end)"
    w.advance(9.9)
    assert not w.sent(UnloadVlm)
    w.advance(0.2)
    (revoked,) = w.logs_of("lease.revoked")
    assert revoked["lease_id"] == "lease-l1" and revoked["reason"] == "drain"
    assert w.sent(UnloadVlm)
    w.advance(10)
    assert isinstance(w.reply("a1"), ModeReached)


def test_a_lease_released_during_the_drain_lets_the_unload_go_at_once():
    w = world(initial_mode="recording", vlm_loaded=True)
    w.ask(AcquireLease("l1", "describer"), within_s=5)
    w.send(SetMode("a1", "autopilot"))
    w.advance(2)
    w.ask(ReleaseLease("rel", "lease-l1"))
    assert w.sent(UnloadVlm) and not w.logs_of("lease.revoked")


def test_a_lease_expires_at_its_ttl():
    w = world(initial_mode="recording", vlm_loaded=True)
    w.ask(AcquireLease("l1", "loop", ttl_s=3), within_s=1)
    w.advance(3)
    assert w.logs_of("lease.expired")[0]["lease_id"] == "lease-l1"
    assert w.core.status("s", w.now).vlm.leases == 0
    assert isinstance(w.ask(ReleaseLease("late", "lease-l1")), LeaseReleased)  # idempotent after expiry


def test_idle_timeout_unloads_and_recording_waits_for_new_demand():
    w = world(settings(idle=60.0), initial_mode="recording", vlm_loaded=True)
    w.advance(59)
    assert w.vlm.state == "loaded"
    w.advance(2)
    assert w.vlm.state == "unloaded"
    (idle,) = w.events_of(IdleUnloaded)
    assert idle.model == MODEL and idle.idle_s == pytest.approx(60, abs=0.5)
    w.advance(600)
    assert len(w.sent(LoadVlm)) == 0  # "loaded" is not re-applied by itself
    w.ask(SetMode("r2", "recording", wait=True), within_s=30)  # a new SetMode is new demand
    assert w.vlm.state == "loaded"


def test_idle_timer_counts_from_the_last_lease():
    w = world(settings(idle=60.0), initial_mode="recording", vlm_loaded=True)
    w.advance(50)
    w.ask(AcquireLease("l1", "loop", ttl_s=30), within_s=1)
    w.advance(40)  # the lease expired at 80; idle from then
    assert w.vlm.state == "loaded"
    w.advance(60)
    assert w.vlm.state == "unloaded"


# --- ensure ---------------------------------------------------------------------------------------------------------


def test_ensure_loaded_answers_only_once_loaded():
    w = world()
    w.send(EnsureVlm("e1", True))
    assert w.reply("e1") is None
    w.advance(4.0)
    assert w.reply("e1") == VlmReady("e1", True, MODEL, 5 * GIB)


def test_ensure_unloaded_answers_after_the_vram_is_confirmed_back():
    w = world(vlm_loaded=True)
    w.send(EnsureVlm("e1", False))
    w.advance(0.45)
    assert w.vlm.state == "unloaded" and w.reply("e1") is None  # unloaded, not yet confirmed
    w.advance(1)
    assert w.reply("e1") == VlmReady("e1", False, MODEL, 0)


@pytest.mark.parametrize(("waiting", "sender"), [
    (EnsureVlm("w1", True, timeout_s=2), "client"),
    (ChatNeeds("w1", DEFAULT_CHAT_MODELS[2].key, DEFAULT_CHAT_MODELS[2].footprint_bytes, timeout_s=2), "chat"),
])
def test_every_waiter_times_out_with_a_reason(waiting, sender):
    w = world(timings=Timings(vlm_load_s=30))
    w.send(SetMode("r1", "recording"))  # a 30 s load holds the gate
    w.send(waiting, sender)
    w.advance(1.99)
    assert w.reply("w1") is None
    w.advance(0.02)
    failure = w.reply("w1")
    assert failure.reason == Reason.TIMEOUT and f"pending: load {MODEL}" in failure.message


# --- fit (invariant 12) ---------------------------------------------------------------------------------------------


def test_a_load_that_does_not_fit_is_refused_with_bytes_and_what_could_yield():
    w = world(gpu_total_bytes=8 * GIB, external_bytes=3 * GIB, clip_device="gpu", initial_mode="autopilot")
    failure = w.ask(AcquireLease("l1", "loop"), within_s=10)
    assert failure.reason == Reason.INSUFFICIENT_VRAM
    details = dict(failure.details)
    assert int(details["needed_bytes"]) == 6 * GIB and int(details["free_bytes"]) == 8 * GIB - 3 * GIB - 600 * MIB
    assert "clip" in details["evictable"]
    assert not w.sent(LoadVlm)  # never attempted blind
    (refused,) = w.events_of(PlanRefused)
    assert refused.needed_bytes == 6 * GIB
    degraded = dict(w.core.status("s", w.now).degraded)
    assert degraded["gpu"].startswith("VRAM short: load qwen2.5vl:7b needs 6.0 GB")


def test_a_mode_whose_load_does_not_fit_is_not_reached_until_vram_frees_up():
    w = world(gpu_total_bytes=8 * GIB, external_bytes=3 * GIB)
    failure = w.ask(SetMode("r1", "recording", wait=True), within_s=10)
    assert failure.reason == Reason.INSUFFICIENT_VRAM and w.core.mode == "idle"
    assert len(w.events_of(PlanRefused)) == 1
    w.advance(60)
    assert len(w.events_of(PlanRefused)) == 1  # published once, not on every re-plan
    w.set_external_bytes(0)
    w.advance(10)
    assert w.core.mode == "recording" and w.vlm.state == "loaded"
    assert isinstance(w.events_of(Recovered)[-1], Recovered)
    assert "gpu" not in dict(w.core.status("s", w.now).degraded)


def test_the_measured_footprint_replaces_the_declared_one_and_is_persisted():
    w = world(vlm_true_bytes=5 * GIB)
    assert w.core.status("s", w.now).vlm.footprint_learned is False
    w.ask(EnsureVlm("e1", True), within_s=10)
    w.advance(0.5)  # the reading asked for after the load
    assert w.persisted == {f"{MODEL}@8192": 5 * GIB}  # per model and context length
    status = w.core.status("s", w.now).vlm
    assert status.footprint_bytes == 5 * GIB and status.footprint_learned


def test_learned_footprints_from_the_state_dir_are_used_from_the_start():
    core = Coordinator(settings(), 0.0, learned_footprints={f"{MODEL}@8192": 4 * GIB})
    assert core.status("s", 0.0).vlm.footprint_bytes == 4 * GIB


def test_old_format_footprints_are_read_but_not_planned_with():
    """Before issue 11 the file held Ollama's size_vram under the bare name: it leaves out the runner's CUDA context
    (real-servers.md O19), so the declared footprint stays until a load is measured."""
    core = Coordinator(settings(), 0.0, learned_footprints={MODEL: 4 * GIB, f"{MODEL}@4096": 5 * GIB})
    status = core.status("s", 0.0).vlm
    assert status.footprint_bytes == 6 * GIB and not status.footprint_learned  # 8192 is configured, not 4096
    (ignored,) = [e for e in core.handle(Tick(), None, 0.0) if isinstance(e, Log) and e.event == "footprint.ignored"]
    assert ignored.fields["keys"] == [MODEL]


def test_a_partial_offload_is_logged_and_not_learned():
    core = Coordinator(settings(), 0.0)
    core.handle(VramReading("w", VramSnapshot(12 * GIB, 0, 12 * GIB, "nvml", "gpu", 0.0), None), "sampler", 0.0)
    core.handle(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip", 0.0)
    core.handle(VlmObserved(MODEL, False), "vlm", 0.0)
    (send,) = [e for e in core.handle(EnsureVlm("e1", True), "c", 0.0) if isinstance(e, SendStep)]
    effects = core.handle(VlmLoaded(send.message.step_id, MODEL, 8 * GIB, 6 * GIB, 3.0), "vlm", 3.0)
    assert Log("vlm.partial_offload", {"size_bytes": 8 * GIB, "size_vram_bytes": 6 * GIB}) in effects
    assert not any(isinstance(e, PersistFootprint) for e in effects)


# --- failures and degraded mode -----------------------------------------------------------------------------------------


def test_a_failed_load_fails_its_waiters_and_is_not_retried_before_the_backoff():
    w = world()
    w.fail_next_loads(1)
    w.send(SetMode("r1", "recording"))
    failure = w.ask(EnsureVlm("e1", True), within_s=10)
    assert failure.reason == Reason.LOAD_FAILED and "failed" in failure.message
    assert len(w.sent(LoadVlm)) == 1
    w.advance(4.0)
    assert len(w.sent(LoadVlm)) == 1
    assert "retry after 5 s" in w.core.status("s", w.now).plan[0]
    w.advance(1.1)
    assert len(w.sent(LoadVlm)) == 2  # the mode's own load, retried after the backoff


def test_new_demand_retries_a_failed_load_at_once():
    w = world()
    w.fail_next_loads(1)
    w.ask(EnsureVlm("e1", True), within_s=10)
    assert isinstance(w.ask(AcquireLease("l1", "loop"), within_s=10), LeaseGranted)


def test_while_ollama_is_unreachable_vlm_requests_fail_fast_with_the_reason():
    w = world()
    w.set_ollama_reachable(False)
    failure = w.ask(AcquireLease("l1", "loop"))
    assert failure.reason == Reason.BACKEND_UNREACHABLE and "Ollama unreachable" in failure.message
    assert w.events_of(Degraded)[-1].part == "vlm"
    assert dict(w.core.status("s", w.now).degraded)["vlm"].startswith("Ollama unreachable")
    mode_failure = w.ask(SetMode("r1", "recording", wait=True))
    assert mode_failure.reason == Reason.BACKEND_UNREACHABLE and w.core.target_mode == "recording"
    w.set_ollama_reachable(True)
    w.advance(10)
    assert w.core.mode == "recording" and isinstance(w.events_of(Recovered)[-1], Recovered)


def test_without_a_gpu_clip_stays_on_the_cpu_and_nothing_is_confirmed():
    w = world(gpu_present=False, initial_mode="autopilot")
    failure = w.ask(PlaceClip("p1", "gpu"))
    assert failure.reason == Reason.NO_GPU
    assert isinstance(w.ask(AcquireLease("l1", "loop"), within_s=10), LeaseGranted)
    w.ask(ReleaseLease("rel", "lease-l1"))
    w.advance(10)
    assert step_names(w) == ["LoadVlm", "UnloadVlm"] and w.clip.placement == "cpu"
    assert w.core.mode == "autopilot"


def test_when_nvml_fails_clip_is_brought_back_to_the_cpu():
    w = world(initial_mode="autopilot", clip_device="gpu")
    w.set_gpu_healthy(False)
    w.advance(1)
    assert step_names(w) == ["clip->cpu"] and w.clip.placement == "cpu"
    assert dict(w.core.status("s", w.now).degraded)["gpu"].startswith("no GPU: GPU is lost; CUDA: ")


def test_an_incomplete_vram_recovery_is_logged_not_fatal():
    w = world(initial_mode="recording", vlm_loaded=True, timings=Timings(vlm_release_lag_s=7.0))
    w.ask(SetMode("a1", "autopilot", wait=True), within_s=30)
    assert w.logs_of("vram.recovery_incomplete")
    assert w.core.mode == "autopilot" and w.clip.placement == "gpu"


# --- manual CLIP placement -------------------------------------------------------------------------------------------


def test_place_clip_holds_until_the_next_mode_request():
    w = world(initial_mode="recording", vlm_loaded=True)
    assert w.ask(PlaceClip("p1", "gpu"), within_s=5) == ClipPlaced("p1", "sim-gpu")
    w.advance(60)
    assert w.clip.placement == "gpu"
    w.ask(SetMode("r2", "recording", wait=True), within_s=5)
    assert w.clip.placement == "cpu"


def test_a_newer_placement_supersedes_an_older_one():
    w = world(timings=Timings(clip_move_s=1.0))
    w.send(PlaceClip("p1", "gpu"))
    w.send(PlaceClip("p2", "cpu"))
    assert w.reply("p1").reason == Reason.SUPERSEDED
    w.advance(5)
    assert w.reply("p2") == ClipPlaced("p2", "cpu")


# --- the chat gate: chat model loads and unloads are steps of the same gate ------------------------------------------

BIG, MEDIUM, SMALL = DEFAULT_CHAT_MODELS  # qwen3:8b, qwen3:4b, qwen3:1.7b (asked for 5.5, 3 and 1.25 GiB)


def _policy_part(reply: object) -> object:
    """A Grantable without its room figure (tests/unit/test_chat_gate_room.py checks that one)."""
    return dataclasses.replace(reply, room_bytes=None)  # type: ignore[type-var]


def test_grantable_is_free_less_reserve_plus_what_the_chat_model_holds():
    w = world()
    assert _policy_part(w.ask(GetGrantable("g1"), "chat")) == Grantable("g1", 12 * GIB - 512 * MIB, None)
    w.chat_turn(want=1)
    w.advance(5)
    assert w.chat.current == MEDIUM and w.ledger.held("chat") == MEDIUM.true_bytes
    # Its load is in the estimate; a fresh reading first shows it once (no double count), and switching would give
    # its bytes back: the agent may take all of it again.
    assert _policy_part(w.ask(GetGrantable("g2"), "chat", within_s=1)) == Grantable("g2", 12 * GIB - 512 * MIB, MEDIUM.key)
    assert w.core.status("s", w.now).chat_model == MEDIUM.key


def test_grantable_leaves_out_what_the_mode_still_has_to_load():
    w = world(external_bytes=GIB)
    w.fail_next_loads(1)
    w.send(SetMode("r1", "recording"))
    w.advance(1)
    # The VLM load is blocked while it waits for its retry, but its 6 GiB stay promised to it.
    assert _policy_part(w.ask(GetGrantable("g1"), "chat")) == Grantable("g1", 12 * GIB - GIB - 512 * MIB - 6 * GIB, None)
    w.chat_turn(want=0)
    w.advance(5)
    assert w.chat.current == MEDIUM and not w.logs_of("chat.refused")  # 5.5 GiB do not fit in 4.5: 3 GiB do
    w.advance(10)
    assert w.vlm.state == "loaded" and not w.sent(ChatYield)  # the chat model left the VLM its room


def test_a_vlm_that_is_down_holds_no_room_back_and_the_chat_model_yields_when_it_is_back():
    # Issue 12, hole 6 (this test's Ollama-down half asserted the opposite before): a down part reserves nothing.
    w = world(external_bytes=GIB)
    w.set_ollama_reachable(False)
    w.send(SetMode("r1", "recording"))
    assert _policy_part(w.ask(GetGrantable("g1"), "chat")) == Grantable("g1", 12 * GIB - GIB - 512 * MIB, None)
    w.chat_turn(want=0)
    w.advance(5)
    assert w.chat.current == BIG and not w.logs_of("chat.refused")
    w.set_ollama_reachable(True)
    w.advance(10)
    assert w.vlm.state == "loaded" and w.sent(ChatYield) and w.chat.current is None


def test_a_chat_load_that_does_not_fit_is_refused_at_once_naming_the_grantable():
    w = world(gpu_total_bytes=8 * GIB, external_bytes=3 * GIB)
    w.send(ChatNeeds("c1", "huge", 6 * GIB), "chat")
    failure = w.reply("c1")
    assert failure.reason == Reason.INSUFFICIENT_VRAM
    details = dict(failure.details)
    assert int(details["needed_bytes"]) == 6 * GIB and int(details["free_bytes"]) == 5 * GIB - 512 * MIB
    assert details["evictable"] == "[]"  # nothing Mai holds yields to a chat model
    assert "chat model huge needs 6.0 GB, the GPU gate can grant 4.5 GB" in failure.message
    assert w.steps == []  # never attempted blind


def test_a_queued_chat_load_is_refused_on_a_reading_and_the_agent_chooses_a_smaller_model():
    w = world(gpu_total_bytes=16 * GIB)
    w.send(SetMode("r1", "recording"))  # the VLM load is in flight for 4 s
    w.chat_turn(want=0)
    assert w.logs_of("chat.grantable")[0]["grantable_bytes"] == 16 * GIB - 512 * MIB - 6 * GIB
    w.advance(1)
    w.set_external_bytes(5632 * MIB)  # another program takes VRAM while the 8b waits for the gate
    w.advance(2.9)
    assert w.vlm.state == "loading" and not w.logs_of("chat.refused")  # the reading may show the VLM's bytes: wait
    w.advance(10)
    (refused,) = w.logs_of("chat.refused")
    assert refused["model"] == BIG.key and refused["grantable_bytes"] == 16 * GIB - 5 * GIB - 5632 * MIB - 512 * MIB
    assert step_names(w) == ["LoadVlm", "read", "ChatGrant"] and w.chat.current == MEDIUM


def test_the_modes_steps_go_before_a_chat_load():
    w = world(clip_device="gpu")
    w.send(SetMode("r1", "recording", wait=True))
    w.chat_turn(want=2)
    w.advance(10)
    assert step_names(w) == ["clip->cpu", "confirm", "LoadVlm", "ChatGrant"]
    grant = w.steps[-1]
    assert grant.sent_at >= w.steps[-2].ended_at and w.chat.current == SMALL
    reached = w.reply("r1")
    assert isinstance(reached, ModeReached) and not any("chat" in s for s in reached.steps)


def test_a_chat_step_holds_the_gate_until_its_result():
    w = world(timings=Timings(chat_load_s=10.0))
    w.chat_turn(want=1)
    assert isinstance(w.core.step_in_flight, ChatGrant)
    w.send(SetMode("r1", "recording", wait=True))
    w.advance(9.9)
    assert step_names(w) == ["ChatGrant"]  # one VRAM operation at a time, chat included
    assert w.core.status("s", w.now).step_in_flight == f"load chat {MEDIUM.key}"
    w.advance(0.2)
    assert step_names(w)[-1] == "LoadVlm"
    w.advance(10)
    assert isinstance(w.reply("r1"), ModeReached)


def test_recording_asks_the_chat_model_to_yield_the_bytes_the_vlm_needs():
    w = world(gpu_total_bytes=10 * GIB)
    w.chat_turn(want=0, reply_s=1.0)
    w.advance(5)
    assert w.chat.current == BIG
    reached = w.ask(SetMode("r1", "recording", wait=True), within_s=30)
    assert isinstance(reached, ModeReached)
    # Never evict on a guess: the reading asked for when the chat load completed shows its bytes, so the yield,
    # its bytes confirmed, then the load.
    assert step_names(w) == ["ChatGrant", "ChatYield", "confirm", "LoadVlm"]
    (yielded,) = w.sent(ChatYield)
    assert yielded.needed_bytes == 6 * GIB - (10 * GIB - BIG.true_bytes - 512 * MIB)  # what the VLM lacks
    assert yielded.reason == f"yield chat {BIG.key} for load {MODEL} (mode recording)"
    assert f"yield chat {BIG.key} for load {MODEL}" in reached.steps
    assert w.chat.current is None and w.core.status("s", w.now).chat_model is None and w.vlm.state == "loaded"
    placements = [(e.component, e.state, e.reason) for e in w.events_of(PlacementChanged)]
    assert ("chat", "unloaded", "mode") in placements  # subscribers (`mai events`) see the yield too
    # The next turn gets what the VLM left.
    w.chat_turn(want=0)
    w.advance(10)
    assert w.chat.current == MEDIUM and w.vlm.state == "loaded"


def test_a_yield_waits_for_the_reply_in_progress():
    w = world(gpu_total_bytes=10 * GIB)
    w.chat_turn(want=0, reply_s=12.0)  # loaded at +2 s, replies until +14 s
    w.advance(3)
    w.send(SetMode("r1", "recording", wait=True))
    w.advance(5)
    assert isinstance(w.core.step_in_flight, ChatYield) and w.vlm.state == "unloaded"
    w.advance(20)
    unloaded = w.logs_of("chat.unloaded")[0]
    assert unloaded["reason"] == "mode" and unloaded["freed_bytes"] == BIG.true_bytes
    assert isinstance(w.reply("r1"), ModeReached) and w.vlm.state == "loaded"


def test_a_yield_not_answered_in_time_fails_the_mode_waiter_then_is_retried():
    w = world(settings(chat_yield_timeout_s=5.0), gpu_total_bytes=10 * GIB)
    w.chat_turn(want=0, reply_s=20.0)  # replies until +22 s: longer than the yield may take
    w.advance(3)
    failure = w.ask(SetMode("r1", "recording", wait=True), within_s=10)
    assert failure.reason == Reason.TIMEOUT and f"yield chat {BIG.key}" in failure.message
    assert "retry after 5 s" in w.core.status("s", w.now).plan[0]
    w.advance(30)
    assert len(w.sent(ChatYield)) == 2  # retried after the backoff
    assert w.core.mode == "recording" and w.vlm.state == "loaded" and w.chat.current is None


def test_a_lease_takes_the_chat_models_bytes_before_clips():
    w = world(gpu_total_bytes=8 * GIB, initial_mode="autopilot", clip_device="gpu")
    w.chat_turn(want=1)
    w.advance(5)
    granted = w.ask(AcquireLease("l1", "loop"), within_s=30)
    assert isinstance(granted, LeaseGranted)
    assert "ChatYield" in step_names(w) and "clip->cpu" not in step_names(w)  # Mai's own CLIP keeps its place
    assert w.clip.placement == "gpu" and w.chat.current is None


def test_a_refused_vlm_load_names_the_chat_model_that_could_not_make_room_alone():
    w = world(gpu_total_bytes=8 * GIB, external_bytes=3 * GIB)
    w.chat_turn(want=2)
    w.advance(5)
    failure = w.ask(SetMode("r1", "recording", wait=True), within_s=10)
    assert failure.reason == Reason.INSUFFICIENT_VRAM and f"chat {SMALL.key}" in dict(failure.details)["evictable"]
    assert not w.sent(ChatYield)  # no yield that would not make the load fit


def test_the_chat_agent_unloads_through_the_gate():
    w = world()
    w.chat_turn(want=1)
    w.advance(5)
    assert w.chat_unload()
    (grant,) = [m for m in w.sent(ChatGrant) if m.request_id.startswith("unload")]
    assert isinstance(w.core.step_in_flight, ChatGrant)
    w.advance(1)
    assert w.core.step_in_flight is None and w.core.status("s", w.now).chat_model is None
    assert w.logs_of("chat.unloaded")[-1] == {"model": MEDIUM.key, "freed_bytes": MEDIUM.true_bytes,
                                               "step_id": grant.step_id, "reason": "chat"}


def test_a_failed_chat_load_leaves_no_chat_model_and_the_next_turn_works():
    w = world()
    w.chat_turn(want=1)
    w.advance(5)
    w.fail_next_chat_loads(1)
    w.chat_turn(want=0)
    w.advance(5)
    assert w.chat.outcomes[-1][2] == "load failed"
    assert w.core.status("s", w.now).chat_model is None and w.core.step_in_flight is None
    w.chat_turn(want=0)
    w.advance(5)
    assert w.chat.current == BIG and w.core.status("s", w.now).chat_model == BIG.key


def test_a_newer_chat_request_supersedes_a_queued_one():
    w = world(timings=Timings(vlm_load_s=30.0))
    w.send(SetMode("r1", "recording"))
    w.send(ChatNeeds("c1", BIG.key, BIG.footprint_bytes), "chat")
    w.send(ChatNeeds("c2", SMALL.key, SMALL.footprint_bytes), "chat")
    assert w.reply("c1").reason == Reason.SUPERSEDED


def test_without_a_gpu_chat_is_bounded_by_the_host_memory_reading():
    # Issue 12, hole 7: never "unlimited"; the psutil reading (host memory) is what the fit check has.
    w = world(gpu_present=False)
    host = w.ledger.snapshot(w.now)
    assert _policy_part(w.ask(GetGrantable("g1"), "chat")) == Grantable("g1", host.free_bytes - 512 * MIB, None)
    w.chat_turn(want=0)
    w.advance(5)
    assert w.chat.current == BIG and w.ledger.held("chat") == 0
    assert w.core.status("s", w.now).chat_model == BIG.key


def test_get_grantable_waits_for_the_first_reading():
    core = Coordinator(settings(), 0.0)
    assert not [e for e in core.handle(GetGrantable("g1"), "chat", 0.0) if isinstance(e, Reply)]
    reading = VramReading("w", VramSnapshot(12 * GIB, GIB, 11 * GIB, "nvml", "gpu", 0.1), None)
    (reply,) = [e for e in core.handle(reading, "sampler", 0.1) if isinstance(e, Reply)]
    assert reply == Reply("chat", Grantable("g1", 11 * GIB - 512 * MIB, None, 11 * GIB - 512 * MIB))
    lonely = Coordinator(settings(), 0.0)
    lonely.handle(GetGrantable("g2"), "chat", 0.0)
    (late,) = [e for e in lonely.handle(Tick(), None, 5.0) if isinstance(e, Reply)]
    assert late == Reply("chat", Grantable("g2", 0, None, None))  # no reading in time: nothing can be vouched for


def test_a_late_chat_result_is_still_the_truth_about_what_the_agent_holds():
    core = Coordinator(settings(step_timeout_s=30.0), 0.0)
    core.handle(VramReading("w", VramSnapshot(12 * GIB, 0, 12 * GIB, "nvml", "gpu", 0.0), None), "sampler", 0.0)
    core.handle(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip", 0.0)
    core.handle(VlmObserved(MODEL, False), "vlm", 0.0)
    (grant,) = [e.message for e in core.handle(ChatNeeds("c1", "qwen3:4b", 3 * GIB), "chat", 0.0)
                if isinstance(e, Reply)]
    assert isinstance(grant, ChatGrant) and grant.grantable_bytes == 12 * GIB - 512 * MIB
    core.handle(Tick(), None, 30.0)  # given up: the agent never answered
    assert core.step_in_flight is None and core.status("s", 30.0).chat_model is None
    core.handle(ChatLoaded(grant.step_id, "qwen3:4b", 3 * GIB, 31.0), "chat", 31.0)
    assert core.status("s", 31.0).chat_model == "qwen3:4b"
    core.handle(ChatUnloaded("yield", "qwen3:4b"), "chat", 32.0)  # an unload outside a step is an observation
    assert core.status("s", 32.0).chat_model is None


def test_a_chat_model_leaves_the_vlm_and_clip_their_room_while_one_still_fits_beside_them():
    w = world(settings(chat_min_bytes=SMALL.footprint_bytes))
    w.chat_turn(want=0)
    w.advance(10)
    assert w.chat.current == MEDIUM  # 12 - 0.5 reserved - 6 VLM - 0.6 CLIP: the 4b fits beside them, the 8b does not
    w = world(settings(chat_min_bytes=SMALL.footprint_bytes, chat_leaves_room=False))
    w.chat_turn(want=0)
    w.advance(10)
    assert w.chat.current == BIG


def test_a_chat_turn_takes_an_idle_vlms_place_when_no_chat_model_fits_beside_it():
    # The VLM's 5 GiB were measured at an earlier load (Ollama's size_vram at start-up is no longer learned).
    w = world(settings(chat_min_bytes=SMALL.footprint_bytes), initial_mode="recording", vlm_loaded=True,
              gpu_total_bytes=8 * GIB, external_bytes=2 * GIB, learned_footprints={f"{MODEL}@8192": 5 * GIB})
    w.chat_turn(want=0, reply_s=5.0)
    w.advance(10)
    assert w.chat.outcomes == [(pytest.approx(w.now, abs=5), "turn-1", "replied")]
    assert step_names(w)[:3] == ["UnloadVlm", "confirm", "ChatGrant"]
    w.advance(30)  # after the reply, RECORDING takes its VLM back
    assert step_names(w)[-3:] == ["ChatYield", "confirm", "LoadVlm"] and w.vlm.state == "loaded"


def test_a_vlm_in_use_never_gives_its_place_to_chat():
    w = world(settings(chat_min_bytes=SMALL.footprint_bytes), initial_mode="recording", vlm_loaded=True,
              gpu_total_bytes=8 * GIB, external_bytes=2 * GIB)
    w.ask(AcquireLease("l1", "describer"), within_s=5)
    w.chat_turn(want=0)
    w.advance(10)
    assert w.chat.outcomes[-1][2] == "no model fits" and not w.sent(UnloadVlm) and w.vlm.state == "loaded"


# --- status, observations, odds and ends -------------------------------------------------------------------------------


def test_status_is_complete():
    w = world(initial_mode="recording")
    w.send(ModelSwitched(None, "qwen3:8b", "startup"), "chat")
    status = w.ask(GetStatus("s1"))
    assert isinstance(status, Status)
    # Restored into RECORDING at start: the mode is kept while its plan (the VLM load) runs.
    assert (status.mode, status.target_mode, status.reserve_bytes) == ("recording", "recording", 512 * MIB)
    assert status.vram.total_bytes == 12 * GIB and status.vram.source == "simulated"
    assert status.vlm.state == "loading" and status.vlm.host == HOST and status.vlm.footprint_bytes == 6 * GIB
    assert status.clip.device == "cpu" and status.clip.ready and status.clip.model == "ViT-B-32"
    assert status.chat_model == "qwen3:8b" and status.degraded == ()
    assert status.step_in_flight == f"load {MODEL}" and status.plan == ()
    assert status.to_dict()["vlm"]["partial_offload"] is False


def test_resource_changes_and_model_switches_go_to_subscribers():
    core = Coordinator(settings(), 0.0)
    event = ResourceChanged(VramSnapshot(12 * GIB, GIB, 11 * GIB, "nvml", "gpu", 1.0), GIB, at=1.0)
    assert Publish(event) in core.handle(event, "sampler", 1.0)
    switched = ModelSwitched(None, "qwen3:8b", "fits", at=2.0)
    assert Publish(switched) in core.handle(switched, "chat", 2.0)


def test_nothing_is_planned_before_the_world_has_been_observed():
    core = Coordinator(settings(), 0.0, initial_mode="recording")
    effects = core.handle(Tick(), None, 1.0)
    assert not any(isinstance(e, SendStep) for e in effects)
    plan = core.status("s", 1.0).plan
    assert plan[0] == "move CLIP to cpu (CLIP placement unknown: waiting for the mover's observation)"
    assert plan[-1] == f"load {MODEL} (VLM state unknown: waiting for the loader's observation)"


def test_a_stale_step_result_is_ignored():
    w = world()
    w.send(VlmLoaded("someone-elses-step", MODEL, 5 * GIB, 5 * GIB, 1.0), "vlm")
    assert w.logs_of("step.stale_result") and w.core.status("s", w.now).vlm.state == "unloaded"


def test_a_step_whose_result_never_comes_is_given_up_and_the_state_reobserved():
    core = Coordinator(settings(step_timeout_s=30.0), 0.0)
    core.handle(VramReading("w", VramSnapshot(12 * GIB, 0, 12 * GIB, "nvml", "gpu", 0.0), None), "sampler", 0.0)
    core.handle(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip", 0.0)
    core.handle(VlmObserved(MODEL, False), "vlm", 0.0)
    effects = core.handle(EnsureVlm("e1", True, timeout_s=60), "c", 0.0)
    assert isinstance(core.step_in_flight, LoadVlm) and WakeAt(30.0) in effects
    effects = core.handle(Tick(), None, 30.0)
    assert core.step_in_flight is None and core.status("s", 30.0).vlm.state == "unknown"
    failure = next(e.message for e in effects if isinstance(e, Reply))
    assert failure.reason == Reason.TIMEOUT


def test_a_wake_up_is_asked_for_the_next_deadline_and_extra_ticks_are_harmless():
    w = world(initial_mode="recording", vlm_loaded=True)
    effects = w.core.handle(AcquireLease("l1", "loop", ttl_s=30, timeout_s=10), "c", w.now)
    assert WakeAt(w.now + 30) in effects  # the lease's expiry comes before the 300 s idle timer
    before = len(w.steps)
    for _ in range(5):
        assert not [e for e in w.core.handle(Tick(), None, w.now) if isinstance(e, (SendStep, Reply, Publish))]
    assert len(w.steps) == before


def test_unknown_messages_are_answered_or_logged():
    core = Coordinator(settings(), 0.0)

    @dataclass(frozen=True)
    class Dance:
        request_id: str

    (reply,) = core.handle(Dance("d1"), "c", 0.0)
    assert reply.message.reason == Reason.INVALID_REQUEST and "accepted: SetMode" in reply.message.message
    assert core.handle(object(), "c", 0.0) == [Log("coordinator.unknown_message", {"type": "object"})]


def test_a_restored_mode_that_no_longer_exists_falls_back_to_the_default():
    core = Coordinator(settings(), 0.0, initial_mode="gone")
    assert core.mode == "idle"
    assert Log("mode.restore_ignored", {"mode": "gone", "using": "idle"}) in core.handle(Tick(), None, 0.0)


def test_settings_from_config():
    row = lambda vlm, clip, grace=None: SimpleNamespace(vlm=vlm, clip=clip, lease_drain_timeout_s=10, vlm_grace_s=grace)
    cfg = SimpleNamespace(
        modes=SimpleNamespace(default="idle", table={"autopilot": row("unloaded", "gpu", 5), "idle": row("keep", "keep")}),
        ollama=SimpleNamespace(vlm_model=MODEL, host=HOST, num_ctx=8192, vlm_footprint_mb=6000, idle_timeout_s=300,
                               lease_ttl_s=120, vram_recovery_timeout_s=5, vram_recovery_fraction=0.75),
        clip=SimpleNamespace(footprint_mb=None),
        gpu=SimpleNamespace(reserve_mb=512),
    )
    s = CoordinatorSettings.from_config(cfg)
    assert s.modes["autopilot"] == ModePolicy("unloaded", "gpu", 10.0, 5.0)
    assert (s.vlm_declared_bytes, s.clip_declared_bytes, s.reserve_bytes) == (6000 * MIB, 600 * MIB, 512 * MIB)
    assert s.default_mode == "idle" and s.idle_timeout_s == 300.0


@pytest.mark.parametrize("override, leaves_room", [(None, True), ("false", False)])
def test_chat_leave_room_for_agent_comes_from_the_config(override, leaves_room):
    from config.loader import load_config

    env = {"MAI_CHAT__LEAVE_ROOM_FOR_AGENT": override} if override else {}
    s = CoordinatorSettings.from_config(load_config(env=env))
    assert s.chat_leaves_room is leaves_room  # the default keeps the agent's room; false gives chat the best fit


def test_settings_reject_a_default_mode_that_is_not_in_the_table():
    with pytest.raises(Exception) as err:
        settings(default_mode="nope")
    assert "default_mode" in str(err.value)
