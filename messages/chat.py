"""The conversation's unit: one message of the canonical history Mai owns and replays to any model, and the tagged
fragments a reply streams as (a reasoning model's thinking is shown apart and never stored as the reply)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from messages.base import check_choice, check_instance, check_text

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        check_choice(self, "role", CHAT_ROLES)
        check_text(self, "content", allow_empty=True)


class FragmentKind(str, Enum):
    """CONTENT is the reply; REASONING is what a thinking model says before it (LM Studio's reasoning fragments,
    Ollama's `message.thinking`): shown dim, kept out of the stored history and of every later prompt."""

    CONTENT = "content"
    REASONING = "reasoning"


@dataclass(frozen=True)
class ReplyFragment:
    """One streamed piece of a reply, from a chat adapter up to `mai.Mai.stream_message(..., thinking=True)`."""

    text: str
    kind: FragmentKind = FragmentKind.CONTENT

    def __post_init__(self) -> None:
        check_text(self, "text", allow_empty=True)
        check_instance(self, "kind", FragmentKind)

    @property
    def reasoning(self) -> bool:
        return self.kind is FragmentKind.REASONING
