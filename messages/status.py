"""The complete status (invariant 11): mode, VRAM, VLM, CLIP, chat model, degraded parts, plan in progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from messages.resources import VramSnapshot


@dataclass(frozen=True)
class VlmStatus:
    model: str
    state: str  # unloaded | loading | loaded | unloading | unknown
    size_bytes: int
    size_vram_bytes: int
    footprint_bytes: int  # learned (measured) or declared
    footprint_learned: bool
    leases: int
    host: str

    @property
    def partial_offload(self) -> bool:
        return 0 < self.size_vram_bytes < self.size_bytes


@dataclass(frozen=True)
class ClipStatus:
    model: str
    device: str  # where the weights are: cpu | cuda:0 | sim-gpu | unknown
    footprint_bytes: int
    ready: bool
    footprint_learned: bool = False  # measured (a VRAM delta across its move to the GPU), else declared or reported


@dataclass(frozen=True)
class GpuUseStatus:
    """The last reading's per-process rows (NVML), attributed by mai.core.attribution: bytes per part of Mai
    ("ollama", "lmstudio", "clip") and other programs' bytes by process name, largest first."""

    mai: tuple[tuple[str, int], ...]
    others: tuple[tuple[str, int], ...]

    @property
    def other_bytes(self) -> int:
        return sum(n for _, n in self.others)


@dataclass(frozen=True)
class Status:
    request_id: str
    mode: str
    target_mode: str
    vram: VramSnapshot | None
    reserve_bytes: int
    vlm: VlmStatus
    clip: ClipStatus
    chat_model: str | None
    degraded: tuple[tuple[str, str], ...]  # (part, reason)
    plan: tuple[str, ...]  # steps still to run toward the target
    step_in_flight: str | None
    at: float
    chat_footprint_bytes: int = 0  # what the chat model holds, as Mai counts it (0: none loaded)
    chat_footprint_learned: bool = False  # measured, else declared
    step_in_flight_s: float | None = None  # how long the step in flight has run (a cold VLM load takes minutes)
    gpu_use: GpuUseStatus | None = None  # None: no per-process figures (vram.per_process_note says why)
    fits_against: str = ""  # which reading the fit checks use (NVML, torch in the CLIP process, host memory, none yet)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["vlm"]["partial_offload"] = self.vlm.partial_offload
        data["degraded"] = [{"part": p, "reason": r} for p, r in self.degraded]
        data["plan"] = list(self.plan)
        if self.gpu_use is not None:
            data["gpu_use"] = {"mai": [{"part": p, "bytes": n} for p, n in self.gpu_use.mai],
                               "other_programs": [{"name": name, "bytes": n} for name, n in self.gpu_use.others],
                               "other_bytes": self.gpu_use.other_bytes}
        return data
