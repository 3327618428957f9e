"""One GPU, one name (issue 11, item 8), without a GPU: the sampler and the CLIP mover run as plain objects whose
`send` goes to each other, over the real pynvml and torch.cuda entry points replaced by `mai.sim.nvml` (CUDA order
differing from NVML's, NVML missing while CUDA works, transient init failures raised as pynvml raises them)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from actors import vram_sampler
from actors.clip_mover import ClipMover
from actors.vram_sampler import VramSampler
from backends import vram
from backends.clip import OpenClipAdapter
from backends.vram import NvmlProbe
from config import load_config
from mai.core.gpu_device import normalise_uuid, resolve_cuda_index
from mai.core.retry import Backoff
from mai.core.sampler import NvmlRecovery
from mai.sim.nvml import SimGpu, SimulatedNvml
from messages.errors import NoGpu
from messages.resources import CudaMemory, ReadCudaMemory
from messages.steps import PartHealth, WatchVram

GiB = 2**30
SLOW = SimGpu("NVIDIA T4", "GPU-aaaaaaaa-0000-4000-8000-000000000000", 16 * GiB, 3 * GiB)  # PCI 0
FAST = SimGpu("NVIDIA L40S", "GPU-bbbbbbbb-0000-4000-8000-000000000000", 48 * GiB, 5 * GiB)  # PCI 1


@pytest.fixture(autouse=True)
def fresh_nvml_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vram, "_nvml_library_missing", None)


@pytest.fixture(scope="module")
def tiny() -> OpenClipAdapter:
    return OpenClipAdapter("ViT-Tiny-test", None, seed=0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Bus:
    """Delivers what the two actors send each other at once; keeps what they send anyone else."""

    def __init__(self) -> None:
        self.outside: list[tuple[str, Any]] = []
        self.actors: dict[str, Any] = {}

    def attach(self, role: str, actor: Any) -> Any:
        self.actors[role] = actor
        actor.send = lambda to, msg: self._deliver(to, msg, role)
        actor.wakeupAfter = lambda *args, **kwargs: None
        return actor

    def _deliver(self, to: str, msg: Any, sender: str) -> None:
        if to in self.actors:
            handler = getattr(self.actors[to], f"receiveMsg_{type(msg).__name__}")
            handler(msg, sender)
        else:
            self.outside.append((to, msg))


def _config(device: int | str = 0) -> Any:
    return load_config(env={"HOME": "/tmp"}, overrides={"gpu.device": device, "gpu.backend": "nvml"})


def _wire(monkeypatch: pytest.MonkeyPatch, sim: SimulatedNvml, tiny: OpenClipAdapter, device: int | str = 0):
    clock = Clock()
    monkeypatch.setattr(vram_sampler, "time", clock)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # what the CLIP process sets before CUDA starts
    cfg = _config(device)
    bus = Bus()
    sampler, mover = bus.attach("sampler", VramSampler()), bus.attach("clip", ClipMover())
    mover.config, mover.peers, mover.adapter = cfg, {"coordinator": "coordinator"}, tiny
    sampler.config, sampler.peers = cfg, {"clip": "clip"}
    return clock, bus, sampler, mover


def _boot(sampler: VramSampler, cfg: Any) -> None:
    sampler.on_init(SimpleNamespace(config=cfg))
    sampler.receiveMsg_WatchVram(WatchVram("w1"), "coordinator")


# --------------------------------------------------------------------------------------------- pure decisions


def test_uuid_matching_finds_the_same_gpu_whatever_cuda_calls_it() -> None:
    cuda = [FAST.uuid[4:], SLOW.uuid[4:]]  # CUDA fastest first, torch's form without "GPU-"
    assert resolve_cuda_index(SLOW.uuid, cuda, None) == (1, None)
    index, note = resolve_cuda_index(0, cuda, SLOW.uuid)  # NVML index 0 is the T4
    assert index == 1 and note is not None and "CUDA device 1" in note
    assert resolve_cuda_index(1, cuda, FAST.uuid)[0] == 0
    assert resolve_cuda_index(1, cuda, None) == (1, None)  # no NVML: PCI_BUS_ID order is trusted
    with pytest.raises(NoGpu, match=r"not among CUDA's devices .*CUDA_VISIBLE_DEVICES") as info:
        resolve_cuda_index(0, [FAST.uuid[4:]], SLOW.uuid)  # CUDA_VISIBLE_DEVICES hides the GPU NVML watches
    assert info.value.details["cause"] == "uuid_mismatch"
    with pytest.raises(NoGpu, match="out of range"):
        resolve_cuda_index(2, cuda, None)
    assert normalise_uuid(FAST.uuid[4:].upper()) == FAST.uuid


def test_nvml_recovery_backs_off_exponentially_and_never_retries_a_missing_library() -> None:
    recovery = NvmlRecovery(Backoff(1.0, 8.0))
    assert [recovery.failed(0.0, permanent=False) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not recovery.due(7.9) and recovery.due(8.0)
    recovery.recovered()
    assert recovery.failed(10.0, permanent=False) == 11.0  # back to the first gap after a success
    assert recovery.failed(20.0, permanent=True) is None and not recovery.due(1e9)


# --------------------------------------------------------------------------------------------- NVML probe


def test_nvml_probe_finds_the_gpu_by_uuid_or_pci_index(monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedNvml([SLOW, FAST], cuda_order=[1, 0]).install(monkeypatch)
    with NvmlProbe(FAST.uuid) as probe:
        snap = probe.snapshot()
    assert (snap.device_name, snap.device_uuid, snap.total_bytes) == (FAST.name, FAST.uuid, FAST.total_bytes)
    with NvmlProbe(0) as probe:
        assert probe.snapshot().device_uuid == SLOW.uuid  # NVML index = PCI order, whatever CUDA says
    with pytest.raises(NoGpu, match=f"no GPU with UUID GPU-cccccccc.*NVML sees {SLOW.uuid}, {FAST.uuid}"):
        NvmlProbe("GPU-cccccccc-0000-4000-8000-000000000000")


# --------------------------------------------------------------------------------------------- sampler + CLIP


def test_nvml_missing_while_cuda_works_reads_vram_through_the_clip_process(
    monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter
) -> None:
    sim = SimulatedNvml([SLOW, FAST], cuda_order=[1, 0], library_missing=True).install(monkeypatch)
    sim.install_cuda(monkeypatch)
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny, device=0)
    _boot(sampler, sampler.config)

    snap = sampler.core.last
    assert (snap.source, snap.gpu_present, snap.device_uuid) == ("torch", True, SLOW.uuid)  # the T4, not CUDA's 0
    assert snap.free_bytes == SLOW.total_bytes - SLOW.used_bytes
    assert sampler.degraded_reason is not None and "no GPU" not in sampler.degraded_reason
    assert "torch.cuda.mem_get_info in the CLIP process" in sampler.degraded_reason
    assert "retrying" not in sampler.degraded_reason  # a missing library is final
    health = [m for to, m in bus.outside if isinstance(m, PartHealth) and m.part == "gpu"]
    assert health[-1].reason == sampler.degraded_reason

    SLOW.used_bytes += 2 * GiB  # the next sample asks CLIP again and relays the change
    try:
        clock.now += 0.25
        sampler.receiveMsg_WakeupMessage(SimpleNamespace(payload=None), "self")
        assert sampler.core.last.used_bytes == SLOW.used_bytes
    finally:
        SLOW.used_bytes -= 2 * GiB
    clock.now += 3600
    sampler.receiveMsg_WakeupMessage(SimpleNamespace(payload=None), "self")
    assert sim.init_attempts == 1  # LibraryNotFound: never probed again


def test_cuda_unusable_too_means_host_memory_and_says_both_causes(
    monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter
) -> None:
    sim = SimulatedNvml([SLOW], library_missing=True).install(monkeypatch)  # no install_cuda: this CPU-only torch
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny)
    _boot(sampler, sampler.config)
    assert sampler.core.last.source == "psutil"
    assert sampler.degraded_reason.startswith("no GPU: NVML Shared Library Not Found; CUDA: ")


def test_transient_nvml_failures_are_retried_with_backoff_and_recover(
    monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter
) -> None:
    # The sampler's init at boot, the CLIP process's own init, the sampler's first retry: then the driver is up.
    sim = SimulatedNvml([SLOW, FAST], init_failures=[pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
                                                     pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
                                                     pynvml.NVML_ERROR_DRIVER_NOT_LOADED]).install(monkeypatch)
    sim.install_cuda(monkeypatch)
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny, device=FAST.uuid)
    _boot(sampler, sampler.config)
    assert sampler.core.last.source == "torch" and "retrying NVML" in sampler.degraded_reason

    def tick(dt: float) -> None:
        clock.now += dt
        sampler.receiveMsg_WakeupMessage(SimpleNamespace(payload=None), "self")

    booted = sim.init_attempts
    tick(0.9)
    assert sim.init_attempts == booted
    tick(0.1)  # 1 s after the first failure: tried again, fails again, next gap 2 s
    assert sim.init_attempts == booted + 1 and sampler.nvml_failure is not None
    tick(1.9)
    assert sim.init_attempts == booted + 1
    tick(0.1)
    assert sim.init_attempts == booted + 2 and sampler.nvml_failure is None
    assert (sampler.core.last.source, sampler.core.last.device_uuid, sampler.degraded_reason) == ("nvml", FAST.uuid, None)
    assert [m for _, m in bus.outside if isinstance(m, PartHealth)][-1] == PartHealth("gpu", True, "")

    sim.query_failure = pynvml.NVML_ERROR_GPU_IS_LOST  # mid-run: the GPU falls off the bus
    tick(0.25)
    assert sampler.nvml_failure is not None and "GPU is lost" in sampler.degraded_reason
    assert sampler.core.last.source == "torch"
    sim.query_failure = None
    tick(1.0)
    assert sampler.nvml_failure is None and sampler.core.last.source == "nvml"


def test_clip_resolves_the_gpu_by_uuid_and_reports_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter
) -> None:
    sim = SimulatedNvml([SLOW, FAST], cuda_order=[1, 0]).install(monkeypatch)
    sim.install_cuda(monkeypatch)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # CUDA started before the variable could take effect
    bus = Bus()
    mover = bus.attach("clip", ClipMover())
    mover.config, mover.peers, mover.adapter = _config(0), {"coordinator": "coordinator"}, tiny
    assert mover._gpu() == 1 and mover.gpu_uuid == SLOW.uuid  # NVML 0 is CUDA 1

    sim.cuda_order = [1]  # CUDA_VISIBLE_DEVICES leaves only the L40S visible
    sim.install_cuda(monkeypatch)
    mover = bus.attach("clip", ClipMover())
    mover.config, mover.peers, mover.adapter = _config(0), {"coordinator": "coordinator"}, tiny
    with pytest.raises(NoGpu, match="not among CUDA's devices"):
        mover._gpu()
    health = [m for _, m in bus.outside if isinstance(m, PartHealth) and m.part == "clip"]
    assert health and not health[-1].ok and SLOW.uuid in health[-1].reason
    mover._send_reading("r1", "sampler")
    reply = bus.outside[-1][1]
    assert isinstance(reply, CudaMemory) and reply.snapshot is None and "CUDA_VISIBLE_DEVICES" in reply.reason


def test_clip_process_sets_pci_bus_order_before_cuda_starts(monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    mover = Bus().attach("clip", ClipMover())
    mover.config, mover.peers, mover.adapter = _config(0), {}, tiny
    mover.on_init(SimpleNamespace(config=mover.config))
    import os

    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert ReadCudaMemory("x").request_id == "x"


def test_a_clip_without_weights_still_reads_cuda_for_the_sampler(monkeypatch: pytest.MonkeyPatch,
                                                                  tiny: OpenClipAdapter) -> None:
    """CLIP's weights failed to load (offline, corrupt checkpoint) while NVML is missing: whether CUDA works has
    nothing to do with the weights, so the VRAM reading still comes from torch in the CLIP process (seen as
    "CUDA: CLIP model ... unavailable" in `mai status` before)."""
    sim = SimulatedNvml([SLOW, FAST], cuda_order=[1, 0], library_missing=True).install(monkeypatch)
    sim.install_cuda(monkeypatch)
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny, device=0)
    mover.adapter, mover.failure = None, "CLIP model 'ViT-B-32' unavailable: LocalEntryNotFoundError: offline"
    _boot(sampler, sampler.config)
    snap = sampler.core.last
    assert (snap.source, snap.gpu_present, snap.device_uuid) == ("torch", True, SLOW.uuid)
    assert "LocalEntryNotFoundError" not in (sampler.degraded_reason or "")


def test_a_clip_without_weights_names_cudas_own_cause(monkeypatch: pytest.MonkeyPatch, tiny: OpenClipAdapter) -> None:
    sim = SimulatedNvml([SLOW], library_missing=True).install(monkeypatch)  # this CPU-only torch: no CUDA
    clock, bus, sampler, mover = _wire(monkeypatch, sim, tiny)
    mover.adapter, mover.failure = None, "CLIP model 'ViT-B-32' unavailable: LocalEntryNotFoundError: offline"
    _boot(sampler, sampler.config)
    assert sampler.core.last.source == "psutil"
    assert "LocalEntryNotFoundError" not in sampler.degraded_reason
    assert "torch" in sampler.degraded_reason.split("CUDA: ", 1)[1]
