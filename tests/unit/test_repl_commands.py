"""What a line typed in `mai chat` means, the request it becomes, and how answers read."""

from __future__ import annotations

import pickle

import pytest

from mai.core.repl_commands import (
    COMMANDS,
    DEFAULT_HISTORY_LIMIT,
    ReplCommand,
    help_text,
    history_text,
    models_table,
    parse_line,
    pinned_text,
    request_for,
    status_summary,
)
from messages.conversation import GetHistory, HistoryEntry, ListModels, ModelRow, NewConversation, SwitchModel, UserTurn
from messages.errors import InvalidRequest
from messages.repl import SessionOpened, TerminalLine, TerminalOutput
from messages.requests import GetStatus, SetMode


@pytest.mark.parametrize(
    "line, kind, arg",
    [
        ("hello there", "say", "hello there"),
        ("  spaced out  ", "say", "spaced out"),
        ("//etc/hosts is a file", "say", "/etc/hosts is a file"),
        ("", "empty", None),
        ("   ", "empty", None),
        ("/status", "status", None),
        ("/STATUS", "status", None),
        ("/models", "models", None),
        ("/switch qwen2.5-3b-instruct", "switch", "qwen2.5-3b-instruct"),
        ("/switch llama3.2:3b", "switch", "llama3.2:3b"),
        ("/switch auto", "switch", None),
        ("/switch AUTO", "switch", None),
        ("/mode idle", "mode", "idle"),
        ("/mode AutoPilot", "mode", "autopilot"),
        ("/history", "history", DEFAULT_HISTORY_LIMIT),
        ("/history 3", "history", 3),
        ("/new", "new", None),
        ("/quit", "quit", None),
        ("/exit", "quit", None),
        ("/help", "help", None),
        ("/help models", "help", None),
    ],
)
def test_lines_parse_to_commands(line, kind, arg):
    command = parse_line(line)
    assert (command.kind, command.arg) == (kind, arg)
    assert command.error == ""


@pytest.mark.parametrize(
    "line, says",
    [
        ("/frobnicate", "unknown command /frobnicate"),
        ("/etc/passwd", "unknown command /etc/passwd"),
        ("/switch", "usage: /switch MODEL|auto"),
        ("/switch a b", "usage: /switch MODEL|auto"),
        ("/mode", "usage: /mode MODE"),
        ("/mode auto pilot", "usage: /mode MODE"),
        ("/mode 9lives", "usage: /mode MODE"),
        ("/history 0", "usage: /history [N]"),
        ("/history -2", "usage: /history [N]"),
        ("/history ten", "usage: /history [N]"),
        ("/history 1 2", "usage: /history [N]"),
        ("/new please", "takes no arguments"),
        ("/quit now", "takes no arguments"),
    ],
)
def test_bad_commands_say_what_is_accepted(line, says):
    command = parse_line(line)
    assert command.kind == "invalid"
    assert says in command.error
    assert command.role is None


def test_unknown_command_names_every_accepted_one_and_the_escape():
    error = parse_line("/what").error
    for usage, _ in COMMANDS.values():
        assert usage in error
    assert "//" in error


def test_help_lists_every_command_with_one_line_each():
    text = help_text()
    for usage, what in COMMANDS.values():
        assert any(usage in line and what in line for line in text.splitlines())


@pytest.mark.parametrize(
    "line, role, message_type",
    [
        ("hi", "chat", UserTurn),
        ("/models", "chat", ListModels),
        ("/switch auto", "chat", SwitchModel),
        ("/history 2", "chat", GetHistory),
        ("/new", "chat", NewConversation),
        ("/status", "coordinator", GetStatus),
        ("/mode recording", "coordinator", SetMode),
    ],
)
def test_commands_become_one_request_to_the_actor_that_answers(line, role, message_type):
    command = parse_line(line)
    request = request_for(command, "line-1", 42.0)
    assert command.role == role
    assert isinstance(request, message_type) and request.request_id == "line-1"
    pickle.loads(pickle.dumps(request))


def test_request_fields_carry_the_arguments():
    assert request_for(parse_line("hi"), "r", 42.0) == UserTurn("r", "hi", 42.0)
    assert request_for(parse_line("/switch auto"), "r", 1) == SwitchModel("r", None)
    assert request_for(parse_line("/history 2"), "r", 1) == GetHistory("r", 2)
    assert request_for(parse_line("/mode recording"), "r", 1).mode == "recording"
    assert request_for(parse_line("/mode recording"), "r", 1).wait is False


@pytest.mark.parametrize("kind", ["help", "quit", "empty", "invalid"])
def test_local_commands_have_no_request(kind):
    with pytest.raises(ValueError):
        request_for(ReplCommand(kind), "r", 1)


def _row(key: str, **kw) -> ModelRow:
    values = dict(backend="lmstudio", tier=3, context_window=32768, footprint_bytes=5600 * 2**20, footprint_learned=False,
                  available=True, loaded=False, current=False, pinned=False, why_not="")
    values.update(kw)
    return ModelRow(key, **values)


def test_models_table_shows_every_column_and_why_a_model_cannot_be_used():
    rows = (_row("qwen2.5-7b-instruct", loaded=True, current=True, footprint_learned=True),
            _row("llama3.2:3b", backend="ollama", tier=2, footprint_bytes=2800 * 2**20, pinned=True,
                 available=False, why_not="backend unreachable"))
    text = models_table(rows, "qwen2.5-7b-instruct", "llama3.2:3b")
    header, first, second = text.splitlines()[:3]
    for column in ("model", "backend", "tier", "footprint", "loaded", "why not selectable"):
        assert column in header
    assert first.startswith("*") and "qwen2.5-7b-instruct" in first and "5,600 MiB (measured)" in first and " yes " in first
    assert "llama3.2:3b" in second and "ollama" in second and "2,800 MiB" in second and "backend unreachable" in second
    assert "pinned: llama3.2:3b" in text.splitlines()[-1]


def test_pin_text_says_what_happens_next():
    assert "Mai chooses" in pinned_text(None, "qwen2.5-3b-instruct")
    assert pinned_text("qwen2.5-3b-instruct", "qwen2.5-3b-instruct") == "pinned qwen2.5-3b-instruct"
    assert "current: qwen2.5-7b-instruct" in pinned_text("qwen2.5-3b-instruct", "qwen2.5-7b-instruct")


def test_status_summary_is_short_and_names_the_parts():
    status = {
        "mode": "idle", "target_mode": "recording", "reserve_bytes": 0,
        "vram": {"used_bytes": 2 * 2**30, "total_bytes": 12 * 2**30, "gpu_present": True, "device_name": "sim-gpu"},
        "vlm": {"model": "qwen2.5vl:7b", "state": "loading", "leases": 0},
        "clip": {"model": "ViT-B-32", "device": "cpu"},
        "chat_model": "qwen2.5-7b-instruct", "degraded": [{"part": "vlm", "reason": "Ollama unreachable"}],
        "plan": ["load vlm"], "step_in_flight": "move clip to cpu",
    }
    text = status_summary(status)
    assert "idle (switching to recording)" in text and "2,048 MiB used of 12,288 MiB" in text
    assert "qwen2.5vl:7b: loading" in text and "ViT-B-32 on cpu" in text and "qwen2.5-7b-instruct" in text
    assert "degraded vlm: Ollama unreachable" in text and "now: move clip to cpu" in text
    assert len(text.splitlines()) <= 8


def test_history_text_marks_unfinished_messages_and_keeps_lines_short():
    entries = (HistoryEntry("user", "hi\nthere", None, "complete", 0.0),
               HistoryEntry("assistant", "x" * 5000, "qwen2.5-7b-instruct", "interrupted", 1.0))
    lines = history_text("c1", entries).splitlines()
    assert "c1" in lines[0] and "2 message" in lines[0]
    assert lines[1].endswith("user: hi there")
    assert "assistant (qwen2.5-7b-instruct) [interrupted]:" in lines[2] and len(lines[2]) < 500
    assert "no messages" in history_text("c2", ())


def test_terminal_messages_validate_and_pickle():
    output = TerminalOutput("r", "done", "", {"status": "cancelled"})
    assert pickle.loads(pickle.dumps(output)) == output
    with pytest.raises(InvalidRequest, match="TerminalOutput.kind"):
        TerminalOutput("r", "shout", "x")
    with pytest.raises(InvalidRequest, match="TerminalLine.request_id"):
        TerminalLine("", "hi")
    with pytest.raises(InvalidRequest, match="SessionOpened.heartbeat_s"):
        SessionOpened("r", "s", 0)
