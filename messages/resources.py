"""Facts about the GPU: what a VRAM sample says and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from messages.base import check_choice, check_instance, check_int, check_number, check_text

VRAM_SOURCES = ("nvml", "psutil", "simulated")


@dataclass(frozen=True)
class VramSnapshot:
    """One reading of device memory. `source` says how it was read: NVML, psutil (no GPU: host RAM stands in,
    and `gpu_present` is False) or the simulated GPU ledger used by tests and `mai demo`."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    source: str
    device_name: str
    taken_at: float  # time.time() of the reading
    gpu_present: bool = True

    def __post_init__(self) -> None:
        for name in ("total_bytes", "used_bytes", "free_bytes"):
            check_int(self, name)
        check_choice(self, "source", VRAM_SOURCES)
        check_text(self, "device_name", allow_empty=True)
        check_number(self, "taken_at")
        check_instance(self, "gpu_present", bool)

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0
