"""Mai's typed messages: frozen dataclasses, validated on construction, pickle-safe.

Thespian dispatches on the class *name*, so every class name here is unique across modules."""

from messages.chat import ChatMessage
from messages.errors import MaiError, Reason
from messages.events import (
    Degraded,
    IdleUnloaded,
    ModeChanged,
    ModelSwitched,
    PlacementChanged,
    PlanRefused,
    Recovered,
    ResourceChanged,
)
from messages.failure import Failure
from messages.requests import (
    AcquireLease,
    ClipDeviceIs,
    ClipPlaced,
    EmbedImages,
    EmbedTexts,
    Embeddings,
    EnsureVlm,
    GetClipDevice,
    GetStatus,
    LeaseGranted,
    LeaseReleased,
    ModeAccepted,
    ModeReached,
    PlaceClip,
    ReleaseLease,
    SetMode,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    VlmReady,
)
from messages.resources import VramSnapshot
from messages.status import ClipStatus, Status, VlmStatus
from messages.system import ChildInfo, GetSystemInfo, Init, Ping, Pong, SystemInfo

__all__ = [name for name in dir() if not name.startswith("_")]
