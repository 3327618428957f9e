"""What clients (an ExecutionLoop, the CLI) ask the mode coordinator, and its typed answers.

Every request carries a `request_id`; the answer repeats it (Thespian's `ask` returns whatever arrives next,
so clients match replies by id). A failure is always `messages.failure.Failure`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from messages.base import check_choice, check_instance, check_number, check_text, invalid

MODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CLIP_PLACEMENTS = ("cpu", "gpu")


def check_mode_name(obj: object, field: str) -> None:
    value = getattr(obj, field)
    if not isinstance(value, str) or not MODE_NAME.fullmatch(value):
        raise invalid(type(obj).__name__, field, value, "a mode name such as 'autopilot', 'recording' or 'idle'")


@dataclass(frozen=True)
class SetMode:
    request_id: str
    mode: str
    wait: bool = False  # False: answer ModeAccepted at once; True: answer ModeReached when the plan is done
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        object.__setattr__(self, "mode", self.mode.lower() if isinstance(self.mode, str) else self.mode)
        check_mode_name(self, "mode")
        check_instance(self, "wait", bool)
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class ModeAccepted:
    request_id: str
    mode: str
    plan: tuple[str, ...]  # the steps planned now, human-readable


@dataclass(frozen=True)
class ModeReached:
    request_id: str
    mode: str
    duration_s: float
    steps: tuple[str, ...]


@dataclass(frozen=True)
class EnsureVlm:
    """Make the VLM loaded (or unloaded) and answer only once it is (invariant 7)."""

    request_id: str
    loaded: bool
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_instance(self, "loaded", bool)
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class VlmReady:
    request_id: str
    loaded: bool
    model: str
    size_vram_bytes: int


@dataclass(frozen=True)
class AcquireLease:
    """Ask to use the VLM: it is loaded on demand, and never unloaded while the lease is held (until it expires)."""

    request_id: str
    holder: str
    ttl_s: float = 120.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "holder", max_len=200)
        check_number(self, "ttl_s", minimum=0.001, maximum=24 * 3600)
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class LeaseGranted:
    request_id: str
    lease_id: str
    model: str
    host: str  # where the client calls Ollama directly (data plane)
    num_ctx: int  # send these load options on every request, or Ollama silently reloads
    expires_in_s: float


@dataclass(frozen=True)
class ReleaseLease:
    request_id: str
    lease_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "lease_id")


@dataclass(frozen=True)
class LeaseReleased:
    request_id: str
    lease_id: str
    held_s: float


@dataclass(frozen=True)
class PlaceClip:
    """Manual CLIP placement; it holds until the next mode change."""

    request_id: str
    device: str
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_choice(self, "device", CLIP_PLACEMENTS)
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class ClipPlaced:
    request_id: str
    device: str  # the device the weights are actually on ("cpu", "cuda:0", "sim-gpu")


@dataclass(frozen=True)
class GetStatus:
    request_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class Subscribe:
    """Events go to the sender's address until the subscription lapses: renew before `ttl_s` runs out."""

    request_id: str
    ttl_s: float = 60.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_number(self, "ttl_s", minimum=0.1, maximum=3600)


@dataclass(frozen=True)
class Subscribed:
    request_id: str
    ttl_s: float


@dataclass(frozen=True)
class Unsubscribe:
    request_id: str


@dataclass(frozen=True)
class Unsubscribed:
    request_id: str


@dataclass(frozen=True)
class EmbedImages:
    """Images travel as file paths, or as one shared-memory block of uint8 RGB (n, H, W, 3): never as bytes."""

    request_id: str
    paths: tuple[str, ...] = ()
    shm_name: str | None = None
    shm_shape: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        if not isinstance(self.paths, tuple) or not all(isinstance(p, str) and p for p in self.paths):
            raise invalid("EmbedImages", "paths", self.paths, "a tuple of non-empty path strings")
        if self.shm_name is not None:
            check_text(self, "shm_name", max_len=255)
        if (self.shm_name is None) != (self.shm_shape is None):
            raise invalid("EmbedImages", "shm_shape", self.shm_shape, "given together with shm_name")
        if bool(self.paths) == (self.shm_name is not None):
            raise invalid("EmbedImages", "paths", self.paths, "either paths or a shared-memory block, not both")
        shape = self.shm_shape
        if shape is not None and not (
            isinstance(shape, tuple) and len(shape) == 4
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape) and shape[3] == 3
        ):
            raise invalid("EmbedImages", "shm_shape", shape, "(n, height, width, 3) with positive sizes")


@dataclass(frozen=True)
class EmbedTexts:
    request_id: str
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        if not isinstance(self.texts, tuple) or not self.texts or not all(isinstance(t, str) for t in self.texts):
            raise invalid("EmbedTexts", "texts", self.texts, "a non-empty tuple of strings")


@dataclass(frozen=True)
class Embeddings:
    request_id: str
    vectors: object  # numpy float32 array (n, dim), L2-normalised
    device: str
    model: str


@dataclass(frozen=True)
class GetClipDevice:
    request_id: str


CLIP_UNAVAILABLE = "unavailable"  # ClipDeviceIs.device of a CLIP whose model does not exist: never "cpu"


@dataclass(frozen=True)
class ClipDeviceIs:
    """Where CLIP's weights really are ("cpu", "cuda:N", "sim-gpu"), or CLIP_UNAVAILABLE with the reason the model
    could not be created: a CLIP that does not exist is on no device, and saying "cpu" would hide the fault."""

    request_id: str
    device: str
    model: str
    reason: str = ""  # why CLIP is degraded (required when unavailable), "" when healthy

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "device", max_len=64)
        check_text(self, "model")
        check_text(self, "reason", allow_empty=self.device != CLIP_UNAVAILABLE)
