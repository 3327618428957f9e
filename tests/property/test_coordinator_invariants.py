"""DESIGN §4 invariants of the GPU gate, as hypothesis state machines over the coordinator in a simulated world.

Random interleavings of mode requests from several clients, leases, ensure-loaded/unloaded, manual CLIP placement,
chat turns that load, switch and unload chat models through the same gate (and yield them when the mode needs the
bytes), time passing, and the world misbehaving (loads failing, Ollama unreachable, NVML failing, other programs
taking VRAM), on GPUs of 8-24 GB with VLMs of 5-8 GB and chat models of 1.2-5.5 GB. Every check is made on what
the simulated world recorded — the GPU ledger's allocation intervals, the step log (chat steps included), the
replies — at the instant each thing happened (observers see every delivery and effect before it takes effect), plus
a final check after healing the world and letting time run.

Invariant 10 (CLIP embeddings across devices) belongs to the CLIP adapter's tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mai.core.coordinator import CoordinatorSettings, Log, ModePolicy, Publish, Reply, SendStep
from mai.core.plan import VLM_STATES
from messages.conversation import ChatGrant, ChatUnloaded, ChatYield, Grantable
from messages.errors import Reason
from messages.events import IdleUnloaded, ModeChanged, PlanRefused, ResourceChanged
from messages.failure import Failure
from messages.requests import (
    AcquireLease,
    ClipPlaced,
    EnsureVlm,
    GetStatus,
    LeaseGranted,
    LeaseReleased,
    ModeReached,
    PlaceClip,
    ReleaseLease,
    SetMode,
    VlmReady,
)
from messages.status import Status
from messages.steps import (
    ClipMoved,
    LoadVlm,
    MoveClip,
    PartHealth,
    UnloadVlm,
    VlmLoaded,
    VlmObserved,
    VlmUnloaded,
    VramReading,
    VramRecovered,
    WaitVramFree,
)
from mai.sim.world import GIB, MIB, Delivery, SimWorld, Timings

MODES = ("autopilot", "recording", "idle")
EPS = 1e-6


@dataclass(frozen=True)
class WorldConfig:
    gpu_total_gib: int  # 0: "tight", the VLM fits alone but not next to CLIP (so CLIP has to yield)
    gpu_present: bool
    external_mib: int
    reserve_mib: int
    vlm_declared_mib: int
    vlm_shrink_mib: int  # the real model is this much smaller than declared (estimates are conservative)
    clip_mib: int
    release_lag_s: float
    load_s: float
    autopilot_grace_s: float | None
    drain_s: float
    idle_timeout_s: float
    initial_mode: str
    vlm_loaded: bool
    clip_device: str
    faults: bool  # whether the world misbehaves (loads fail, Ollama or NVML go away, other programs take VRAM)
    chat_min_mib: int = 0  # the smallest chat model's footprint: 0 leaves the chat gate's two room rules off
    failing_loads: int = 0  # in a world with faults, this many of the first VLM loads fail (a step failure early on)

    @property
    def gpu_total_bytes(self) -> int:
        if self.gpu_total_gib:
            return self.gpu_total_gib * GIB
        return (self.vlm_declared_mib + self.reserve_mib + self.external_mib + self.clip_mib // 2) * MIB


world_configs = st.builds(
    WorldConfig,
    gpu_total_gib=st.sampled_from([0, 0, 0, 0, 8, 12, 16, 24]),  # "tight" half of the time: CLIP yields there
    gpu_present=st.sampled_from([True, True, True, True, False]),
    external_mib=st.sampled_from([0, 256, 512, 1024, 2048]),
    reserve_mib=st.sampled_from([256, 512, 1024]),
    vlm_declared_mib=st.integers(20, 32).map(lambda n: n * 250),  # 5000-8000 MiB
    vlm_shrink_mib=st.sampled_from([0, 100, 400, 1000]),
    clip_mib=st.sampled_from([400, 600]),
    release_lag_s=st.sampled_from([0.1, 0.3, 7.0]),  # 7 s: past Ollama's 5 s recovery wait (answered incomplete)
    load_s=st.sampled_from([0.5, 3.0, 8.0]),
    autopilot_grace_s=st.sampled_from([None, 5.0]),
    drain_s=st.sampled_from([0.0, 2.0, 10.0]),
    idle_timeout_s=st.sampled_from([30.0, 300.0]),
    initial_mode=st.sampled_from(MODES),
    vlm_loaded=st.booleans(),
    clip_device=st.sampled_from(["cpu", "gpu"]),
    faults=st.sampled_from([True, True, True, False]),
    chat_min_mib=st.sampled_from([0, 1280]),  # 1280: the smallest of the world's chat models (rules on)
    failing_loads=st.sampled_from([0, 1, 2]),
)


@dataclass
class Request:
    message: Any
    sender: str
    sent_at: float
    replies: list[Any] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.sent_at + getattr(self.message, "timeout_s", 0.0)


class GateMachine(RuleBasedStateMachine):
    """Drives one SimWorld; `watch` checks invariants at every delivery and effect."""

    @initialize(cfg=world_configs)
    def start(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        modes = {
            "autopilot": ModePolicy("unloaded", "gpu", cfg.drain_s, cfg.autopilot_grace_s),
            "recording": ModePolicy("loaded", "cpu", cfg.drain_s),
            "idle": ModePolicy("keep", "keep", cfg.drain_s),
        }
        self.settings = CoordinatorSettings(
            modes=modes, default_mode="idle", vlm_model="qwen2.5vl:7b", vlm_host="http://127.0.0.1:11434",
            num_ctx=8192, vlm_declared_bytes=cfg.vlm_declared_mib * MIB, clip_declared_bytes=600 * MIB,
            reserve_bytes=cfg.reserve_mib * MIB, idle_timeout_s=cfg.idle_timeout_s, default_lease_ttl_s=60.0,
            load_retry_backoff_s=5.0, chat_min_bytes=cfg.chat_min_mib * MIB,
        )
        self.requests: dict[str, Request] = {}
        self.held: dict[str, float] = {}  # lease id -> granted at
        self.counter = 0
        self.target_set_at = 1_000.0
        self.last_mode = cfg.initial_mode
        self.pin: str | None = None  # PlaceClip since the last SetMode (the harness's own record)
        self.pin_request: str | None = None
        self.demand_ended_at = -1.0
        self.idle_unloaded_at = -1.0
        self.pending_free_at: float | None = None  # a freeing step finished, not yet confirmed by a reading
        self.pending_free_vlm = False
        self.must_confirm_next = False
        self.ollama_up = True
        # The core took the VLM as gone on a reading while Ollama was down (issue 12 hole 5: "a VLM whose server is
        # gone and whose memory has come back is not loaded"). Without per-process readings that is a guess: here
        # another program (or a chat model) may have freed those bytes while Ollama's runner kept the VLM. Until the
        # loader reports again, the core's VLM state may differ from the world's; the core asks it as soon as Ollama
        # answers (ReobserveVlm), and every allocation is still fitted against the readings (the ledger check).
        self.vlm_guessed_gone = False
        # Another program's VRAM changed while the chat model loaded: without per-process readings the coordinator's
        # footprint for it is the device-wide change (mai.core.footprints rule 2, accepted up to 2x the declared), so
        # it may count the other program's bytes as the chat model's. A yield may then ask for more than the chat
        # model holds (the freed bytes are still confirmed before use: the ledger check proves nothing over-commits).
        self.chat_measure_polluted = False
        self.chat_loaded_blind = False  # the chat model held was loaded while the GPU could not be read
        self.checked_allocs = 0
        self.gpu_at_send: dict[str, bool] = {}
        self.chat_answers: dict[str, Any] = {}  # the chat agent's request id -> the coordinator's answer
        self.chat_frees_vram = False  # the chat step in flight gives back VRAM the chat model held on the GPU
        self.chat_yields_at: list[float] = []  # when the chat model was asked to yield
        self.vram_at_unload: dict[str, int] = {}  # step id -> VLM bytes on the GPU when the step was sent
        self.world = SimWorld(
            self.settings,
            gpu_total_bytes=cfg.gpu_total_bytes,
            gpu_present=cfg.gpu_present,
            external_bytes=cfg.external_mib * MIB,
            vlm_true_bytes=(cfg.vlm_declared_mib - cfg.vlm_shrink_mib) * MIB,
            clip_true_bytes=cfg.clip_mib * MIB,
            vlm_loaded=cfg.vlm_loaded,
            clip_device=cfg.clip_device,
            timings=Timings(vlm_load_s=cfg.load_s, vlm_release_lag_s=cfg.release_lag_s),
            initial_mode=cfg.initial_mode,
            change_threshold_bytes=1 * MIB,  # every change reported: the capacity check below can then be exact
            observers=[self.watch],
        )
        self.checked_allocs = len(self.world.ledger.allocations)  # what was there before Mai decided anything
        if cfg.faults and cfg.failing_loads:
            self.world.fail_next_loads(cfg.failing_loads)

    # --- helpers --------------------------------------------------------------------------------------------------

    def _id(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}-{self.counter}"

    def _send(self, message: Any, sender: str = "client-0") -> None:
        self.requests[message.request_id] = Request(message, sender, self.world.now)
        self.world.send(message, sender)

    def _outstanding(self, kind: type, **match: Any) -> list[Request]:
        return [r for r in self.requests.values() if isinstance(r.message, kind) and not r.replies
                and all(getattr(r.message, k) == v for k, v in match.items())]

    @property
    def gpu_usable(self) -> bool:
        return self.world.gpu_usable

    # --- the observer: invariants at the instant things happen ------------------------------------------------------

    def watch(self, world: SimWorld, item: Any) -> None:
        if isinstance(item, Delivery):
            self._on_delivery(world, item.message)
        elif isinstance(item, SendStep):
            self._on_step(world, item.message)
        elif isinstance(item, Reply):
            self._on_reply(world, item)
        elif isinstance(item, Publish):
            self._on_publish(world, item.event)
        elif isinstance(item, Log):
            self._on_log(world, item)

    def _on_delivery(self, world: SimWorld, msg: Any) -> None:
        if isinstance(msg, (VlmObserved, VlmLoaded, VlmUnloaded)):
            self.vlm_guessed_gone = False
        if isinstance(msg, VramRecovered):
            self.pending_free_at, self.pending_free_vlm = None, False
            if msg.complete and self.must_confirm_after is not None:
                # Invariant 4: a confirmed unload means VRAM use really went down, per the ledger.
                assert world.ledger.used_at(world.now) < self.must_confirm_after, "VRAM did not go down after unload"
            self.must_confirm_after = None
        elif isinstance(msg, (ResourceChanged, VramReading)):
            if self.pending_free_at is not None and not self.pending_free_vlm and msg.snapshot.taken_at > self.pending_free_at:
                self.pending_free_at = None
        elif isinstance(msg, PartHealth) and msg.part == "gpu" and not msg.ok:
            self.pending_free_at, self.pending_free_vlm, self.must_confirm_next = None, False, False
        elif isinstance(msg, VlmUnloaded) and world.gpu_usable:
            record = next((s for s in world.steps if s.step_id == msg.step_id), None)
            if record is not None:
                self.pending_free_at, self.pending_free_vlm, self.must_confirm_next = world.now, True, True
                had_vram = self.vram_at_unload.get(msg.step_id, 0) > 0
                self.must_confirm_after = world.ledger.used_at(record.sent_at) if had_vram else None
        elif isinstance(msg, ChatUnloaded) and world.gpu_usable:
            if self.chat_frees_vram and self.pending_free_at is None:
                self.pending_free_at = world.now
            self.chat_frees_vram = False
        elif isinstance(msg, ClipMoved) and msg.device == "cpu" and world.gpu_usable:
            # Freed CLIP bytes count only if the GPU was there when the move began (else nothing relied on them).
            if self.gpu_at_send.get(msg.step_id) and self.pending_free_at is None:
                self.pending_free_at = world.now

    must_confirm_after: int | None = None  # ledger use when the unload being confirmed began

    def _on_step(self, world: SimWorld, msg: Any) -> None:
        step_id = getattr(msg, "step_id", "yield")
        self.gpu_at_send[step_id] = world.gpu_usable
        self.vram_at_unload[step_id] = world.vlm.size_vram_bytes if world.vlm.state == "loaded" else 0
        # Invariant 5: one VRAM-changing step at a time.
        assert world.step_open is None, f"{msg} sent while {world.step_open.message} is in flight"
        if isinstance(msg, ChatYield):
            # The chat model is asked to yield only bytes it really holds on a GPU the plan can count on...
            assert world.gpu_usable and 0 < msg.needed_bytes, msg
            if not (self.chat_measure_polluted or self.chat_loaded_blind):
                assert world.chat.held_bytes > 0, f"{msg} with {world.chat.held_bytes} B held"
                assert msg.needed_bytes <= world.chat.held_bytes + self.settings.reserve_bytes
            # ...unless the coordinator could not know them: a footprint measured while another program changed VRAM
            # (see chat_measure_polluted), or a model loaded while the GPU could not be read. The real agent reports
            # at least the granted footprint (actors/conversation_agent.py: max(vram, footprint)), the coordinator
            # counts its measured one, and no reading says whether the backend put it on the GPU: counted as held
            # there (conservative), its yield may free nothing, and the confirmation then says so.
            self.chat_frees_vram = True
            self.chat_yields_at.append(world.now)
        # Invariant 4: the first thing after an unload is the confirmation that VRAM came back.
        if self.must_confirm_next and world.gpu_usable:
            assert isinstance(msg, WaitVramFree), f"{msg} sent before the unload was confirmed"
            assert msg.fraction == self.settings.recovery_fraction
        self.must_confirm_next = False
        allocating = (isinstance(msg, LoadVlm) and world.gpu_usable) or (isinstance(msg, MoveClip) and msg.device == "gpu")
        if allocating:
            # Invariant 3 (both modes): freed bytes are confirmed before an allocating step relies on them.
            assert self.pending_free_at is None, f"{msg} sent before the freed VRAM was confirmed"
        if isinstance(msg, MoveClip) and msg.device == "gpu":
            assert world.gpu_usable, "CLIP sent to a GPU that is not there"
            assert world.vlm.state != "unloading"
        if isinstance(msg, LoadVlm) and world.gpu_usable:
            policy = self.settings.modes[world.core.target_mode]
            clip_heard = world.core.status("check", world.now).clip.device != "unknown"
            if policy.clip == "cpu" and self.pin != "gpu" and clip_heard:
                # Invariant 3 (RECORDING): CLIP is off the GPU before the VLM load starts.
                assert world.clip.placement == "cpu" and world.clip.alloc is None, "VLM load with CLIP on the GPU"
            # Not while CLIP has not reported its device (a restarted coordinator whose Reobserve the loader answered
            # first): issue 12 hole 1 and plan rule 6 let that load go on, because a fresh mover starts on the CPU
            # and a CLIP on the GPU is in the reading the load was fitted to (invariant 12's ledger check below
            # proves the load fitted next to it); CLIP moves to the CPU once it reports.
        if isinstance(msg, UnloadVlm):
            # Invariant 8: never unload while a lease is held.
            assert not self.held, f"unload while leases {sorted(self.held)} are held"

    def _on_log(self, world: SimWorld, log: Log) -> None:
        if log.event == "vlm.gone":
            self.vlm_guessed_gone = True
        if log.event in ("lease.expired", "lease.revoked"):
            granted = self.held.pop(log.fields["lease_id"], None)
            assert granted is not None, f"{log.event} for a lease not held: {log.fields}"
            self.demand_ended_at = world.now if log.event == "lease.expired" else self.demand_ended_at
            if log.event == "lease.revoked":
                # Revoked only when entering a vlm=unloaded mode, after the drain timeout, and only older leases.
                assert self.settings.modes[world.core.target_mode].vlm == "unloaded"
                assert world.now + EPS >= self.target_set_at + self.cfg.drain_s
                assert granted <= self.target_set_at + EPS

    def _on_chat_reply(self, world: SimWorld, msg: Any) -> None:
        """What the coordinator answers the conversation agent: once per request, and never a blind grant."""
        assert msg.request_id in world.chat.asked, f"{msg} answers nothing the chat agent asked (or answers twice)"
        assert msg.request_id not in self.chat_answers, f"second answer to {msg.request_id}: {msg}"
        self.chat_answers[msg.request_id] = msg
        turn = world.chat.turn
        if isinstance(msg, Grantable):
            # Issue 12, hole 7: always against a reading (host memory without a GPU one), never unlimited.
            assert msg.grantable_bytes is not None and msg.grantable_bytes >= 0, (msg, world.gpu_usable)
        elif isinstance(msg, ChatGrant):
            # Invariant 5: a chat load or unload is a step of the gate like the others, one at a time.
            assert world.step_open is None, f"{msg} granted while {world.step_open.message} is in flight"
            if msg.request_id == world.chat.unloading:
                self.chat_frees_vram = world.gpu_usable and world.chat.held_bytes > 0
            elif turn is not None and msg.request_id == turn.request_id:
                self.chat_frees_vram = False
                self.chat_measure_polluted = False  # a new load, a new measurement
                self.chat_loaded_blind = not world.gpu_usable
                # Invariant 12: granted only what fits, on confirmed bytes (the ledger check below is the proof).
                assert turn.model.footprint_bytes <= msg.grantable_bytes
                if world.gpu_usable:
                    assert self.pending_free_at is None, f"{msg} granted before the freed VRAM was confirmed"
        elif isinstance(msg, Failure) and msg.reason == Reason.INSUFFICIENT_VRAM:
            # Invariant 12: a chat load that does not fit is refused with the bytes, never attempted.
            details = dict(msg.details)
            assert turn is not None and turn.model is not None and msg.request_id == turn.request_id
            assert int(details["needed_bytes"]) == turn.model.footprint_bytes > int(details["free_bytes"])
            assert "needs" in msg.message and "grant" in msg.message
        elif isinstance(msg, Failure):
            assert msg.reason in (Reason.TIMEOUT, Reason.SUPERSEDED), msg

    def _on_reply(self, world: SimWorld, reply: Reply) -> None:
        msg = reply.message
        if reply.to == "chat":
            self._on_chat_reply(world, msg)
            return
        request = self.requests.get(msg.request_id)
        assert request is not None, f"reply to a request never sent: {msg}"
        assert reply.to == request.sender, "reply sent to the wrong client"
        assert not request.replies, f"second reply to {request.message}: {msg} after {request.replies}"
        request.replies.append(msg)
        # Invariant 7: an answer within the request's own timeout, never a hang.
        timeout = getattr(request.message, "timeout_s", None)
        if timeout is not None:
            assert world.now <= request.deadline + EPS, f"{msg} came {world.now - request.deadline:.3f} s late"
        if isinstance(msg, LeaseGranted):
            # Invariant 9: a lease is granted only on a loaded VLM (loading it first on demand).
            assert world.vlm.state == "loaded", f"lease granted with the VLM {world.vlm.state}"
            assert msg.num_ctx == self.settings.num_ctx and msg.host == self.settings.vlm_host
            self.held[msg.lease_id] = world.now
        elif isinstance(msg, LeaseReleased):
            if self.held.pop(msg.lease_id, None) is not None:
                self.demand_ended_at = world.now
        elif isinstance(msg, VlmReady):
            # Invariant 7: ensure-loaded returns only when the VLM is loaded; likewise unloaded.
            guessed = not msg.loaded and self.vlm_guessed_gone and not self.ollama_up  # see vlm_guessed_gone
            assert world.vlm.state == ("loaded" if msg.loaded else "unloaded") or guessed, \
                f"{msg} with VLM {world.vlm.state}"
            assert msg.loaded == request.message.loaded
            if msg.loaded:
                self.demand_ended_at = world.now
        elif isinstance(msg, ClipPlaced):
            assert world.clip.placement == request.message.device
        elif isinstance(msg, ModeReached):
            assert world.core.mode == msg.mode == request.message.mode
        elif isinstance(msg, Failure):
            if msg.reason == Reason.INSUFFICIENT_VRAM:
                # Invariant 12: a refusal names the bytes needed and free, and they really do not fit...
                details = dict(msg.details)
                needed, free = int(details["needed_bytes"]), int(details["free_bytes"])
                assert needed > free - self.settings.reserve_bytes
                if isinstance(request.message, (AcquireLease, EnsureVlm)) and "clip" in details["evictable"] \
                        and self.pin != "gpu":
                    # ...not even if CLIP yielded its place (DESIGN §3: the plan decides which one yields).
                    assert needed > free + world.clip.true_bytes - self.settings.reserve_bytes, "CLIP should yield"
            elif msg.reason == Reason.TIMEOUT and not self.cfg.faults:
                # Liveness: in a world that behaves, a VLM asked for with time to spare is served (or refused) —
                # unless it had to wait for the chat model to finish a reply before yielding its bytes (bounded by
                # chat_yield_timeout_s: the time to spare does not cover that).
                on_demand = isinstance(request.message, AcquireLease) or (
                    isinstance(request.message, EnsureVlm) and request.message.loaded)
                waited_on_chat = any(t >= request.sent_at for t in self.chat_yields_at)
                assert not (on_demand and request.message.timeout_s >= 30.0 and not waited_on_chat), \
                    f"{request.message} timed out"
            elif msg.reason == Reason.NO_GPU:
                assert isinstance(request.message, PlaceClip) and request.message.device == "gpu"
                assert not world.gpu_usable
            if msg.request_id == self.pin_request and msg.reason not in (Reason.TIMEOUT, Reason.SUPERSEDED):
                self.pin = None  # the coordinator drops a manual placement that cannot happen

    def _on_publish(self, world: SimWorld, event: Any) -> None:
        if isinstance(event, IdleUnloaded):
            self.idle_unloaded_at = world.now
        elif isinstance(event, PlanRefused):
            assert event.needed_bytes > event.free_bytes - self.settings.reserve_bytes
            # ...and not on a guess: it does not fit in what the last VRAM reading showed free either (unless the
            # plan gives that room to a VLM load first, as when a pinned CLIP meets a VLM wanted on demand).
            if event.step.startswith("load ") or "could yield: vlm" not in event.reason:
                reading = world.core.status("check", world.now).vram
                assert event.needed_bytes > reading.free_bytes - self.settings.reserve_bytes, "refused on a guess"
        elif isinstance(event, ModeChanged):
            policy = self.settings.modes[event.mode]
            assert event.mode == world.core.target_mode
            # Invariant 1: entering RECORDING loads the VLM (unless someone asked for it unloaded, or it idled out).
            if policy.vlm == "loaded" and not self._outstanding(EnsureVlm, loaded=False) \
                    and self.idle_unloaded_at < self.target_set_at:
                assert world.vlm.state == "loaded", f"entered {event.mode} with the VLM {world.vlm.state}"
            # Invariant 1: entering AUTOPILOT unloads the VLM (unless it is in use on demand, or in its grace).
            on_demand = self.held or self._outstanding(AcquireLease) or self._outstanding(EnsureVlm, loaded=True)
            in_grace = policy.vlm_grace_s is not None and self.demand_ended_at >= self.target_set_at
            guessed = self.vlm_guessed_gone and not self.ollama_up  # see vlm_guessed_gone
            if policy.vlm == "unloaded" and not on_demand and not in_grace:
                assert world.vlm.state == "unloaded" or guessed, f"entered {event.mode} with the VLM {world.vlm.state}"
                # Invariant 2: ...and CLIP is on the GPU when there is one (the mode is reached only if it fits).
                if policy.clip == "gpu" and world.gpu_usable and self.pin != "cpu":
                    assert world.clip.placement == "gpu", f"entered {event.mode} with CLIP on {world.clip.placement}"

    # --- rules ------------------------------------------------------------------------------------------------------
    # Hypothesis picks a rule uniformly, so the common things (requests, time) have several rules each and the
    # world's faults share one rule, enabled in half of the worlds.

    @rule(client=st.integers(0, 2), mode=st.sampled_from(MODES), wait=st.booleans(),
          timeout=st.sampled_from([5.0, 30.0, 120.0]))
    def set_mode(self, client: int, mode: str, wait: bool, timeout: float) -> None:
        if mode != self.world.core.target_mode:
            self.target_set_at = self.world.now
        self.pin, self.last_mode = None, mode
        self._send(SetMode(self._id("mode"), mode, wait, timeout), f"client-{client}")
        # Invariant 6 (at once): the newest request is the target, whoever sent it.
        assert self.world.core.target_mode == mode

    @rule(holder=st.sampled_from(["loop", "describer"]), ttl=st.sampled_from([1.0, 10.0, 60.0]),
          timeout=st.sampled_from([2.0, 30.0, 120.0]))
    def acquire(self, holder: str, ttl: float, timeout: float) -> None:
        self._send(AcquireLease(self._id("lease"), holder, ttl, timeout), "client-1")

    @rule(ttl=st.sampled_from([5.0, 60.0]))
    def acquire_and_wait(self, ttl: float) -> None:
        self._send(AcquireLease(self._id("lease"), "loop", ttl, 60.0), "client-1")
        self.world.advance(10.0)

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 10))
    def release(self, index: int) -> None:
        lease_id = sorted(self.held)[index % len(self.held)]
        self._send(ReleaseLease(self._id("release"), lease_id), "client-1")

    @rule(loaded=st.booleans(), timeout=st.sampled_from([1.0, 20.0, 120.0]))
    def ensure(self, loaded: bool, timeout: float) -> None:
        self._send(EnsureVlm(self._id("ensure"), loaded, timeout), "client-2")

    @rule(device=st.sampled_from(["cpu", "gpu"]), timeout=st.sampled_from([1.0, 60.0]))
    def place_clip(self, device: str, timeout: float) -> None:
        request_id = self._id("place")
        no_gpu = device == "gpu" and not self.gpu_usable
        if not no_gpu:  # recorded first: the mode may be reached during the send (a chat step holds the gate)
            self.pin, self.pin_request = device, request_id
        self._send(PlaceClip(request_id, device, timeout), "client-2")
        if no_gpu:
            failure = self.world.reply(request_id)
            assert isinstance(failure, Failure) and failure.reason == Reason.NO_GPU

    @rule(dt=st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]))
    def advance_a_little(self, dt: float) -> None:
        self.world.advance(dt)

    @rule(dt=st.sampled_from([5.0, 15.0, 60.0, 400.0]))
    def advance_a_lot(self, dt: float) -> None:
        self.world.advance(dt)

    @rule(want=st.integers(0, 2), reply_s=st.sampled_from([0.5, 5.0, 20.0]))
    def chat_turn(self, want: int, reply_s: float) -> None:
        self.world.chat_turn(want, reply_s)

    @rule(mode=st.sampled_from(["recording", "autopilot"]), lease=st.booleans())
    def chat_then_mode(self, mode: str, lease: bool) -> None:
        """The sequences behind chat and CLIP yields, more often than uniform rule picks would draw them: a chat model
        loads while the GPU is free, then a mode (or the VLM on demand beside CLIP) needs its bytes."""
        self.chat_turn(0, 5.0)
        self.world.advance(5.0)
        self.set_mode(0, mode, True, 120.0)
        if lease:
            self._send(AcquireLease(self._id("lease"), "loop", 10.0, 120.0), "client-1")
        self.world.advance(30.0)

    @rule(ttl=st.sampled_from([1.0, 10.0]), chat_first=st.booleans())
    def vlm_on_demand_beside_clip(self, ttl: float, chat_first: bool) -> None:
        """AUTOPILOT puts CLIP on the GPU (beside a chat model, if `chat_first`), then the VLM is asked for on demand:
        where they do not all fit, the plan makes the chat model yield, then CLIP (or refuses, naming why)."""
        self.set_mode(0, "autopilot", True, 120.0)
        self.world.advance(30.0)
        if chat_first:
            self.chat_turn(0, 1.0)
            self.world.advance(10.0)
        self._send(AcquireLease(self._id("lease"), "describer", ttl, 120.0), "client-1")
        self.world.advance(30.0)

    @rule(want=st.integers(0, 2))
    def chat_turn_and_wait(self, want: int) -> None:
        self.world.chat_turn(want, 1.0)
        self.world.advance(10.0)

    @rule()
    def chat_unload(self) -> None:
        self.world.chat_unload()

    @precondition(lambda self: self.cfg.faults)
    @rule(fault=st.sampled_from(["load fails", "load fails", "ollama down", "ollama up", "nvml fails", "nvml back",
                                 "other program", "other program quits", "chat load fails"]))
    def fault(self, fault: str) -> None:
        world = self.world
        if fault == "load fails":
            world.fail_next_loads(1)
        elif fault == "chat load fails":
            world.fail_next_chat_loads(1)
        elif fault.startswith("ollama"):
            self.ollama_up = fault == "ollama up"
            world.set_ollama_reachable(self.ollama_up)
        elif fault.startswith("nvml") and self.cfg.gpu_present:
            world.set_gpu_healthy(fault == "nvml back")
        elif fault.startswith("other program") and self.cfg.gpu_present:
            if world.step_open is not None and isinstance(world.step_open.message, ChatGrant):
                self.chat_measure_polluted = True
            wanted = 0 if fault.endswith("quits") else 3 * GIB
            room = world.ledger.free_bytes + world.ledger.held("external")
            world.set_external_bytes(min(wanted, room))

    @rule(invalid=st.booleans())
    def status(self, invalid: bool) -> None:
        if invalid:  # a mode that does not exist is refused at once, naming the ones that do
            request_id = self._id("mode")
            self._send(SetMode(request_id, "dancing"))
            failure = self.world.reply(request_id)
            assert isinstance(failure, Failure) and failure.reason == Reason.INVALID_REQUEST
            assert "autopilot" in failure.message
        request_id = self._id("status")
        self._send(GetStatus(request_id))
        self._check_status(self.world.reply(request_id))

    def _check_status(self, status: Status) -> None:
        """Invariant 11: status is complete and agrees with the world."""
        world, core = self.world, self.world.core
        assert isinstance(status, Status)
        assert status.mode == core.mode and status.target_mode == core.target_mode
        assert status.vram is not None and status.vram.gpu_present == world.gpu_usable  # NVML lost: host memory
        assert status.reserve_bytes == self.settings.reserve_bytes
        assert status.vlm.state in VLM_STATES and status.vlm.model == self.settings.vlm_model
        assert status.vlm.leases == len(self.held) and status.vlm.host == self.settings.vlm_host
        assert status.vlm.footprint_bytes > 0
        open_step = world.step_open
        assert (status.step_in_flight is None) == (open_step is None)
        if open_step is None and not (self.vlm_guessed_gone and not self.ollama_up):  # see vlm_guessed_gone
            assert status.vlm.state == world.vlm.state, (status.vlm.state, world.vlm.state)
            assert status.clip.device == ("sim-gpu" if world.clip.placement == "gpu" else "cpu")
        degraded = dict(status.degraded)
        assert ("vlm" in degraded) == (not self.ollama_up)
        if not world.gpu_healthy:
            assert "gpu" in degraded
        if open_step is None:  # invariant 11: the chat model is the one the agent holds
            assert status.chat_model == (world.chat.current.key if world.chat.current else None)
        assert isinstance(status.plan, tuple) and all(isinstance(s, str) for s in status.plan)
        assert status.at == world.now
        status.to_dict()

    # --- invariants over the whole record ---------------------------------------------------------------------------

    @invariant()
    def ledger_within_capacity(self) -> None:
        """Invariant 12: every allocation Mai made fitted in capacity minus reserve, per the ledger."""
        if not hasattr(self, "world"):
            return
        ledger = self.world.ledger
        limit = ledger.total_bytes - self.settings.reserve_bytes
        for alloc in ledger.allocations[self.checked_allocs:]:
            if alloc.owner in ("vlm", "clip", "chat"):
                assert alloc.used_before + alloc.nbytes <= limit, (
                    f"{alloc.owner} took {alloc.nbytes / GIB:.2f} GiB with {alloc.used_before / GIB:.2f} GiB in use "
                    f"on a {ledger.total_bytes / GIB:.0f} GiB GPU with {self.settings.reserve_bytes / GIB:.2f} GiB reserved"
                )
        self.checked_allocs = len(ledger.allocations)

    @invariant()
    def leases_drain_in_bounded_time(self) -> None:
        """Entering a vlm=unloaded mode waits for older leases at most lease_drain_timeout_s (DESIGN §3)."""
        if not hasattr(self, "world"):
            return
        core, now = self.world.core, self.world.now
        if self.settings.modes[core.target_mode].vlm == "unloaded" and core.mode != core.target_mode \
                and now > self.target_set_at + self.cfg.drain_s + EPS:
            older = [lease for lease, granted in self.held.items() if granted < self.target_set_at]
            assert not older, f"leases {older} still held {now - self.target_set_at:.1f} s into the drain"

    @invariant()
    def steps_never_overlap(self) -> None:
        """Invariant 5, on the step log: each step ended before the next began."""
        if not hasattr(self, "world"):
            return
        steps = self.world.steps
        for before, after in zip(steps, steps[1:]):
            assert before.ended_at is not None and before.ended_at <= after.sent_at + EPS

    def teardown(self) -> None:
        """Heal the world, let time run, and check where everything ended up."""
        if not hasattr(self, "world"):
            return
        world = self.world
        seen = {event for _, event, _ in world.logs} | {type(e).__name__ for _, e in world.events}
        if currently_in_test_context():  # not when a scenario below drives the machine by hand
            for what in ("lease.revoked", "lease.expired", "plan.refused", "plan.note", "vram.recovery_incomplete",
                         "step.failed", "IdleUnloaded", "ModeChanged", "lease.granted", "chat.granted",
                         "chat.refused", "chat.unloaded"):
                event(f"saw {what}: {what in seen}")  # --hypothesis-show-statistics: the checks above really ran
            event(f"saw a chat yield: {bool(world.sent(ChatYield))}")
        if not self.ollama_up:
            self.ollama_up = True
            world.set_ollama_reachable(True)
        if not world.gpu_healthy:
            world.set_gpu_healthy(True)
        for _ in range(6):
            world.advance(400.0)
        # Invariant 7: nothing hangs — every request was answered, the chat agent's included.
        unanswered = [r.message for r in self.requests.values() if not r.replies]
        assert not unanswered, f"never answered: {unanswered}"
        assert not world.chat.asked and world.chat.turn is None, (world.chat.asked, world.chat.turn)
        core = world.core
        assert world.step_open is None and core.step_in_flight is None
        # Invariant 6: the final state is the last mode asked (unless that mode's own step cannot fit at all).
        assert core.target_mode == self.last_mode
        status = core.status("final", world.now)
        refused = any(p.startswith("refused:") for p in status.plan)
        assert core.mode == self.last_mode or refused, (core.mode, self.last_mode, status.plan)
        if refused and self.pin is None:
            # Invariant 12 / DESIGN §3: the mode's needs win over chat — a step is refused only if the chat model's
            # bytes would not make it fit either (the last reading is fresh by now: no estimate is involved).
            policy = self.settings.modes[core.target_mode]
            need = status.vlm.footprint_bytes if policy.vlm == "loaded" else status.clip.footprint_bytes
            room = world.ledger.free_bytes + world.chat.held_bytes - self.settings.reserve_bytes
            assert need > room, f"refused although the chat model's {world.chat.held_bytes} B would make room"
        # Invariant 8: with no lease for idle_timeout_s the VLM is unloaded (leases have all expired by now).
        assert not self.held
        assert world.vlm.state == "unloaded", f"VLM still {world.vlm.state} long after the last lease"
        # Invariant 2: in AUTOPILOT, CLIP ends on the GPU if there is one and it fits.
        policy = self.settings.modes[core.mode]
        if policy.clip == "gpu" and self.pin is None and self.cfg.gpu_present and core.mode == self.last_mode:
            fits = world.ledger.free_bytes + world.ledger.held("clip") - self.settings.reserve_bytes >= world.clip.true_bytes
            if fits:
                assert world.clip.placement == "gpu", "CLIP left on the CPU in a clip=gpu mode although it fits"
        self._check_status(core.status("final", world.now))


GateMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MAI_PROPERTY_EXAMPLES", "300")),
    phases=[Phase.explicit, Phase.generate] if os.environ.get("MAI_PROPERTY_NO_SHRINK") else list(Phase),
    stateful_step_count=80,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGate = GateMachine.TestCase


# --- the yield scenario, driven by hand through the same machine (every check above applies) --------------------------


def _machine(**changes: Any) -> GateMachine:
    base = dict(gpu_total_gib=10, gpu_present=True, external_mib=0, reserve_mib=512, vlm_declared_mib=6000,
                vlm_shrink_mib=0, clip_mib=600, release_lag_s=0.3, load_s=3.0, autopilot_grace_s=None, drain_s=2.0,
                idle_timeout_s=300.0, initial_mode="idle", vlm_loaded=False, clip_device="cpu", faults=False)
    machine = GateMachine()
    machine.start(WorldConfig(**{**base, **changes}))
    return machine


def _check(machine: GateMachine) -> None:
    machine.ledger_within_capacity()
    machine.steps_never_overlap()
    machine.leases_drain_in_bounded_time()


@pytest.mark.parametrize(
    ("mode", "gpu_gib", "external_mib", "clip_device", "reply_s"),
    [
        ("recording", 10, 0, "cpu", 1.0),  # the VLM needs the bytes the chat model holds
        ("recording", 10, 0, "gpu", 1.0),  # ...after CLIP went to the CPU
        ("recording", 12, 1024, "cpu", 20.0),  # ...and the chat model finishes its reply first
        ("autopilot", 8, 2048, "cpu", 1.0),  # CLIP's move to the GPU needs them
    ],
)
def test_the_mode_takes_back_the_vram_the_chat_model_holds(mode, gpu_gib, external_mib, clip_device, reply_s):
    """A chat model loaded while the GPU was idle holds bytes the new mode needs: the chat model yields (after the
    reply in progress), the freed VRAM is confirmed, the mode's step runs; the next turn gets what is left."""
    machine = _machine(gpu_total_gib=gpu_gib, external_mib=external_mib, clip_device=clip_device)
    world = machine.world
    machine.chat_turn(0, reply_s)
    machine.advance_a_lot(5.0)
    assert world.chat.current is not None and world.chat.current.key == "qwen3:8b"
    machine.set_mode(0, mode, True, 120.0)
    machine.advance_a_lot(60.0)
    _check(machine)
    (yielded,) = world.sent(ChatYield)
    assert yielded.needed_bytes > 0 and mode in yielded.reason
    assert world.core.mode == mode and world.chat.current is None
    assert (world.vlm.state == "loaded") if mode == "recording" else (world.clip.placement == "gpu")
    (reached,) = [r for r in machine.requests.values() if isinstance(r.message, SetMode)]
    assert isinstance(reached.replies[0], ModeReached)
    assert any(step.startswith("yield chat qwen3:8b") for step in reached.replies[0].steps)
    unloaded_at = next(s.ended_at for s in world.steps if isinstance(s.message, ChatYield))
    allocating = next(s for s in world.steps if isinstance(s.message, LoadVlm) or (
        isinstance(s.message, MoveClip) and s.message.device == "gpu"))
    assert unloaded_at <= allocating.sent_at  # the yield ended before the step that needed its bytes began
    if reply_s > 1.0:
        assert unloaded_at >= 1_000.0 + 2.0 + reply_s  # not before the reply in progress was done
    machine.chat_turn(0, 1.0)
    machine.advance_a_lot(15.0)
    _check(machine)
    assert world.chat.current is not None  # a model that fits in what the mode left
    assert world.vlm.state == "loaded" if mode == "recording" else world.clip.placement == "gpu"
    machine.teardown()
