"""Facts about the GPU: what a VRAM sample says and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from messages.base import check_choice, check_instance, check_int, check_number, check_text, invalid

VRAM_SOURCES = ("nvml", "torch", "psutil", "simulated")

SOURCE_TEXT = {
    "nvml": "NVML",
    "torch": "torch.cuda.mem_get_info in the CLIP process",  # NVML missing while CUDA works (containers)
    "psutil": "host memory via psutil",
    "simulated": "the simulated GPU ledger",
}
"""How each source is named to a human (status)."""


@dataclass(frozen=True)
class GpuProcess:
    """One process's use of the GPU as NVML reports it (its CUDA context included). `name` and `parent_name` come
    from psutil and are empty when it cannot tell (access denied, the process gone, or a host PID that a
    container's PID namespace does not show: real-servers.md N2)."""

    pid: int
    name: str
    used_bytes: int
    parent_name: str = ""

    def __post_init__(self) -> None:
        check_int(self, "pid")
        check_text(self, "name", allow_empty=True, max_len=256)
        check_int(self, "used_bytes")
        check_text(self, "parent_name", allow_empty=True, max_len=256)


@dataclass(frozen=True)
class VramSnapshot:
    """One reading of device memory. `source` says how it was read: NVML, `torch.cuda.mem_get_info` in the CLIP
    process (a container without the NVML library still has CUDA), psutil (no GPU: host RAM stands in, and
    `gpu_present` is False) or the simulated GPU ledger used by tests and `mai demo`. `device_uuid` names the
    physical GPU ("GPU-..."; empty when there is none or the source cannot tell).

    `per_process` is True when NVML reported every process's used bytes; `processes` then lists them (possibly
    none). Otherwise `processes` is empty and `per_process_note` says why (WDDM reports no figures, WSL2 answers
    NotSupported; N2), so footprints fall back to the device-wide change."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    source: str
    device_name: str
    taken_at: float  # time.time() of the reading
    gpu_present: bool = True
    device_uuid: str = ""
    processes: tuple[GpuProcess, ...] = ()
    per_process: bool = False
    per_process_note: str = ""  # why per-process figures are missing (empty when present or never asked for)

    def __post_init__(self) -> None:
        for name in ("total_bytes", "used_bytes", "free_bytes"):
            check_int(self, name)
        check_choice(self, "source", VRAM_SOURCES)
        check_text(self, "device_name", allow_empty=True)
        check_number(self, "taken_at")
        check_instance(self, "gpu_present", bool)
        check_text(self, "device_uuid", allow_empty=True, max_len=96)
        check_instance(self, "processes", tuple)
        check_instance(self, "per_process", bool)
        check_text(self, "per_process_note", allow_empty=True, max_len=500)
        pids = set()
        for row in self.processes:
            if not isinstance(row, GpuProcess) or row.pid in pids:
                raise invalid("VramSnapshot", "processes", self.processes, "a tuple of GpuProcess with distinct pids")
            pids.add(row.pid)
        if self.processes and not self.per_process:
            raise invalid("VramSnapshot", "processes", self.processes, "() unless per_process is True")

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True)
class ReadCudaMemory:
    """Sampler → CLIP mover, while NVML is unusable: read the GPU's memory with `torch.cuda.mem_get_info` in the
    process that already holds a CUDA context (a monitor must not create one of its own)."""

    request_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class CudaMemory:
    """CLIP mover → sampler: the reading (source "torch"), or None with the reason when CUDA is unusable too. Also
    pushed after each move of CLIP, the moments the coordinator's next decision depends on."""

    request_id: str
    snapshot: VramSnapshot | None
    reason: str = ""

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        if self.snapshot is not None:
            check_instance(self, "snapshot", VramSnapshot)
        check_text(self, "reason", allow_empty=True)
