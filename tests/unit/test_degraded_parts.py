"""Degraded modes that hold (issue 12, holes 1, 4, 5, 6), replayed against the real coordinator core in the simulated
world with the messages in the order the actors really send them: a part that is down never blocks a step that does
not need it, and never holds VRAM back it cannot use; an adopted chat model counts its real footprint; a VLM whose
server died and whose memory came back is not loaded."""

from __future__ import annotations

from mai.sim.world import DEFAULT_CHAT_MODELS, GIB, MIB, SimWorld
from messages.errors import Reason
from messages.events import ModelSwitched
from messages.failure import Failure
from messages.requests import ModeReached, SetMode
from messages.steps import ClipObserved, LoadVlm, MoveClip, PartHealth, UnloadVlm, VlmObserved, VramReading
from tests.unit.test_coordinator import MODEL, settings, step_names

CLIP_DOWN = ("CLIP model 'ViT-B-32' unavailable: cannot fetch OpenCLIP 'ViT-B-32' weights pretrained='laion2b_s34b_b79k':"
             " LocalEntryNotFoundError: ...; retrying in 5 s")
BIG = DEFAULT_CHAT_MODELS[0]  # qwen3:8b, 5.5 GiB declared


def unobserved(**kw) -> SimWorld:
    """A coordinator that just started: nothing reported yet; each test delivers the actors' reports itself."""
    kw.setdefault("gpu_total_bytes", 12 * GIB)
    kw.setdefault("vlm_true_bytes", 5 * GIB)
    cfg = kw.pop("cfg", None) or settings(chat_declared_bytes={m.key: m.footprint_bytes for m in DEFAULT_CHAT_MODELS},
                                          chat_min_bytes=DEFAULT_CHAT_MODELS[-1].footprint_bytes)
    return SimWorld(cfg, observe_at_start=False, **kw)


def reading(w: SimWorld) -> None:
    w.send(VramReading("watch", w.ledger.snapshot(w.now), None), "sampler")


# --- hole 1: CLIP without weights does not block RECORDING --------------------------------------------------------------


def test_recording_is_reached_when_the_mover_reports_clip_down_before_its_placement():
    # The mover's answer to the coordinator's Reobserve: PartHealth first, then ClipObserved (actors/clip_mover.py).
    w = unobserved()
    reading(w)
    w.send(VlmObserved(MODEL, False), "vlm")
    w.send(SetMode("r1", "recording", wait=True))
    w.send(PartHealth("clip", False, CLIP_DOWN), "clip")
    w.send(ClipObserved("cpu", 0, False, "ViT-B-32"), "clip")
    w.advance(30)
    assert isinstance(w.reply("r1"), ModeReached), w.reply("r1")
    assert step_names(w) == ["LoadVlm"] and w.vlm.state == "loaded"
    assert dict(w.core.status("s", w.now).degraded) == {"clip": CLIP_DOWN}


def test_a_clip_not_heard_from_yet_does_not_hold_the_vlm_load_back():
    # The mover is still creating its model (a download): it has said nothing yet.
    w = unobserved()
    reading(w)
    w.send(VlmObserved(MODEL, False), "vlm")
    w.send(SetMode("r1", "recording", wait=True))
    w.advance(10)
    assert w.vlm.state == "loaded" and w.reply("r1") is None  # CLIP's placement is still to be confirmed
    w.send(ClipObserved("cpu", 0, False, "ViT-B-32"), "clip")
    assert isinstance(w.reply("r1"), ModeReached)


def test_autopilot_with_clip_down_still_unloads_the_vlm_then_says_clip_is_what_is_missing():
    w = unobserved(vlm_loaded=True)
    reading(w)
    w.send(VlmObserved(MODEL, True, 5 * GIB, 5 * GIB), "vlm")
    w.send(PartHealth("clip", False, CLIP_DOWN), "clip")
    w.send(ClipObserved("cpu", 0, False, "ViT-B-32"), "clip")
    w.send(SetMode("a1", "autopilot", wait=True))
    w.advance(30)
    assert w.vlm.state == "unloaded" and not w.sent(MoveClip)
    failure = w.reply("a1")
    assert isinstance(failure, Failure) and failure.reason == Reason.NOT_RUNNING and CLIP_DOWN in failure.message


# --- hole 4: an adopted chat model counts its footprint -----------------------------------------------------------------


def _adopted(vram_bytes: int | None) -> SimWorld:
    """Mai restarted with the 5.5 GiB chat model still loaded in Ollama, and 2 GiB of other programs."""
    w = unobserved(external_bytes=2 * GIB)
    w.chat.current = BIG
    w.chat.alloc = w.ledger.allocate("chat", BIG.true_bytes, w.now, model=BIG.key)
    reading(w)
    w.send(VlmObserved(MODEL, False), "vlm")
    w.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    extra = {} if vram_bytes is None else {"vram_bytes": vram_bytes, "context_length": 8192}
    w.send(ModelSwitched(None, BIG.key, "found loaded after a restart", **extra), "chat")
    return w


def test_an_adopted_chat_model_counts_its_declared_footprint_and_yields_for_recording():
    w = _adopted(None)  # the agent said only which model: the catalog's footprint counts
    assert w.core.status("s", w.now).chat_footprint_bytes == BIG.footprint_bytes
    w.send(SetMode("r1", "recording", wait=True))
    w.advance(30)
    assert isinstance(w.reply("r1"), ModeReached), w.reply("r1")
    assert w.vlm.state == "loaded" and w.chat.current is None  # the chat model yielded, nothing was refused


def test_an_adopted_chat_model_counts_what_the_agent_reports_or_what_was_measured():
    w = _adopted(5 * GIB + 512 * MIB)
    assert w.core.status("s", w.now).chat_footprint_bytes == 5 * GIB + 512 * MIB
    measured = settings(chat_declared_bytes={BIG.key: BIG.footprint_bytes})
    w2 = SimWorld(measured, observe_at_start=False, learned_footprints={f"{BIG.key}@8192": 5 * GIB + 100 * MIB})
    w2.send(ModelSwitched(None, BIG.key, "found loaded after a restart", vram_bytes=5 * GIB, context_length=8192),
            "chat")
    assert w2.core.status("s", w2.now).chat_footprint_bytes == 5 * GIB + 100 * MIB  # measured wins


# --- hole 5: Ollama crashed with the VLM loaded ----------------------------------------------------------------------


def test_autopilot_goes_on_once_ollama_is_gone_and_the_vlms_memory_is_back():
    w = unobserved(vlm_loaded=True)
    reading(w)
    w.send(VlmObserved(MODEL, True, 5 * GIB, 5 * GIB), "vlm")
    w.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    w.advance(1)
    w.crash_ollama(probe_after_s=2.0)  # the sampler sees the bytes back before the loader finds the server gone
    w.advance(5)
    w.send(SetMode("a1", "autopilot", wait=True))
    w.advance(10)
    assert isinstance(w.reply("a1"), ModeReached), w.reply("a1")
    assert w.clip.placement == "gpu" and not w.sent(UnloadVlm)
    assert w.core.status("s", w.now).vlm.state == "unloaded"


def test_a_vlm_whose_server_is_gone_but_whose_memory_is_still_held_stays_loaded():
    w = unobserved(vlm_loaded=True)
    reading(w)
    w.send(VlmObserved(MODEL, True, 5 * GIB, 5 * GIB), "vlm")
    w.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    w.crash_ollama(probe_after_s=2.0, runner_survives=True)
    w.advance(5)
    w.send(SetMode("a1", "autopilot", wait=True))
    w.advance(10)
    assert w.core.status("s", w.now).vlm.state == "loaded"
    assert isinstance(w.reply("a1"), Failure) and w.reply("a1").reason == Reason.BACKEND_UNREACHABLE


# --- hole 6: a part that is down holds no VRAM back from chat -----------------------------------------------------------


def test_on_12_gb_without_ollama_the_big_chat_model_is_chosen_and_yields_when_ollama_is_back():
    w = unobserved(external_bytes=GIB)
    reading(w)
    w.send(PartHealth("vlm", False, "Ollama unreachable at http://127.0.0.1:11434"), "vlm")
    w.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    w.send(SetMode("r1", "recording"))
    w.chat_turn(want=0)
    w.advance(10)
    assert w.chat.current == BIG and w.chat.outcomes[-1][2] == "replied"
    w.vlm.reachable = True  # Ollama is back: the loader reports it, and what it sees
    w.send(PartHealth("vlm", True), "vlm")
    w.send(VlmObserved(MODEL, False), "vlm")
    w.advance(30)
    assert w.vlm.state == "loaded" and w.chat.current is None  # the chat model gave the VLM its room
    assert LoadVlm in {type(m) for m in w.sent()}


def test_recording_with_ollama_down_fails_fast_naming_it_even_while_clip_is_not_heard_from():
    w = unobserved()
    reading(w)
    w.send(PartHealth("vlm", False, "Ollama unreachable at http://127.0.0.1:11434"), "vlm")
    w.send(SetMode("r1", "recording", wait=True))
    failure = w.reply("r1")
    assert isinstance(failure, Failure) and failure.reason == Reason.BACKEND_UNREACHABLE
    assert "Ollama unreachable" in failure.message


def test_a_probe_read_before_the_load_began_but_delivered_after_its_result_is_not_an_eviction():
    # Seen on the real actors once the load no longer waits for CLIP: the loader's two start-up probes both say
    # "unloaded"; the coordinator loads on the first, and Thespian delivers the second after VlmLoaded.
    w = unobserved()
    reading(w)
    read_at = w.now - 0.05  # the probe began a moment before its report arrived
    w.send(VlmObserved(MODEL, False, observed_at=read_at), "vlm")
    w.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    w.send(SetMode("r1", "recording", wait=True))
    w.advance(0.001)
    assert isinstance(w.core.step_in_flight, LoadVlm)
    w.advance(30)
    assert isinstance(w.reply("r1"), ModeReached)
    w.send(VlmObserved(MODEL, False, observed_at=read_at), "vlm")  # the stale report
    assert w.core.status("s", w.now).vlm.state == "loaded" and not w.logs_of("vlm.evicted")
    assert w.logs_of("vlm.observed_stale")
    w.evict_vlm(observe_after_s=None)
    w.send(VlmObserved(MODEL, False, observed_at=w.now), "vlm")  # a real eviction, read after the load
    assert w.logs_of("vlm.evicted")
