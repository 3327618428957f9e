"""The terminal side of `mai chat`: reads lines, shows Mai's replies as they stream, turns Ctrl-C into a cancel.

Actor processes read stdin from /dev/null, so the terminal is this external process; a ReplActor created for the
session does the rest (messages/repl.py has the protocol). Two private Thespian endpoints, one per thread (the
external handle is not thread-safe, reference thespian.md §5): the main thread reads stdin and listens for output
while a line is answered; a heartbeat thread pings the ReplActor so an abandoned session ends itself, and
interrupts the prompt when the session is gone (Mai stopped).

A reasoning model's thinking is not the reply: on a terminal it shows as ONE dim line, "thinking… (N words)",
redrawn as the reasoning streams, which collapses to "thought for S s (N words) · /thinking shows it" when the
reply starts; `/thinking` prints the whole reasoning. Piped output carries replies only (NO_COLOR drops the dim)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

from bootstrap import system as boot
from messages.base import new_request_id
from messages.errors import OperationTimeout
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
from messages.system import Init, Ping, Pong

PROMPT = "you> "
REPLY_PREFIX = "mai> "
BANNER = "Chatting with Mai. /help lists the commands; /quit, Ctrl-D or Ctrl-C at an empty prompt leaves."
CANCEL_WAIT_S = 10.0  # after Ctrl-C, wait this long for the reply to stop (the actor ends the line within 5 s)
CLOSE_WAIT_S = 2.0
LISTEN_SLICE_S = 0.1  # how often a Ctrl-C or a lost session is noticed while a reply streams
MISSED_PINGS = 2  # the session counts as gone after this many unanswered heartbeats
DIM, PLAIN = "\x1b[2m", "\x1b[0m"
ERASE_LINE = "\r\x1b[2K"  # back to column 0 and clear it: the thinking line is redrawn in place


@dataclass
class _Shown:
    """What the terminal has shown for the line being answered."""

    replying: bool = False  # a reply line is open (no newline yet)
    cancelled: bool = False
    thinking: str = ""  # the reasoning streamed so far for this line's reply
    thinking_since: float | None = None  # set while the dim thinking line is open


def _ask(ctx: Any, address: Any, message: Any, timeout_s: float) -> Any:
    """ask, skipping anything that is not the answer to this request (a late reply, a stray output)."""
    deadline = time.monotonic() + timeout_s
    reply = ctx.ask(address, message, timeout_s)
    while getattr(reply, "request_id", None) != message.request_id:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        reply = ctx.listen(remaining)
    return reply


@contextmanager
def _interrupts_as_flag() -> Iterator[threading.Event]:
    """While a reply streams, Ctrl-C only sets a flag: an exception inside Thespian's listen could lose a message."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatTerminal:
    def __init__(self, cfg: Any, ctx: Any, beat_ctx: Any, out: TextIO, interactive: bool) -> None:
        self.config = cfg
        self.ctx = ctx  # main thread: lines, outputs
        self.beat_ctx = beat_ctx  # heartbeat thread
        self.out = out
        self.interactive = interactive
        self.repl: Any = None
        self.session_id = ""
        self.closed_reason: str | None = None  # set when the actor ended the session
        self.lost = threading.Event()
        self.stopping = threading.Event()
        self.readline: Any = None
        self.on_tty = bool(getattr(out, "isatty", lambda: False)())
        self.dim = ("", "") if os.environ.get("NO_COLOR") else (DIM, PLAIN)
        if interactive:
            try:
                import readline  # noqa: F401 - importing it gives input() line editing and history

                self.readline = readline
            except ImportError:
                pass

    # --- session -----------------------------------------------------------------------------------------------
    def open(self) -> None:
        timeout_s = self.config.system.ask_timeout_s
        supervisor = boot.supervisor_address(self.ctx)
        self.repl = self.ctx.createActor("actors.repl_actor.ReplActor")
        self.ctx.tell(self.repl, Init(self.config, (("supervisor", supervisor),)))
        reply = _ask(self.ctx, self.repl, OpenSession(new_request_id()), timeout_s)
        if isinstance(reply, Failure):
            raise reply.to_error()
        if not isinstance(reply, SessionOpened):
            raise OperationTimeout(f"the chat session did not open within {timeout_s:.0f} s")
        self.session_id = reply.session_id
        beat = threading.Thread(target=self._heartbeat, args=(reply.heartbeat_s,), name="mai-chat-heartbeat", daemon=True)
        beat.start()

    def _heartbeat(self, interval_s: float) -> None:
        missed = 0
        while not self.stopping.wait(interval_s):
            try:
                answer = _ask(self.beat_ctx, self.repl, Ping(new_request_id()), max(2.0, interval_s / 2))
            except Exception:  # noqa: BLE001 - a broken endpoint is a missed beat like any other
                answer = None
            missed = 0 if isinstance(answer, Pong) else missed + 1
            if missed >= MISSED_PINGS and not self.stopping.is_set():
                self.lost.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wake the prompt
                return

    def close(self, reason: str) -> None:
        """Say goodbye and wait (briefly) for the actor to confirm; it ends itself anyway when not heard from."""
        self.stopping.set()
        if self.repl is None or self.closed_reason is not None or self.lost.is_set():
            return
        try:
            self.ctx.tell(self.repl, CloseSession(reason))
            deadline = time.monotonic() + CLOSE_WAIT_S
            while (remaining := deadline - time.monotonic()) > 0:
                if isinstance(self.ctx.listen(remaining), SessionClosed):
                    break
        except Exception:  # noqa: BLE001 - leaving anyway
            pass

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            self._write(BANNER + "\n")
        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except EOFError:
                self._write("\n" if self.interactive else "")
                return 0
            except KeyboardInterrupt:
                if self.lost.is_set():
                    return self._lost()
                self._write("\n")
                if self.readline is not None and self.readline.get_line_buffer().strip():
                    continue  # Ctrl-C on a half-typed line drops the line, like a shell
                return 0
            if self.lost.is_set():
                return self._lost()
            if not line.strip():
                continue
            if self._exchange(line):
                return 0 if self.closed_reason == "quit" else 1

    def _lost(self) -> int:
        self._write("\n[the chat session is gone: Mai stopped or is not answering; start it and run `mai chat` again]\n")
        return 1

    def _exchange(self, text: str) -> bool:
        """Send one line and show its answer until "done". True when the session is over."""
        request_id = new_request_id()
        shown = _Shown()
        give_up_at: float | None = None
        with _interrupts_as_flag() as interrupted:
            self.ctx.tell(self.repl, TerminalLine(request_id, text))
            while True:
                if self.lost.is_set():
                    self._end_reply(shown)
                    self._lost()
                    return True
                if interrupted.is_set():
                    interrupted.clear()
                    if shown.cancelled:
                        return False  # a second Ctrl-C: stop waiting for the reply to wind down
                    self._cancel(request_id, shown)
                    give_up_at = time.monotonic() + CANCEL_WAIT_S
                message = self.ctx.listen(LISTEN_SLICE_S)
                if message is None:
                    if give_up_at is not None and time.monotonic() > give_up_at:
                        return False
                    continue
                if isinstance(message, SessionClosed):
                    self._end_reply(shown)
                    self.closed_reason = message.reason
                    if message.reason != "quit":
                        self._write(f"[chat session closed: {message.reason}]\n")
                    return True
                if isinstance(message, TerminalOutput) and message.request_id == request_id:
                    self._show(message, shown)
                    if message.kind == "done":
                        if message.data.get("closed"):
                            self.closed_reason = "quit"
                            return True
                        return False

    def _cancel(self, request_id: str, shown: _Shown) -> None:
        self.ctx.tell(self.repl, TerminalInterrupt(request_id))
        self._end_reply(shown)
        self._write("[cancelled]\n")
        shown.cancelled = True

    # --- output ----------------------------------------------------------------------------------------------------
    def _show(self, output: TerminalOutput, shown: _Shown) -> None:
        if shown.cancelled and output.kind in ("chunk", "thinking", "restart"):
            return  # tokens that were already on their way when Ctrl-C was pressed
        if output.kind == "thinking":
            self._think(output.text, shown)
        elif output.kind == "chunk":
            self._end_thinking(shown)
            if not shown.replying:
                self._write(REPLY_PREFIX)
                shown.replying = True
            self._write(output.text)
        elif output.kind == "restart":
            self._end_reply(shown)
            self._write("[another model takes over; the answer starts again]\n" + REPLY_PREFIX + output.text)
            shown.replying = True
        elif output.kind in ("info", "error"):
            self._end_reply(shown)
            prefix = "error: " if output.kind == "error" else ""
            self._write(prefix + output.text + "\n")
        elif output.kind == "done":
            self._end_reply(shown)
            if output.data.get("status") == "cancelled" and not shown.cancelled:
                self._write("[cancelled]\n")

    def _think(self, text: str, shown: _Shown) -> None:
        shown.thinking += text
        if not self.on_tty:
            return  # a pipe gets the reply only; /thinking still has the reasoning
        if shown.thinking_since is None:
            shown.thinking_since = time.monotonic()
        on, off = self.dim
        self._write(f"{ERASE_LINE}{on}thinking… ({len(shown.thinking.split())} words){off}")

    def _end_thinking(self, shown: _Shown) -> None:
        """Collapse the thinking line into its summary, before the reply (or whatever else) is shown."""
        if shown.thinking_since is None:
            return
        on, off = self.dim
        took = time.monotonic() - shown.thinking_since
        words = len(shown.thinking.split())
        self._write(f"{ERASE_LINE}{on}thought for {took:.1f} s ({words} words) · /thinking shows it{off}\n")
        shown.thinking_since = None
        shown.thinking = ""

    def _end_reply(self, shown: _Shown) -> None:
        self._end_thinking(shown)
        if shown.replying:
            self._write("\n")
            shown.replying = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _exit_on(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_chat(cfg: Any, out: TextIO | None = None) -> int:
    """`mai chat`: attach to the running Mai, open a session, chat until /quit, Ctrl-D or Ctrl-C at the prompt."""
    out = out or sys.stdout
    asys = boot.attach(cfg)  # NotRunning when nothing listens: the CLI prints it
    previous = {s: signal.signal(s, _exit_on) for s in (signal.SIGTERM, signal.SIGHUP)}  # still say goodbye
    try:
        with asys.private() as ctx, asys.private() as beat_ctx:
            terminal = ChatTerminal(cfg, ctx, beat_ctx, out, sys.stdin.isatty())
            try:
                terminal.open()
                return terminal.run()
            finally:
                terminal.close("goodbye")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        boot._close(asys)
