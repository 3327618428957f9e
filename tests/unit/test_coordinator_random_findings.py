"""Cases the coordinator property test (tests/property/test_coordinator_invariants.py) found once it drew fresh
seeds, each replayed here in the simulated world with the messages the actors really send, so that each stays found
whatever the property test draws next."""

from __future__ import annotations

from dataclasses import replace

from mai.core.plan import LOAD_VLM, Demand, Goal, ModePolicy, World, plan_steps
from mai.core.sampler import SamplerCore
from mai.sim.world import GIB, MIB, SimWorld, Timings
from messages.requests import ModeReached, SetMode
from messages.resources import VramSnapshot
from messages.steps import UnloadVlm, VramRecovered, WaitVramFree
from tests.unit.test_coordinator import settings, step_names


def test_an_unload_sent_while_nvml_failed_is_confirmed_once_the_gpu_is_back():
    # Invariants 3 and 4 (DESIGN §4): in AUTOPILOT the VLM unload is confirmed before CLIP moves to the GPU. Found
    # with --hypothesis-seed=4: NVML fails with the VLM loaded (the sampler reports host memory), Ollama is down,
    # AUTOPILOT is asked. Ollama comes back: the unload is sent while the readings are still host memory; NVML comes
    # back before Ollama has released the VLM's memory. The core had dropped the unload's bytes to confirm (a host
    # reading looked like a machine without a GPU), so CLIP went to the GPU on an unconfirmed unload.
    w = SimWorld(settings(), gpu_total_bytes=12 * GIB, vlm_true_bytes=5 * GIB, vlm_loaded=True,
                 initial_mode="recording", timings=Timings(vlm_release_lag_s=2.0))
    gpu_free_with_vlm = w.ledger.free_bytes
    w.set_gpu_healthy(False)
    w.set_ollama_reachable(False)
    w.send(SetMode("a1", "autopilot"))  # not waiting: with Ollama down a waiter fails fast (plan rule 6)
    w.advance(1.0)
    w.set_ollama_reachable(True)  # the unload goes now, on host readings
    assert w.sent()[-1] == UnloadVlm(w.sent()[-1].step_id, w.settings.vlm_model)
    w.set_gpu_healthy(True)  # a GPU reading again, the VLM's bytes still in it
    w.advance(30.0)
    assert step_names(w)[-3:] == ["UnloadVlm", "confirm", "clip->gpu"], step_names(w)
    confirm = w.sent(WaitVramFree)[-1]
    # The baseline is VRAM (the last GPU reading, with the VLM loaded), never the host reading's free bytes.
    assert confirm.baseline_free_bytes == gpu_free_with_vlm and confirm.expected_bytes == 5 * GIB
    assert not w.logs_of("vram.recovery_incomplete")  # it really came back, and the wait said so
    assert w.core.mode == "autopilot" and w.clip.placement == "gpu"


def test_an_unload_finished_during_the_nvml_outage_is_confirmed_when_the_gpu_is_back():
    # The same, with the unload done (and its memory released) before NVML reads again: the first GPU reading is
    # followed by the confirmation, then CLIP's move. That reading is the baseline (found with seed 57: a chat model
    # unloaded during the outage passed for the VLM's bytes against the older one), so the wait cannot pass on bytes
    # freed by anything else meanwhile; it ends incomplete at its timeout, bounded.
    w = SimWorld(settings(), gpu_total_bytes=12 * GIB, vlm_true_bytes=5 * GIB, vlm_loaded=True,
                 initial_mode="recording")
    w.set_gpu_healthy(False)
    w.send(SetMode("a1", "autopilot", wait=True, timeout_s=120.0))
    w.advance(20.0)
    assert step_names(w)[-1] == "UnloadVlm" and w.vlm.state == "unloaded" and w.clip.placement == "cpu"
    w.set_gpu_healthy(True)
    back = w.ledger.free_bytes
    w.advance(30.0)
    assert step_names(w)[-2:] == ["confirm", "clip->gpu"], step_names(w)
    assert w.sent(WaitVramFree)[-1].baseline_free_bytes == back
    assert w.logs_of("vram.recovery_incomplete") and not w.logs_of("vram.recovered")
    assert isinstance(w.reply("a1"), ModeReached) and w.clip.placement == "gpu"


def test_a_host_memory_reading_never_confirms_that_vram_came_back():
    # Invariant 4, found with --hypothesis-seed=32: NVML fails while the sampler waits for an unload's VRAM to come
    # back; the next reading is host memory (psutil), whose free bytes dwarf the VRAM baseline, and the wait was
    # answered "complete". Host memory says nothing of VRAM: the wait runs to its deadline, answered incomplete.
    gpu = VramSnapshot(12 * GIB, 11 * GIB, 1 * GIB, "nvml", "gpu", 0.0)
    host = VramSnapshot(64 * GIB, 16 * GIB, 48 * GIB, "psutil", "host memory (no GPU)", 1.0, False)
    sampler = SamplerCore(threshold_bytes=100 * MIB)
    sampler.observe(gpu, 0.0)
    sampler.wait(WaitVramFree("s1", gpu.free_bytes, 6 * GIB, 0.75, 5.0), "coordinator", 0.0)
    assert sampler.observe(host, 1.0)[1] == []
    ((_, answer),) = sampler.observe(replace(host, taken_at=5.0), 5.0)[1]
    assert isinstance(answer, VramRecovered) and not answer.complete and answer.recovered_bytes == 0


def test_an_unload_whose_confirmation_nvml_interrupted_is_confirmed_again_when_the_gpu_is_back():
    # The coordinator's side of the same case: the wait answered on host memory confirmed nothing, so once NVML
    # reads again the freed bytes are confirmed before CLIP moves to the GPU (invariants 3 and 4).
    w = SimWorld(settings(), gpu_total_bytes=12 * GIB, vlm_true_bytes=5 * GIB, vlm_loaded=True,
                 initial_mode="recording", timings=Timings(vlm_release_lag_s=7.0))
    w.send(SetMode("a1", "autopilot"))
    w.advance(1.0)  # unloaded; its memory comes back 7 s later; the confirmation is waiting
    assert step_names(w) == ["UnloadVlm", "confirm"] and w.step_open is not None
    w.set_gpu_healthy(False)
    w.advance(10.0)
    assert not w.logs_of("vram.recovered") and w.logs_of("vram.recovery_incomplete")
    assert w.clip.placement == "cpu"  # no GPU to plan on: CLIP stays
    w.set_gpu_healthy(True)  # the VLM's memory came back during the outage: the baseline is this reading
    w.advance(10.0)
    assert step_names(w) == ["UnloadVlm", "confirm", "confirm", "clip->gpu"], step_names(w)
    assert len(w.logs_of("vram.recovery_incomplete")) == 2 and not w.logs_of("vram.recovered")
    assert w.core.mode == "autopilot" and w.clip.placement == "gpu"


# --- chat taking the VLM's place (plan rule 1) --------------------------------------------------------------------


def _plan_world(free_bytes: int, chat_min_bytes: int) -> World:
    return World(vlm_model="qwen2.5vl:7b", vlm_state="unloaded", vlm_footprint_bytes=6 * GIB, clip_placement="cpu",
                 clip_footprint_bytes=600 * MIB, reserve_bytes=512 * MIB, gpu=True, free_bytes=free_bytes,
                 chat_min_bytes=chat_min_bytes)


def test_without_a_smallest_chat_footprint_the_vlm_never_gives_chat_its_place():
    # Found with --hypothesis-seed=33: with chat_min_bytes 0 (no catalog figure: "neither chat rule applies") a chat
    # load waiting took the place of a VLM that did not fit, and RECORDING was reached with the VLM unloaded.
    recording = ModePolicy("loaded", "cpu")
    demand = Demand(chat_load_waiting=True, chat_load_bytes=1280 * MIB)
    plan = plan_steps(_plan_world(5 * GIB, 0), recording, demand)
    assert plan.vlm_goal == Goal("loaded", "mode") and [r.kind for r in plan.refusals] == [LOAD_VLM]
    assert not plan.done


def test_a_mode_being_entered_loads_its_vlm_before_chat_may_take_its_place():
    # Invariant 1 holds when a mode is entered (docs/architecture.md): a chat load waiting that does not fit beside
    # the VLM does not keep RECORDING's VLM from loading; once RECORDING is reached, an idle VLM may give its place.
    recording = ModePolicy("loaded", "cpu")
    w = _plan_world(6 * GIB + 800 * MIB, 1280 * MIB)  # the VLM fits, but no chat model beside it
    entering = plan_steps(w, recording, Demand(chat_load_waiting=True, chat_load_bytes=1280 * MIB, entering=True))
    assert entering.vlm_goal == Goal("loaded", "mode") and [s.kind for s in entering.steps] == [LOAD_VLM]
    reached = plan_steps(w, recording, Demand(chat_load_waiting=True, chat_load_bytes=1280 * MIB))
    assert reached.vlm_goal == Goal("unloaded", "chat") and reached.done


# --- a VLM taken as gone on a reading (issue 12, hole 5) -----------------------------------------------------------------


def test_a_vlm_taken_as_gone_on_a_reading_is_observed_again_when_ollama_answers():
    # Found with --hypothesis-seed=64: Ollama unreachable with its runner still holding the VLM, and another program
    # quitting, freed as many bytes as the VLM holds: the core took the VLM as gone (hole 5, a guess without
    # per-process readings). When Ollama answered again the loader reported only its health (its own view had not
    # changed), so the core kept the VLM as unloaded: AUTOPILOT never unloaded it, the idle timer never ran.
    w = SimWorld(settings(), gpu_total_bytes=24 * GIB, vlm_true_bytes=5 * GIB, vlm_loaded=True,
                 external_bytes=6 * GIB, initial_mode="idle")
    w.set_ollama_reachable(False)
    w.set_external_bytes(0)  # another program quits; the VLM is still there
    assert w.logs_of("vlm.gone") and w.core.status("s", w.now).vlm.state == "unloaded" and w.vlm.state == "loaded"
    w.set_ollama_reachable(True)
    assert w.core.status("s", w.now).vlm.state == "loaded"
    w.send(SetMode("a1", "autopilot"))
    w.advance(30.0)
    assert "UnloadVlm" in step_names(w) and w.vlm.state == "unloaded" and w.core.mode == "autopilot"


def test_the_chat_gate_does_not_count_the_vlm_of_a_mode_being_entered():
    # Found by the property test (invariant 12, the ledger over capacity): while RECORDING was being entered the plan
    # kept its VLM, but the chat gate still counted the idle VLM's bytes as grantable, and a chat model loaded next to
    # it past the reserve.
    from messages.conversation import GetGrantable

    w = SimWorld(settings(chat_min_bytes=1280 * MIB), gpu_total_bytes=6 * GIB + 512 * MIB, vlm_true_bytes=5 * GIB,
                 vlm_loaded=True, clip_device="gpu", initial_mode="idle")
    w.send(SetMode("r1", "recording"))  # CLIP's move to the CPU is in flight: RECORDING is not reached yet
    w.send(GetGrantable("g1"), "chat")
    assert w.reply("g1").grantable_bytes < 5 * GIB
    w.advance(30.0)
    assert w.core.mode == "recording"
    w.send(GetGrantable("g2"), "chat")  # reached: an idle VLM may give chat its place again
    assert w.reply("g2").grantable_bytes >= 5 * GIB
