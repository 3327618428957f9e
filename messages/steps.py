"""The GPU gate's vocabulary: steps the coordinator grants, one at a time, to the actor owning the resource,
and what those actors report back (results of steps, and what they observe of the world on their own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from messages.base import check_choice, check_instance, check_int, check_number, check_text
from messages.failure import Failure
from messages.resources import VramSnapshot

PARTS = ("gpu", "vlm", "clip", "chat")


@dataclass(frozen=True)
class LoadVlm:
    step_id: str
    model: str

    def __post_init__(self) -> None:
        check_text(self, "step_id")
        check_text(self, "model")


@dataclass(frozen=True)
class UnloadVlm:
    step_id: str
    model: str

    def __post_init__(self) -> None:
        check_text(self, "step_id")
        check_text(self, "model")


@dataclass(frozen=True)
class MoveClip:
    step_id: str
    device: str  # "cpu" | "gpu"

    def __post_init__(self) -> None:
        check_text(self, "step_id")
        check_choice(self, "device", ("cpu", "gpu"))


@dataclass(frozen=True)
class WaitVramFree:
    """Ask the sampler to answer once free VRAM rose by `fraction` of `expected_bytes` over the baseline, or at
    the timeout (Ollama's own waitForVRAMRecovery: 250 ms polls, 75 %, 5 s)."""

    step_id: str
    baseline_free_bytes: int
    expected_bytes: int
    fraction: float = 0.75
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        check_text(self, "step_id")
        check_int(self, "baseline_free_bytes")
        check_int(self, "expected_bytes")
        check_number(self, "fraction", minimum=0.0, maximum=1.0)
        check_number(self, "timeout_s")


@dataclass(frozen=True)
class VlmLoaded:
    step_id: str
    model: str
    size_bytes: int
    size_vram_bytes: int
    load_s: float
    attempts: int = 1

    @property
    def partial_offload(self) -> bool:
        return self.size_vram_bytes < self.size_bytes


@dataclass(frozen=True)
class VlmUnloaded:
    step_id: str
    model: str
    unload_s: float
    attempts: int = 1


@dataclass(frozen=True)
class ClipMoved:
    step_id: str
    device: str  # where the weights are now: "cpu", "cuda:0", "sim-gpu"
    footprint_bytes: int
    move_s: float


@dataclass(frozen=True)
class VramRecovered:
    step_id: str
    snapshot: VramSnapshot
    recovered_bytes: int
    waited_s: float
    complete: bool  # False: the timeout ran out first


@dataclass(frozen=True)
class StepFailed:
    step_id: str
    failure: Failure


@dataclass(frozen=True)
class VlmObserved:
    """The VLM loader's reading of Ollama (at start, after a restart, after a probe): ground truth for plans."""

    model: str
    loaded: bool
    size_bytes: int = 0
    size_vram_bytes: int = 0
    pinned: bool = True  # False: loaded, but Ollama unloads it by itself at expires_at (another client's keep_alive)
    # time.time() when the loader began reading Ollama (0: not said). Thespian may deliver a probe's report after the
    # result of a step that began later; the step's result is the newer truth (not compared: equal readings are equal).
    observed_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class ClipObserved:
    device: str
    footprint_bytes: int
    ready: bool
    model: str
    pid: int = 0  # the CLIP process: tells its row in NVML's per-process figures apart (0: not known)
    # time.time() when the mover read its state (0: not said). Thespian may deliver two reports, or a report and a
    # move's result, out of order; the newest reading is the truth (not compared: equal readings are equal).
    observed_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class PartHealth:
    """A part of the system became degraded (ok=False, with the reason) or recovered (ok=True)."""

    part: str
    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        check_choice(self, "part", PARTS)
        check_instance(self, "ok", bool)
        check_text(self, "reason", allow_empty=True)


@dataclass(frozen=True)
class WatchVram:
    """Coordinator → sampler: send me ResourceChanged events and the first reading now."""

    request_id: str


@dataclass(frozen=True)
class GetVram:
    request_id: str


@dataclass(frozen=True)
class VramReading:
    request_id: str
    snapshot: VramSnapshot
    degraded_reason: str | None


@dataclass(frozen=True)
class Reobserve:
    """Coordinator → executors (after the coordinator restarts): report what you observe now."""

    request_id: str = ""
