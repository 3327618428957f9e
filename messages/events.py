"""Events published to subscribers (`mai events`, an ExecutionLoop's `subscribe()`): facts, named as nouns."""

from __future__ import annotations

from dataclasses import dataclass, field
import time

from messages.base import check_int, check_number, check_text
from messages.resources import VramSnapshot


@dataclass(frozen=True)
class ModeChanged:
    mode: str
    previous: str
    duration_s: float
    steps: tuple[str, ...]
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ResourceChanged:
    snapshot: VramSnapshot
    delta_used_bytes: int  # since the previous publication
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class IdleUnloaded:
    model: str
    idle_s: float
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PlacementChanged:
    """The VLM or CLIP moved, or the chat model yielded its VRAM to them; `reason` says why (mode, demand, idle,
    pin, yield, ...)."""

    component: str  # "vlm" | "clip" | "chat"
    state: str  # "loaded" | "unloaded" | "cpu" | "gpu"
    reason: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class FootprintMeasured:
    """The VRAM a model's own load took, measured under the GPU gate (`mai.core.footprints`): it replaces the
    declared footprint of `model` at `context_length` (0: a model without one)."""

    part: str  # "vlm" | "clip" | "chat"
    model: str
    context_length: int
    nbytes: int
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Degraded:
    part: str
    reason: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Recovered:
    part: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PlanRefused:
    """A step was not attempted because it would not fit (invariant 12): says the bytes and what could yield."""

    step: str
    reason: str
    needed_bytes: int
    free_bytes: int
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelSwitched:
    """The conversation agent holds `model` now. When it adopted a model it did not load through the gate (found
    loaded after a restart), `vram_bytes` and `context_length` say what the agent counts it as (measured or declared
    footprint; 0: not said), so the gate counts what a yield would give back (issue 12, hole 4)."""

    previous: str | None
    model: str
    reason: str
    at: float = field(default_factory=time.time)
    vram_bytes: int = 0
    context_length: int = 0

    def __post_init__(self) -> None:
        if self.previous is not None:
            check_text(self, "previous")
        check_text(self, "model")
        check_text(self, "reason", allow_empty=True)
        check_number(self, "at", minimum=None)
        check_int(self, "vram_bytes")
        check_int(self, "context_length")


EVENT_TYPES = (ModeChanged, ResourceChanged, IdleUnloaded, PlacementChanged, Degraded, Recovered, PlanRefused, ModelSwitched)
