"""The conversation's unit: one message of the canonical history Mai owns and replays to any model."""

from __future__ import annotations

from dataclasses import dataclass

from messages.base import check_choice, check_text

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        check_choice(self, "role", CHAT_ROLES)
        check_text(self, "content", allow_empty=True)
