"""Evictions Mai did not ask for (issue 11, item 4; real-servers.md O9-O11): Ollama drops the pinned VLM on its own;
the coordinator says so (`evicted_by_ollama`), re-plans toward the mode without a restart, backs off when the reload
keeps being evicted, and asks the loader to look again after any out-of-memory failure."""

from __future__ import annotations

from mai.core.coordinator import Coordinator, ReobserveVlm, SendStep
from messages.conversation import ChatNeeds
from messages.errors import Reason
from messages.events import Degraded, PlacementChanged, Recovered
from messages.failure import Failure
from messages.requests import AcquireLease, SetMode
from messages.resources import VramSnapshot
from messages.steps import ClipObserved, LoadVlm, StepFailed, VlmObserved, VramReading
from tests.unit.test_coordinator import GIB, MIB, MODEL, settings, step_names, world


def _evictions(w) -> list[PlacementChanged]:
    return [e for e in w.events_of(PlacementChanged) if e.reason == "evicted_by_ollama"]


def test_an_eviction_in_recording_is_published_and_the_vlm_reloaded():
    w = world(initial_mode="recording", vlm_loaded=True)
    w.advance(1)
    loads = len(w.sent(LoadVlm))
    w.evict_vlm()
    w.advance(10)
    (event,) = _evictions(w)
    assert (event.component, event.state) == ("vlm", "unloaded")
    assert len(w.sent(LoadVlm)) == loads + 1 and w.vlm.state == "loaded" and w.core.mode == "recording"
    assert step_names(w)[-2:] == ["confirm", "LoadVlm"]  # its bytes come back late (O7): confirmed first
    assert w.logs_of("vlm.evicted")[0]["reason"] == "evicted_by_ollama"


def test_a_held_leases_model_is_reloaded_in_autopilot():
    w = world(initial_mode="autopilot")
    w.advance(1)
    granted = w.ask(AcquireLease("l1", "loop", ttl_s=600), within_s=20)
    assert granted.lease_id and w.vlm.state == "loaded"
    w.evict_vlm()
    w.advance(15)
    assert len(_evictions(w)) == 1 and w.vlm.state == "loaded"
    assert w.core.status("s", w.now).vlm.leases == 1


def test_a_vlm_the_mode_does_not_want_is_not_reloaded():
    w = world(initial_mode="idle", vlm_loaded=True)
    w.advance(1)
    w.evict_vlm()
    w.advance(20)
    assert len(_evictions(w)) == 1 and not w.sent(LoadVlm) and w.vlm.state == "unloaded"


def test_a_reload_that_keeps_being_evicted_backs_off_and_says_so():
    w = world(initial_mode="recording", vlm_loaded=True)
    w.advance(1)
    for _ in range(3):
        w.evict_vlm()
        w.advance(10)
    loads = len(w.sent(LoadVlm))
    assert w.vlm.state == "unloaded"  # the third eviction: no reload for eviction_backoff_s
    w.advance(15)  # 25 s after the third eviction
    assert len(w.sent(LoadVlm)) == loads
    degraded = dict(w.core.status("s", w.now).degraded)
    assert "evicted qwen2.5vl:7b 3 times" in degraded["vlm"]
    assert any(isinstance(e, Degraded) and e.part == "vlm" for e in w.events_of(Degraded))
    assert "evicted" in " ".join(w.core.status("s", w.now).plan)  # the pending load says why it waits
    w.advance(15)  # the 30 s backoff is over, and the reload takes 4 s
    assert w.vlm.state == "loaded" and "vlm" not in dict(w.core.status("s", w.now).degraded)
    assert w.events_of(Recovered)[-1].part == "vlm"


def test_a_new_set_mode_retries_at_once():
    w = world(initial_mode="recording", vlm_loaded=True)
    w.advance(1)
    for _ in range(3):
        w.evict_vlm()
        w.advance(10)
    assert w.vlm.state == "unloaded"
    w.ask(SetMode("m1", "recording", wait=True), within_s=15)
    assert w.vlm.state == "loaded"


def test_an_ollama_oom_on_a_chat_load_makes_the_loader_look_again_and_the_vlm_comes_back():
    """O10: Ollama evicts every model after a load's OOM and tells no one; the loader sees it when asked."""
    w = world(initial_mode="recording", vlm_loaded=True, gpu_total_bytes=16 * GIB)
    w.advance(1)
    w.fail_next_chat_loads(oom=True)
    w.chat_turn(want=2)
    w.advance(20)
    assert w.logs_of("vlm.reobserve")[0]["reason"] == "out_of_memory"
    assert len(_evictions(w)) == 1 and w.vlm.state == "loaded"


def _core_with_a_step(kind: str) -> tuple[Coordinator, str]:
    core = Coordinator(settings(), 0.0)
    core.handle(VramReading("w", VramSnapshot(12 * GIB, 0, 12 * GIB, "nvml", "gpu", 0.0), None), "sampler", 0.0)
    core.handle(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip", 0.0)
    core.handle(VlmObserved(MODEL, False), "vlm", 0.0)
    if kind == "vlm":
        effects = core.handle(SetMode("m", "recording"), "c", 0.0)
        (send,) = [e for e in effects if isinstance(e, SendStep)]
        return core, send.message.step_id
    effects = core.handle(ChatNeeds("n", "llama3.2:3b", 2 * GIB, context_length=4096), "agent", 0.0)
    return core, core._inflight.step_id


def test_an_oom_on_any_load_asks_the_loader_to_look_again_and_other_failures_do_not():
    for kind in ("vlm", "chat"):
        for reason, expected in ((Reason.INSUFFICIENT_VRAM, True), (Reason.OUT_OF_MEMORY, True),
                                 (Reason.LOAD_FAILED, False)):
            core, step_id = _core_with_a_step(kind)
            effects = core.handle(StepFailed(step_id, Failure(step_id, reason, "cudaMalloc failed")), "x", 1.0)
            assert any(isinstance(e, ReobserveVlm) for e in effects) is expected, (kind, reason)
