"""ReplActor: one `mai chat` session. The terminal (an external process, since actors read stdin from /dev/null)
creates it, sends Init (config, the supervisor's address) and OpenSession, then one TerminalLine per line typed.

A line is parsed by `mai.core.repl_commands`; a chat message becomes a UserTurn to the conversation agent whose
ReplyChunk batches are relayed as TerminalOutput, a command becomes one request to the agent or the coordinator
whose answer is written back as text. A thinking model's reasoning is relayed as "thinking" outputs (the terminal
shows it as one dim line) and the last reply's is kept for `/thinking`. Every line ends with exactly one "done" output. The request id of the line
is used all the way through (GetSystemInfo, then the request), so every reply finds its line. Addresses are asked
from the supervisor for every line: a restarted agent has a new address, and the lookup costs a millisecond."""

from __future__ import annotations

import datetime
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from thespian.actors import ActorExitRequest, WakeupMessage

from actors.base import MaiActor
from mai.core import repl_commands as rc
from messages.conversation import (
    CancelReply,
    ConversationStarted,
    History,
    ModelList,
    ModelPinned,
    ReplyChunk,
    ReplyDone,
)
from messages.chat import FragmentKind
from messages.errors import MaiError, Reason
from messages.failure import Failure
from messages.repl import (
    CloseSession,
    OpenSession,
    SessionClosed,
    SessionOpened,
    TerminalInterrupt,
    TerminalLine,
    TerminalOutput,
)
from messages.requests import ModeAccepted
from messages.status import Status
from messages.system import GetSystemInfo, Ping, SystemInfo

HEARTBEAT_S = 5.0  # the terminal pings this often...
ABANDONED_AFTER_S = 120.0  # ...and a session not heard from for this long (a killed terminal) ends itself
COMMAND_TIMEOUT_S = 30.0  # a command may wait for the agent to probe a backend (request timeouts are ~10 s)
TURN_SLACK_S = 10.0  # the agent answers a turn by its own deadline; wait a little longer than that
CANCEL_GRACE_S = 5.0  # after Ctrl-C, the line is done at the latest this much later, answer or not
ROLE_NAMES = {"chat": "conversation agent", "coordinator": "mode coordinator", "supervisor": "supervisor"}


@dataclass
class _Line:
    """A line being answered: its command, who answers it, when we stop waiting."""

    command: rc.ReplCommand
    deadline: float = 0.0
    timeout_s: float = 0.0
    target: Any = None  # the answering actor, once its address is known
    streamed: bool = False
    cancelled: bool = False


class ReplActor(MaiActor):
    role = "repl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.terminal: Any = None  # where output goes: the endpoint that sent OpenSession
        self.session_id = ""
        self.last_heard = time.monotonic()
        self.lines: dict[str, _Line] = {}
        self.closed = False
        self.last_thinking = ""  # the last finished reply's reasoning, for /thinking
        self.last_model: str | None = None

    # --- session --------------------------------------------------------------------------------------------
    def receiveMsg_OpenSession(self, msg: OpenSession, sender: Any) -> None:
        first = self.terminal is None
        self.terminal, self.last_heard = sender, time.monotonic()
        self.session_id = self.session_id or uuid.uuid4().hex[:12]
        self.log.info("repl.opened", session=self.session_id)
        self.send(sender, SessionOpened(msg.request_id, self.session_id, HEARTBEAT_S))
        if first:
            self.wakeupAfter(datetime.timedelta(seconds=HEARTBEAT_S), payload="heartbeat")

    def receiveMsg_Ping(self, msg: Ping, sender: Any) -> None:
        self.last_heard = time.monotonic()
        super().receiveMsg_Ping(msg, sender)

    def receiveMsg_CloseSession(self, msg: CloseSession, sender: Any) -> None:
        self._close(msg.reason)

    def _close(self, reason: str, *, exit_now: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for request_id, line in list(self.lines.items()):
            if line.command.kind == "say" and line.target is not None:
                self.send(line.target, CancelReply(request_id))  # nobody is left to read the reply
        self.lines.clear()
        self.log.info("repl.closed", session=self.session_id, reason=reason)
        if self.terminal is not None:
            self.send(self.terminal, SessionClosed(self.session_id, reason))
        if exit_now:
            self.send(self.myAddress, ActorExitRequest())

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._close("Mai is stopping", exit_now=False)  # Thespian ends the actor after this handler

    # --- lines -----------------------------------------------------------------------------------------------
    def receiveMsg_TerminalLine(self, msg: TerminalLine, sender: Any) -> None:
        self.last_heard = time.monotonic()
        if self.closed:
            return
        command = rc.parse_line(msg.text)
        if command.kind == "empty":
            self._done(msg.request_id)
        elif command.kind == "help":
            self._output(msg.request_id, "info", rc.help_text())
            self._done(msg.request_id)
        elif command.kind == "thinking":
            self._output(msg.request_id, "info", rc.thinking_text(self.last_thinking, self.last_model))
            self._done(msg.request_id)
        elif command.kind == "invalid":
            self._error(msg.request_id, command.error)
        elif command.kind == "quit":
            self._done(msg.request_id, {"closed": True})
            self._close("quit")
        else:
            self._expect(msg.request_id, _Line(command), COMMAND_TIMEOUT_S)
            supervisor = self.peers.get("supervisor")
            if supervisor is None:
                self._error(msg.request_id, "this session was opened without the supervisor's address")
                return
            self.send(supervisor, GetSystemInfo(msg.request_id))

    def receiveMsg_SystemInfo(self, msg: SystemInfo, sender: Any) -> None:
        line = self.lines.get(msg.request_id)
        if line is None or line.target is not None:
            return
        role = line.command.role
        target = msg.address_of(role)
        if target is None:
            who = ROLE_NAMES.get(role, role)
            self._error(msg.request_id, f"the {who} is not running (it may be restarting); try again in a moment")
            return
        try:
            request = rc.request_for(line.command, msg.request_id, self.config.chat.reply_timeout_s)
        except MaiError as err:
            self._error(msg.request_id, rc.failure_text(err.message, err.reason.value))
            return
        line.target = target
        self.send(target, request)
        if line.command.kind == "say":
            self._expect(msg.request_id, line, self.config.chat.reply_timeout_s + TURN_SLACK_S)

    def receiveMsg_TerminalInterrupt(self, msg: TerminalInterrupt, sender: Any) -> None:
        self.last_heard = time.monotonic()
        line = self.lines.get(msg.request_id)
        if line is None or line.cancelled:
            return
        line.cancelled = True
        if line.command.kind == "say" and line.target is not None:
            self.send(line.target, CancelReply(msg.request_id))
            self._expect(msg.request_id, line, CANCEL_GRACE_S)
        else:
            self._done(msg.request_id, {"status": "cancelled"})
        self.log.info("repl.interrupted", session=self.session_id, kind=line.command.kind)

    # --- answers ---------------------------------------------------------------------------------------------
    def receiveMsg_ReplyChunk(self, msg: ReplyChunk, sender: Any) -> None:
        line = self.lines.get(msg.request_id)
        if line is None or line.cancelled:
            return  # tokens still on their way after Ctrl-C are not shown
        if msg.kind is FragmentKind.REASONING:
            self._output(msg.request_id, "thinking", msg.text)
            return
        line.streamed = line.streamed or bool(msg.text)
        self._output(msg.request_id, "restart" if msg.restart else "chunk", msg.text)

    def receiveMsg_ReplyDone(self, msg: ReplyDone, sender: Any) -> None:
        line = self.lines.get(msg.request_id)
        if line is None:
            return
        self.last_thinking, self.last_model = msg.thinking, msg.model
        if not line.streamed and msg.content:
            self._output(msg.request_id, "chunk", msg.content)
        self._done(msg.request_id, {"model": msg.model, "status": msg.status, "tokens_per_s": msg.tokens_per_s,
                                    "switches": list(msg.switches), "thinking_words": len(msg.thinking.split())})

    def receiveMsg_Failure(self, msg: Failure, sender: Any) -> None:
        line = self.lines.get(msg.request_id)
        if line is None:
            return
        if line.cancelled and msg.reason is Reason.CANCELLED:
            self._done(msg.request_id, {"status": "cancelled"})
        else:
            self._error(msg.request_id, rc.failure_text(msg.message, msg.reason.value))

    def receiveMsg_Status(self, msg: Status, sender: Any) -> None:
        self._answer(msg.request_id, lambda: rc.status_summary(msg.to_dict()))

    def receiveMsg_ModelList(self, msg: ModelList, sender: Any) -> None:
        self._answer(msg.request_id, lambda: rc.models_table(msg.rows, msg.current, msg.pinned))

    def receiveMsg_ModelPinned(self, msg: ModelPinned, sender: Any) -> None:
        self._answer(msg.request_id, lambda: rc.pinned_text(msg.model, msg.current))

    def receiveMsg_ModeAccepted(self, msg: ModeAccepted, sender: Any) -> None:
        self._answer(msg.request_id, lambda: rc.mode_text(msg.mode, msg.plan))

    def receiveMsg_History(self, msg: History, sender: Any) -> None:
        self._answer(msg.request_id, lambda: rc.history_text(msg.conversation_id, msg.entries))

    def receiveMsg_ConversationStarted(self, msg: ConversationStarted, sender: Any) -> None:
        self._answer(msg.request_id, lambda: f"new conversation {msg.conversation_id}")

    # --- timers ----------------------------------------------------------------------------------------------
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        now = time.monotonic()
        if msg.payload == "heartbeat":
            if now - self.last_heard > ABANDONED_AFTER_S:
                self._close(f"the terminal was not heard from for {ABANDONED_AFTER_S:.0f} s")
            elif not self.closed:
                self.wakeupAfter(datetime.timedelta(seconds=HEARTBEAT_S), payload="heartbeat")
            return
        if not (isinstance(msg.payload, tuple) and msg.payload[0] == "expire"):
            return
        request_id = msg.payload[1]
        line = self.lines.get(request_id)
        if line is None or now < line.deadline:
            return  # answered, or a later deadline replaced this one
        if line.cancelled:
            self._done(request_id, {"status": "cancelled"})
        else:
            who = ROLE_NAMES.get(line.command.role if line.target is not None else "supervisor", "actor")
            waited = f"no answer from the {who} within {line.timeout_s:.0f} s"
            self._error(request_id, rc.failure_text(waited, Reason.TIMEOUT.value))

    # --- helpers ---------------------------------------------------------------------------------------------
    def _expect(self, request_id: str, line: _Line, timeout_s: float) -> None:
        line.deadline, line.timeout_s = time.monotonic() + timeout_s, timeout_s
        self.lines[request_id] = line
        self.wakeupAfter(datetime.timedelta(seconds=timeout_s), payload=("expire", request_id))

    def _output(self, request_id: str, kind: str, text: str = "", data: dict | None = None) -> None:
        if self.terminal is not None:
            self.send(self.terminal, TerminalOutput(request_id, kind, text, data or {}))

    def _done(self, request_id: str, data: dict | None = None) -> None:
        self.lines.pop(request_id, None)
        self._output(request_id, "done", "", data)

    def _answer(self, request_id: str, render: Callable[[], str]) -> None:
        """Show the answer to a line still waiting; a late one (after Ctrl-C or the timeout) is dropped."""
        if request_id not in self.lines:
            return
        try:
            text = render()
        except Exception as err:  # noqa: BLE001 - a reply we cannot render must still end the line, readably
            self.log.error("repl.render_failed", error=str(err), error_type=type(err).__name__)
            self._error(request_id, f"could not show the answer ({type(err).__name__}: {err})")
            return
        self._output(request_id, "info", text)
        self._done(request_id)

    def _error(self, request_id: str, text: str) -> None:
        self._output(request_id, "error", text)
        self._done(request_id)
