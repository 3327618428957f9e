"""Between the `mai chat` terminal (an external process: actors read stdin from /dev/null) and its ReplActor.

    terminal                                    ReplActor
    createActor, Init(config, supervisor)  →
    OpenSession(request_id)                →    SessionOpened(request_id, session_id, heartbeat_s)
    TerminalLine(request_id, text)         →    TerminalOutput(request_id, kind, text, data) ..., then one "done"
    TerminalInterrupt(request_id)          →    (the reply to that line is cancelled; its "done" still comes)
    Ping (every heartbeat_s)               →    Pong; a session not heard from in a while ends itself
    CloseSession(reason)                   →    SessionClosed(session_id, reason), then the actor exits

Every TerminalLine gets exactly one TerminalOutput of kind "done", last; after `/quit` a SessionClosed follows."""

from __future__ import annotations

from dataclasses import dataclass, field

from messages.base import check_choice, check_instance, check_number, check_text

OUTPUT_KINDS = ("chunk", "thinking", "restart", "info", "error", "done")


@dataclass(frozen=True)
class OpenSession:
    """Terminal → ReplActor, after Init: send this session's output to me (the sender)."""

    request_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class SessionOpened:
    request_id: str
    session_id: str
    heartbeat_s: float  # ping the actor at least this often, or it ends the session as abandoned

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "session_id")
        check_number(self, "heartbeat_s", minimum=0.01)


@dataclass(frozen=True)
class TerminalLine:
    """A line the user typed: a chat message, or a slash command (mai.core.repl_commands)."""

    request_id: str
    text: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "text", allow_empty=True, max_len=200_000)


@dataclass(frozen=True)
class TerminalInterrupt:
    """Ctrl-C while a line is answered: stop that answer (the reply in progress is cancelled); the session stays."""

    request_id: str  # the TerminalLine's

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class TerminalOutput:
    """What the terminal shows for a line. kind: chunk (reply text, no newline), thinking (a piece of the model's
    reasoning: shown as one dim line that collapses when the reply starts), restart (another model starts the
    reply again: what was shown is void), info / error (whole lines), done (last one for the line; data: for a chat
    reply model, status, tokens_per_s, switches, thinking_words; after /quit closed=True)."""

    request_id: str
    kind: str
    text: str = ""
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_choice(self, "kind", OUTPUT_KINDS)
        check_text(self, "text", allow_empty=True)
        check_instance(self, "data", dict)


@dataclass(frozen=True)
class CloseSession:
    """Terminal → ReplActor: goodbye (the user quit, or the terminal is going away)."""

    reason: str = "goodbye"

    def __post_init__(self) -> None:
        check_text(self, "reason")


@dataclass(frozen=True)
class SessionClosed:
    """ReplActor → terminal: the session is over and the actor exits."""

    session_id: str
    reason: str

    def __post_init__(self) -> None:
        check_text(self, "session_id")
        check_text(self, "reason")
