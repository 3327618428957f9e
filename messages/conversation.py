"""The conversation agent's vocabulary: user turns with streamed replies, history, the model catalog, switching,
and the chat GPU gate (a chat model load or unload is a step granted by the coordinator, like any other)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from messages.base import check_instance, check_int, check_number, check_text, invalid
from messages.chat import FragmentKind


class TurnKind(str, Enum):
    """What a turn asks of a model beyond plain chat (mai.core.turn_needs detects them; the catalog's `turns.needs`
    says what each requires of a model)."""

    CODE = "code"
    REASONING = "reasoning"  # a request for long, step-by-step reasoning
    LONG = "long"  # the message itself takes at least `turns.long_at_tokens`
    IMAGE = "image"
    TOOL = "tool"


@dataclass(frozen=True)
class UserTurn:
    """A user message; the reply streams back as ReplyChunk batches, then ReplyDone (or a Failure)."""

    request_id: str
    text: str
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "text", max_len=200_000)
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class ReplyChunk:
    """A batch of tokens of one kind (never one message per token): CONTENT is the reply, REASONING a thinking
    model's reasoning, shown apart and never stored. `restart` True: a model failed mid-reply and another one
    starts the answer again from here; discard what this turn showed so far, reasoning included."""

    request_id: str
    seq: int
    text: str
    restart: bool = False
    kind: FragmentKind = FragmentKind.CONTENT


@dataclass(frozen=True)
class ReplyDone:
    request_id: str
    model: str
    content: str
    status: str  # complete | cancelled
    tokens_per_s: float | None
    switches: tuple[str, ...] = ()  # silent switches made to answer this turn, each with its reason
    thinking: str = ""  # the model's reasoning before `content`; not part of the reply or the history


@dataclass(frozen=True)
class CancelReply:
    request_id: str  # the UserTurn's request id


@dataclass(frozen=True)
class GetHistory:
    request_id: str
    limit: int | None = None

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_int(self, "limit", minimum=1, optional=True)


@dataclass(frozen=True)
class HistoryEntry:
    role: str
    content: str
    model: str | None
    status: str  # complete | interrupted | failed | pending
    created_at: float


@dataclass(frozen=True)
class History:
    request_id: str
    conversation_id: str
    entries: tuple[HistoryEntry, ...]


@dataclass(frozen=True)
class NewConversation:
    request_id: str


@dataclass(frozen=True)
class ConversationStarted:
    request_id: str
    conversation_id: str


@dataclass(frozen=True)
class ListModels:
    request_id: str


@dataclass(frozen=True)
class ModelRow:
    key: str
    backend: str
    tier: int
    context_window: int
    footprint_bytes: int
    footprint_learned: bool
    available: bool  # backend reachable and model installed (when known)
    loaded: bool
    current: bool
    pinned: bool
    why_not: str  # empty when selectable now
    preloaded: bool = False  # loaded by `mai preload` / Mai.preload_model (it still yields when the VRAM is wanted)


@dataclass(frozen=True)
class ModelList:
    request_id: str
    rows: tuple[ModelRow, ...]
    current: str | None
    pinned: str | None


@dataclass(frozen=True)
class SwitchModel:
    """Pin a chat model until cleared (model None clears the pin)."""

    request_id: str
    model: str | None

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise invalid("SwitchModel", "model", self.model, "a model key from `mai models`, or None to clear the pin")


@dataclass(frozen=True)
class ModelPinned:
    request_id: str
    model: str | None
    current: str | None


@dataclass(frozen=True)
class PreloadModel:
    """Load `model` now, through the GPU gate as a turn would, so the next turn finds it ready. Answered by
    ModelPreloaded, or a Failure (INSUFFICIENT_VRAM saying the bytes needed, free, and what would have to yield)."""

    request_id: str
    model: str
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        if not isinstance(self.model, str) or not self.model.strip():
            raise invalid("PreloadModel", "model", self.model, "a model key from `mai models`")
        check_number(self, "timeout_s", minimum=0.001)


@dataclass(frozen=True)
class ModelPreloaded:
    """The model is loaded (`load_s` 0 and `already_loaded` True: it was the current model already)."""

    request_id: str
    model: str
    previous: str | None
    load_s: float
    already_loaded: bool = False


@dataclass(frozen=True)
class SelectModel:
    """Which chat model would answer `text` now, and why (nothing is loaded): `Mai.select_best_model`."""

    request_id: str
    text: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "text", allow_empty=True, max_len=200_000)


@dataclass(frozen=True)
class ModelSelection:
    """The answer to SelectModel. `model` None: no chat model could answer (`reason` says why). `kinds`: what the
    turn was found to need (TurnKind values); `load_needed`: answering would first load `model`."""

    request_id: str
    model: str | None
    reason: str
    kinds: tuple[str, ...]
    message_tokens: int
    load_needed: bool
    rejected: tuple[tuple[str, str], ...] = ()


# --- the chat GPU gate (conversation agent ↔ coordinator) ------------------------------------------------------
@dataclass(frozen=True)
class ChatNeeds:
    """Agent → coordinator: I want to load `model` (needed_bytes of VRAM), or unload it (needed_bytes 0,
    unload True). Answered by ChatGrant when the gate is free and it fits, else a Failure (INSUFFICIENT_VRAM with
    the grantable bytes, so the agent can choose a smaller model)."""

    request_id: str
    model: str
    needed_bytes: int
    unload: bool = False
    timeout_s: float = 60.0
    context_length: int = 0  # the context the model is loaded with (its footprint is measured per context); 0: none

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "model")
        check_int(self, "needed_bytes")
        check_instance(self, "unload", bool)
        check_number(self, "timeout_s", minimum=0.001)
        check_int(self, "context_length")


@dataclass(frozen=True)
class ChatGrant:
    request_id: str
    step_id: str
    grantable_bytes: int


@dataclass(frozen=True)
class ChatLoaded:
    step_id: str
    model: str
    vram_bytes: int
    load_s: float


@dataclass(frozen=True)
class ChatUnloaded:
    step_id: str
    model: str


@dataclass(frozen=True)
class ChatYield:
    """Coordinator → agent: the mode needs `needed_bytes` your chat model holds; switch smaller or unload."""

    needed_bytes: int
    reason: str


@dataclass(frozen=True)
class GetGrantable:
    request_id: str


@dataclass(frozen=True)
class Grantable:
    """What the gate could give a chat model now (free − reserve − what the mode still needs + what the chat
    model itself holds). The coordinator always answers with a figure against some reading — host memory without
    a GPU reading, 0 before the first reading — never "unlimited" (issue 12, hole 7)."""

    request_id: str
    grantable_bytes: int | None
    chat_model: str | None
    # The room the chat model has on the GPU as it is now, without the mode's claims or the room kept for the VLM
    # and CLIP: below the model's footprint only when the GPU itself ran short (another program took the VRAM).
    room_bytes: int | None = None
