"""What a line typed in `mai chat` means, and how answers are written back as text: pure functions, no Thespian.

The ReplActor calls `parse_line`, sends `request_for(...)` to the actor that answers it, and turns the typed
reply into lines with the formatters below. A line starting with `/` is a command; `//` sends a message that
starts with `/`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from messages.conversation import GetHistory, ListModels, NewConversation, SwitchModel, UserTurn
from messages.requests import MODE_NAME, GetStatus, SetMode

DEFAULT_HISTORY_LIMIT = 20
HISTORY_LINE_CHARS = 400  # /history is an overview; one long reply should not fill the screen

# name → (usage, what it does); /help prints them in this order.
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("/status", "mode, VRAM, VLM, CLIP and chat model, in short"),
    "models": ("/models", "the chat models: backend, tier, footprint, loaded, why one cannot be used now"),
    "switch": ("/switch MODEL|auto", "pin a chat model from /models; `auto` lets Mai choose again"),
    "mode": ("/mode MODE", "switch the GPU mode: autopilot, recording or idle"),
    "history": ("/history [N]", f"the last N messages of this conversation (default {DEFAULT_HISTORY_LIMIT})"),
    "new": ("/new", "start a new conversation (the old one stays in the history database)"),
    "thinking": ("/thinking", "the full reasoning of the last reply; a reasoning model's thinking shows as one dim "
                              "line while it thinks, and is never part of the reply or the history"),
    "help": ("/help", "this list"),
    "quit": ("/quit", "end the chat (Ctrl-D, or Ctrl-C at an empty prompt, does the same)"),
}
ALIASES = {"exit": "quit"}

# kind → the actor role that answers it; the other kinds (say is sent to "chat" too) are answered locally.
ROLE_OF = {"say": "chat", "models": "chat", "switch": "chat", "history": "chat", "new": "chat",
           "status": "coordinator", "mode": "coordinator"}
LOCAL_KINDS = ("empty", "help", "quit", "invalid", "thinking")


@dataclass(frozen=True)
class ReplCommand:
    """One parsed line. `kind` is "say", a command name from COMMANDS, "empty" or "invalid".
    `arg`: say → the text; switch → the model key, or None for auto; mode → the mode; history → N or None.
    `error`: for "invalid", what was wrong and what is accepted."""

    kind: str
    arg: Any = None
    error: str = ""

    @property
    def role(self) -> str | None:
        return ROLE_OF.get(self.kind)


def accepted_commands() -> str:
    return ", ".join(usage for usage, _ in COMMANDS.values())


def _usage(name: str, problem: str) -> ReplCommand:
    return ReplCommand("invalid", error=f"/{name}: {problem}; usage: {COMMANDS[name][0]}")


def parse_line(text: str) -> ReplCommand:
    stripped = text.strip()
    if not stripped:
        return ReplCommand("empty")
    if stripped.startswith("//"):
        return ReplCommand("say", stripped[1:])
    if not stripped.startswith("/"):
        return ReplCommand("say", stripped)
    word, *args = stripped[1:].split()
    name = ALIASES.get(word.lower(), word.lower())
    if name not in COMMANDS:
        return ReplCommand("invalid", error=f"unknown command /{word}; accepted: {accepted_commands()} "
                                            "(start a message with // to send a line beginning with /)")
    if name == "help":
        return ReplCommand("help")
    if name == "switch":
        if len(args) != 1:
            return _usage(name, "name one model (see /models), or auto")
        return ReplCommand("switch", None if args[0].lower() == "auto" else args[0])
    if name == "mode":
        if len(args) != 1 or not MODE_NAME.match(args[0].lower()):
            return _usage(name, "name one mode, such as autopilot, recording or idle")
        return ReplCommand("mode", args[0].lower())
    if name == "history":
        if len(args) > 1 or (args and not (args[0].isdigit() and int(args[0]) >= 1)):
            return _usage(name, "N is a whole number >= 1")
        return ReplCommand("history", int(args[0]) if args else DEFAULT_HISTORY_LIMIT)
    if args:
        return _usage(name, "takes no arguments")
    return ReplCommand(name)


def request_for(command: ReplCommand, request_id: str, reply_timeout_s: float) -> Any:
    """The message that answers a non-local command, carrying `request_id` (replies are matched by it)."""
    kind = command.kind
    if kind == "say":
        return UserTurn(request_id, command.arg, reply_timeout_s)
    if kind == "models":
        return ListModels(request_id)
    if kind == "switch":
        return SwitchModel(request_id, command.arg)
    if kind == "history":
        return GetHistory(request_id, command.arg)
    if kind == "new":
        return NewConversation(request_id)
    if kind == "status":
        return GetStatus(request_id)
    if kind == "mode":
        return SetMode(request_id, command.arg)
    raise ValueError(f"{kind!r} is answered locally, not by an actor")


# --- answers as text ---------------------------------------------------------------------------------------------
def help_text() -> str:
    width = max(len(usage) for usage, _ in COMMANDS.values())
    lines = ["Type a message to chat. Commands:"]
    lines += [f"  {usage:<{width}}  {what}" for usage, what in COMMANDS.values()]
    lines.append("Ctrl-C while Mai answers stops the answer; start a message with // to send a leading /.")
    return "\n".join(lines)


def _mib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def models_table(rows: Any, current: str | None, pinned: str | None) -> str:
    """rows: ModelRow-like objects. One line per model; the last column says why it cannot be picked now."""
    header = ("", "model", "backend", "tier", "footprint", "loaded", "why not selectable")
    table = [header]
    for row in rows:
        mark = ("*" if row.current else " ") + ("p" if row.pinned else " ")
        footprint = _mib(row.footprint_bytes) + (" (measured)" if row.footprint_learned else " (declared)")
        loaded = ("yes (preloaded)" if row.preloaded else "yes") if row.loaded else "no"
        table.append((mark, row.key, row.backend, str(row.tier), footprint, loaded, row.why_not or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.append(f"current: {current or '-'}; pinned: {pinned or 'no (Mai chooses)'}   (* current, p pinned)")
    return "\n".join(lines)


def pinned_text(model: str | None, current: str | None) -> str:
    if model is None:
        return f"pin cleared: Mai chooses the chat model (now {current or 'none yet'})"
    return f"pinned {model}" + ("" if current == model else f" (current: {current or 'none yet'})")


def mode_text(mode: str, plan: tuple[str, ...]) -> str:
    return f"mode {mode} accepted" + (f"; plan: {'; '.join(plan)}" if plan else "; nothing to change")


def status_summary(status: dict) -> str:
    """A few lines from `Status.to_dict()`; `mai status` has the full picture."""
    mode, target = status["mode"], status["target_mode"]
    mode += f" (switching to {target})" if target != mode else ""
    lines = [f"mode   {mode}"]
    vram = status.get("vram")
    if vram:
        where = vram.get("device_name") if vram.get("gpu_present") else "no GPU, host memory"
        lines.append(f"vram   {_mib(vram['used_bytes'])} used of {_mib(vram['total_bytes'])} ({where})")
    vlm, clip = status["vlm"], status["clip"]
    lines.append(f"vlm    {vlm['model']}: {vlm['state']}, leases {vlm['leases']}")
    lines.append(f"clip   {clip['model']} on {clip['device']}")
    lines.append(f"chat   {status.get('chat_model') or '-'}")
    if status.get("step_in_flight") or status.get("plan"):
        lines.append(f"plan   now: {status.get('step_in_flight') or '-'}; next: {', '.join(status['plan']) or '-'}")
    lines += [f"degraded {d['part']}: {d['reason']}" for d in status.get("degraded", [])]
    return "\n".join(lines)


def history_text(conversation_id: str, entries: Any) -> str:
    """entries: HistoryEntry-like objects, oldest first."""
    if not entries:
        return f"conversation {conversation_id}: no messages yet"
    lines = [f"conversation {conversation_id}, last {len(entries)} message(s):"]
    for entry in entries:
        at = time.strftime("%H:%M:%S", time.localtime(entry.created_at))
        who = entry.role + (f" ({entry.model})" if entry.model else "")
        status = "" if entry.status == "complete" else f" [{entry.status}]"
        text = " ".join(entry.content.split())
        text = text if len(text) <= HISTORY_LINE_CHARS else text[: HISTORY_LINE_CHARS - 1] + "…"
        lines.append(f"  {at} {who}{status}: {text}")
    return "\n".join(lines)


def thinking_text(thinking: str, model: str | None) -> str:
    """`/thinking`: the last reply's reasoning, whole, or why there is none."""
    if not thinking:
        return "the last reply came without reasoning (only reasoning models think before they answer)"
    return f"reasoning of the last reply ({model or 'unknown model'}, {len(thinking.split())} words):\n{thinking.strip()}"


def failure_text(message: str, reason: str) -> str:
    return f"{message} ({reason})"
