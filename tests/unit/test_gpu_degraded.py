"""The GPU's readings degraded (issue 12, holes 3 and 7): the coordinator core in virtual time, fed what the
VramSampler actor really sends.

- Hole 3: a sampler that cannot read answers every WaitVramFree with `StepFailed(..., "VRAM could not be read")`
  (`actors/vram_sampler.py`, `receiveMsg_WaitVramFree`). The coordinator used to ask for a new reading before every
  freeing step, forever. Now reads back off, `gpu` shows degraded, and freeing steps still run.
- Hole 7: NVML missing while CUDA works: the readings come from torch in the CLIP process (source "torch",
  `gpu_present=True`) and the sampler reports `gpu` degraded. Fit checks run against those readings (never
  "unlimited"), CLIP may go to the GPU, and status says which readings the fit checks use.
"""

from __future__ import annotations

import heapq
import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from mai.core.coordinator import Coordinator, Publish, ReadVram, Reply, SendStep, Tick, WakeAt
from messages.conversation import GetGrantable, Grantable
from messages.events import Degraded, Recovered
from messages.failure import Failure
from messages.requests import ModeReached, PlaceClip, ClipPlaced, SetMode
from messages.resources import VramSnapshot
from messages.steps import (
    ClipMoved,
    ClipObserved,
    LoadVlm,
    MoveClip,
    PartHealth,
    StepFailed,
    UnloadVlm,
    VlmLoaded,
    VlmObserved,
    VlmUnloaded,
    VramReading,
    VramRecovered,
    WaitVramFree,
)
from tests.unit.test_coordinator import GIB, MIB, MODEL, settings

SAMPLER_CANNOT_READ = "VRAM could not be read"  # the sampler's own words (actors/vram_sampler.py)


class Driver:
    """Delivers to the core in virtual time and answers its steps as the actors do; the sampler's answers are
    `sampler_ok` readings of `free_bytes`, or its StepFailed when it cannot read."""

    def __init__(self, core: Coordinator, *, free_bytes: int = 10 * GIB, sampler_ok: bool = True,
                 source: str = "nvml") -> None:
        self.core, self.now = core, 0.0
        self.free_bytes, self.sampler_ok, self.source = free_bytes, sampler_ok, source
        self.degraded: str | None = None  # what the sampler says of its readings (VramReading.degraded_reason)
        self.queue: list[tuple[float, int, Any, Any]] = []
        self.seq = itertools.count()
        self.sent: list[Any] = []
        self.replies: list[Any] = []
        self.events: list[Any] = []
        self.deliveries = 0

    def snapshot(self) -> VramSnapshot:
        total = 12 * GIB
        return VramSnapshot(total, total - self.free_bytes, self.free_bytes, self.source, "gpu", self.now)

    def at(self, when: float, msg: Any, sender: Any) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), msg, sender))

    def send(self, msg: Any, sender: Any = "client") -> None:
        self.at(self.now, msg, sender)
        self.run(self.now)

    def run(self, until: float, max_deliveries: int = 5000) -> None:
        while self.queue and self.queue[0][0] <= until and self.deliveries < max_deliveries:
            when, _, msg, sender = heapq.heappop(self.queue)
            self.now = max(self.now, when)
            self.deliveries += 1
            for effect in self.core.handle(msg, sender, self.now):
                self.execute(effect)
        self.now = max(self.now, until)

    def execute(self, effect: Any) -> None:
        if isinstance(effect, SendStep):
            m = effect.message
            self.sent.append(m)
            if isinstance(m, WaitVramFree):
                answer = (VramRecovered(m.step_id, self.snapshot(), 0, 0.01, True) if self.sampler_ok
                          else StepFailed(m.step_id, Failure(m.step_id, "internal", SAMPLER_CANNOT_READ)))
                self.at(self.now + 0.01, answer, "sampler")
            elif isinstance(m, LoadVlm):
                self.free_bytes -= 5 * GIB
                self.at(self.now + 4.0, VlmLoaded(m.step_id, MODEL, 5 * GIB, 5 * GIB, 4.0), "vlm")
            elif isinstance(m, UnloadVlm):
                self.free_bytes += 5 * GIB
                self.at(self.now + 0.4, VlmUnloaded(m.step_id, MODEL, 0.4), "vlm")
            elif isinstance(m, MoveClip):
                device = "cuda:0" if m.device == "gpu" else "cpu"
                self.free_bytes += -600 * MIB if m.device == "gpu" else 600 * MIB
                self.at(self.now + 0.05, ClipMoved(m.step_id, device, 600 * MIB, 0.05), "clip")
        elif isinstance(effect, ReadVram) and self.sampler_ok:
            self.at(self.now + 0.01, VramReading("read", self.snapshot(), self.degraded), "sampler")
        elif isinstance(effect, WakeAt):
            self.at(effect.at, Tick(), None)
        elif isinstance(effect, Reply):
            self.replies.append(effect.message)
        elif isinstance(effect, Publish):
            self.events.append(effect.event)

    def reads(self) -> list[WaitVramFree]:
        return [m for m in self.sent if isinstance(m, WaitVramFree)]


def _recording_with_the_vlm_just_loaded() -> Driver:
    """RECORDING reached; the VLM's load is still uncertain in the estimate (no reading since it completed)."""
    d = Driver(Coordinator(settings(), 0.0))
    d.send(VramReading("watch", d.snapshot(), None), "sampler")
    d.send(VlmObserved(MODEL, False, 0, 0), "vlm")
    d.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    d.sampler_ok = False  # from here on the sampler cannot read (the ReadVram after the load goes unanswered)
    d.send(SetMode("r", "recording", wait=True))
    d.run(10.0)
    assert any(isinstance(r, ModeReached) for r in d.replies)
    return d


def test_failing_readings_back_off_report_the_gpu_and_let_freeing_steps_run() -> None:
    d = _recording_with_the_vlm_just_loaded()
    d.send(SetMode("a", "autopilot"))
    d.run(120.0)
    assert d.deliveries < 5000, "the coordinator and the sampler loop"
    reads = d.reads()
    assert 1 <= len(reads) <= 12, f"{len(reads)} reads in 120 s: reads must back off"
    assert any(isinstance(m, UnloadVlm) for m in d.sent), "a freeing step never waits on a reading"
    degraded = dict(d.core.status("s", d.now).degraded)
    assert "gpu" in degraded and SAMPLER_CANNOT_READ in degraded["gpu"]
    assert [e for e in d.events if isinstance(e, Degraded) and e.part == "gpu"]
    assert "readings failing" in d.core.status("s", d.now).fits_against

    d.sampler_ok = True  # the driver is back: the next read (after its backoff) clears the degradation
    d.run(d.now + 130.0)
    assert "gpu" not in dict(d.core.status("s", d.now).degraded)
    assert [e for e in d.events if isinstance(e, Recovered) and e.part == "gpu"]
    assert d.core.mode == "autopilot" and any(isinstance(m, MoveClip) and m.device == "gpu" for m in d.sent)


def test_torch_readings_keep_fit_checks_on_and_clip_on_the_gpu() -> None:
    """NVML missing, CUDA working: the sampler's real messages (PartHealth with its fallback reason, readings from
    torch) — the chat gate grants against them and CLIP may be placed on the GPU."""
    from mai.core.sampler import fallback_reason

    d = Driver(Coordinator(settings(), 0.0), free_bytes=4 * GIB, source="torch")
    reason = fallback_reason("NVML Shared Library Not Found", True, True, None)
    d.degraded = reason
    d.send(PartHealth("gpu", False, reason), "sampler")
    d.send(VramReading("watch", d.snapshot(), reason), "sampler")
    d.send(VlmObserved(MODEL, False, 0, 0), "vlm")
    d.send(ClipObserved("cpu", 600 * MIB, True, "ViT-B-32"), "clip")
    d.send(GetGrantable("g"))
    (grantable,) = [r for r in d.replies if isinstance(r, Grantable)]
    assert grantable.grantable_bytes is not None and grantable.grantable_bytes <= 4 * GIB - 512 * MIB
    d.send(PlaceClip("p", "gpu"))
    d.run(5.0)
    assert any(isinstance(r, ClipPlaced) for r in d.replies), d.replies
    status = d.core.status("s", d.now)
    assert "torch.cuda.mem_get_info" in status.fits_against
    assert dict(status.degraded)["gpu"] == reason


def test_host_memory_readings_still_bound_chat_grants() -> None:
    """No GPU reading at all (NVML and CUDA both unusable, psutil stands in): chat grants are bounded by the host
    memory reading, never unlimited; status says so."""
    core = Coordinator(settings(), 0.0)
    host = VramSnapshot(16 * GIB, 10 * GIB, 6 * GIB, "psutil", "host memory (no GPU)", 0.0, gpu_present=False)
    core.handle(VramReading("watch", host, "no GPU: NVML Shared Library Not Found; CUDA: no CUDA"), "sampler", 0.0)
    replies = [e.message for e in core.handle(GetGrantable("g"), "chat", 0.1) if isinstance(e, Reply)]
    assert replies == [Grantable("g", 6 * GIB - 512 * MIB, None, 6 * GIB - 512 * MIB)]
    assert "host memory" in core.status("s", 0.2).fits_against
    assert "no reading" in Coordinator(settings(), 0.0).status("s", 0.0).fits_against


# --------------------------------------------------------------------------------- the real sampler, GPU lost mid-run


def test_gpu_lost_mid_run_through_the_real_sampler(monkeypatch, tiny_clip) -> None:
    """The VramSampler and the CLIP mover as plain objects over `mai.sim.nvml` (pynvml raising the real
    NVMLError_GpuIsLost inside nvmlDeviceGetMemoryInfo), the coordinator core behind them: the sampler reports the
    change of health when it happens (not only at start), the coordinator's reads stay bounded, the VLM unload
    runs, fit checks go on against torch's readings from the CLIP process, and retrying NVML while the GPU still
    cannot be read does not flap the health."""
    import pynvml

    from backends import vram
    from tests.unit.test_gpu_identity import FAST, _boot, _wire

    monkeypatch.setattr(vram, "_nvml_library_missing", None)
    gpu = FAST.__class__(FAST.name, FAST.uuid, 24 * GIB, 2 * GIB)
    from mai.sim.nvml import SimulatedNvml

    sim = SimulatedNvml([gpu]).install(monkeypatch)
    sim.install_cuda(monkeypatch)
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny_clip, device=0)
    core = Coordinator(settings(), clock.now)
    inbox: list[tuple[Any, str]] = []
    received: list[Any] = []  # what the sampler sent the coordinator
    sent: list[Any] = []

    class Shell:  # the ModeCoordinator actor's part: messages in, the core's effects executed
        def __getattr__(self, name: str) -> Any:
            if not name.startswith("receiveMsg_"):
                raise AttributeError(name)
            return lambda msg, sender: (received.append(msg), inbox.append((msg, sender)))

    bus.attach("coordinator", Shell())
    sampler.peers["coordinator"] = "coordinator"

    def pump() -> None:
        while inbox:
            msg, sender = inbox.pop(0)
            for effect in core.handle(msg, sender, clock.now):
                if isinstance(effect, SendStep):
                    m = effect.message
                    sent.append(m)
                    if isinstance(m, WaitVramFree):
                        sampler.receiveMsg_WaitVramFree(m, "coordinator")
                    elif isinstance(m, LoadVlm):
                        gpu.used_bytes += 5 * GIB
                        inbox.append((VlmLoaded(m.step_id, MODEL, 5 * GIB, 5 * GIB, 4.0), "vlm"))
                    elif isinstance(m, UnloadVlm):
                        gpu.used_bytes -= 5 * GIB
                        inbox.append((VlmUnloaded(m.step_id, MODEL, 0.4), "vlm"))
                    elif isinstance(m, MoveClip):
                        gpu.used_bytes += 600 * MIB if m.device == "gpu" else -600 * MIB
                        device = "cuda:0" if m.device == "gpu" else "cpu"
                        inbox.append((ClipMoved(m.step_id, device, 600 * MIB, 0.05), "clip"))
                elif isinstance(effect, ReadVram):
                    from messages.steps import GetVram

                    sampler.receiveMsg_GetVram(GetVram("read"), "coordinator")

    def tick(dt: float) -> None:
        clock.now += dt
        sampler.receiveMsg_WakeupMessage(SimpleNamespace(payload=None), "self")
        sampler.receiveMsg_WakeupMessage(SimpleNamespace(payload="poll"), "self")
        inbox.append((Tick(), None))
        pump()

    _boot(sampler, sampler.config)  # NVML opens; the WatchVram's health and first reading reach the core
    inbox.append((VlmObserved(MODEL, False, 0, 0), "vlm"))
    inbox.append((ClipObserved("cpu", 600 * MIB, True, "ViT-Tiny-test"), "clip"))
    inbox.append((SetMode("r", "recording"), "client"))
    pump()
    for _ in range(20):
        tick(0.25)
    assert core.mode == "recording" and sampler.degraded_reason is None

    sim.query_failure = pynvml.NVML_ERROR_GPU_IS_LOST  # an Xid error: the GPU falls off the bus
    inbox.append((SetMode("a", "autopilot"), "client"))
    pump()
    for _ in range(480):  # two minutes of samples, NVML retried with backoff all along
        tick(0.25)
    health = [m for m in received if isinstance(m, PartHealth) and m.part == "gpu"]
    assert any(not h.ok and "GPU is lost" in h.reason for h in health), "the sampler reports the change"
    assert [h.ok for h in health].count(True) == 1, "only the boot's: retries that cannot read do not flap"
    reads = [m for m in sent if isinstance(m, WaitVramFree)]
    assert len(reads) <= 12
    assert any(isinstance(m, UnloadVlm) for m in sent)
    status = core.status("s", clock.now)
    assert "GPU is lost" in dict(status.degraded)["gpu"]
    assert "torch.cuda.mem_get_info" in status.fits_against
    assert core.mode == "autopilot" and any(isinstance(m, MoveClip) and m.device == "gpu" for m in sent)


@pytest.fixture(scope="module")
def tiny_clip():
    from backends.clip import OpenClipAdapter

    return OpenClipAdapter("ViT-Tiny-test", None, seed=0)
