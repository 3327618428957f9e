"""The exact text `mai chat` shows: every error says what was wrong and what is accepted, and the answers' columns,
marks and fallbacks read as documented. Whole strings, because the user reads whole strings (the mutation pass,
tools/mutation.sh, found that substring checks let a changed or missing error text through)."""

from __future__ import annotations

import time

import pytest

from mai.core.repl_commands import (
    ReplCommand,
    help_text,
    history_text,
    mode_text,
    models_table,
    parse_line,
    pinned_text,
    request_for,
    status_summary,
    thinking_text,
)
from messages.conversation import HistoryEntry, SwitchModel
from tests.unit.test_repl_commands import _row

MiB = 2**20
ACCEPTED = ("/status, /models, /switch MODEL|auto, /mode MODE, /history [N], /new, /thinking, /help, /quit")


@pytest.mark.parametrize("line, error", [
    ("/frobnicate", f"unknown command /frobnicate; accepted: {ACCEPTED} "
                    "(start a message with // to send a line beginning with /)"),
    ("/switch", "/switch: name one model (see /models), or auto; usage: /switch MODEL|auto"),
    ("/switch a b", "/switch: name one model (see /models), or auto; usage: /switch MODEL|auto"),
    ("/mode", "/mode: name one mode, such as autopilot, recording or idle; usage: /mode MODE"),
    ("/mode no-such-mode!", "/mode: name one mode, such as autopilot, recording or idle; usage: /mode MODE"),
    ("/history 0", "/history: N is a whole number >= 1; usage: /history [N]"),
    ("/history -2", "/history: N is a whole number >= 1; usage: /history [N]"),
    ("/history 2 3", "/history: N is a whole number >= 1; usage: /history [N]"),
    ("/new now", "/new: takes no arguments; usage: /new"),
    ("/status x", "/status: takes no arguments; usage: /status"),
])
def test_each_bad_line_says_exactly_what_was_wrong_and_the_usage(line: str, error: str) -> None:
    assert parse_line(line) == ReplCommand("invalid", error=error)


def test_the_smallest_history_is_one_message_and_a_named_model_is_switched_to() -> None:
    assert parse_line("/history 1") == ReplCommand("history", 1)
    assert request_for(parse_line("/switch llama3.2:3b"), "r", 1) == SwitchModel("r", "llama3.2:3b")
    with pytest.raises(ValueError, match=r"^'help' is answered locally, not by an actor$"):
        request_for(ReplCommand("help"), "r", 1)


def test_help_aligns_the_usages_in_one_column() -> None:
    lines = help_text().splitlines()
    assert lines[0] == "Type a message to chat. Commands:"
    assert lines[1] == "  /status             mode, VRAM, VLM, CLIP and chat model, in short"
    assert lines[3] == "  /switch MODEL|auto  pin a chat model from /models; `auto` lets Mai choose again"
    assert lines[-1] == "Ctrl-C while Mai answers stops the answer; start a message with // to send a leading /."
    assert len(lines) == 11


def test_the_models_table_reads_column_by_column() -> None:
    rows = (_row("qwen2.5-7b-instruct", loaded=True, current=True, footprint_learned=True),
            _row("llama3.2:3b", backend="ollama", tier=2, footprint_bytes=2800 * MiB, pinned=True, preloaded=True,
                 loaded=True, why_not="backend unreachable"),
            _row("qwen2.5:0.5b", backend="ollama", tier=1, footprint_bytes=None))
    assert models_table(rows, "qwen2.5-7b-instruct", "llama3.2:3b").splitlines() == [
        "    model                backend   tier  footprint             loaded           why not selectable",
        "*   qwen2.5-7b-instruct  lmstudio  3     5,600 MiB (measured)  yes              -",
        " p  llama3.2:3b          ollama    2     2,800 MiB (declared)  yes (preloaded)  backend unreachable",
        "    qwen2.5:0.5b         ollama    1     ? (declared)          no               -",
        "current: qwen2.5-7b-instruct; pinned: llama3.2:3b   (* current, p pinned)",
    ]
    assert models_table((), None, None) == "  model  backend  tier  footprint  loaded  why not selectable\n" \
                                           "current: -; pinned: no (Mai chooses)   (* current, p pinned)"


def test_pin_mode_and_thinking_texts() -> None:
    assert pinned_text(None, None) == "pin cleared: Mai chooses the chat model (now none yet)"
    assert pinned_text(None, "llama3.2:3b") == "pin cleared: Mai chooses the chat model (now llama3.2:3b)"
    assert pinned_text("llama3.2:3b", None) == "pinned llama3.2:3b (current: none yet)"
    assert mode_text("recording", ()) == "mode recording accepted; nothing to change"
    assert mode_text("idle", ("unload vlm", "confirm")) == "mode idle accepted; plan: unload vlm; confirm"
    assert thinking_text("", "m") == ("the last reply came without reasoning (only reasoning models think before "
                                      "they answer)")
    assert thinking_text("  first this,\nthen that ", None) == \
        "reasoning of the last reply (unknown model, 4 words):\nfirst this,\nthen that"


def _status(**changes: object) -> dict:
    status = {"mode": "autopilot", "target_mode": "autopilot",
              "vram": {"used_bytes": 1024 * MiB, "total_bytes": 8192 * MiB, "gpu_present": True, "device_name": "H100"},
              "vlm": {"model": "qwen2.5vl:7b", "state": "loaded", "leases": 2},
              "clip": {"model": "ViT-B-32", "device": "gpu"}, "chat_model": None, "degraded": [],
              "plan": [], "step_in_flight": None}
    status.update(changes)
    return status


def test_the_status_summary_line_by_line() -> None:
    assert status_summary(_status()).splitlines() == [
        "mode   autopilot",
        "vram   1,024 MiB used of 8,192 MiB (H100)",
        "vlm    qwen2.5vl:7b: loaded, leases 2",
        "clip   ViT-B-32 on gpu",
        "chat   -",
    ]
    host = {"used_bytes": 0, "total_bytes": 4096 * MiB, "gpu_present": False, "device_name": "ignored"}
    lines = status_summary(_status(vram=host, plan=["load vlm", "move CLIP to gpu"],
                                   degraded=[{"part": "gpu", "reason": "no GPU"}, {"part": "clip", "reason": "x"}]))
    assert lines.splitlines()[1] == "vram   0 MiB used of 4,096 MiB (no GPU, host memory)"
    assert lines.splitlines()[5:] == ["plan   now: -; next: load vlm, move CLIP to gpu",
                                      "degraded gpu: no GPU", "degraded clip: x"]
    assert "vram" not in status_summary(_status(vram=None))
    assert status_summary(_status(step_in_flight="unload vlm")).splitlines()[-1] == "plan   now: unload vlm; next: -"


def test_history_lines_show_time_role_model_status_and_cut_long_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        entries = (HistoryEntry("user", "hello", None, "complete", 3661.0),
                   HistoryEntry("assistant", "y" * 400, "m", "complete", 3662.0),
                   HistoryEntry("assistant", "z" * 401, "m", "failed", 3663.0))
        assert history_text("c9", entries).splitlines() == [
            "conversation c9, last 3 message(s):",
            "  01:01:01 user: hello",
            "  01:01:02 assistant (m): " + "y" * 400,
            "  01:01:03 assistant (m) [failed]: " + "z" * 399 + "…",
        ]
        assert history_text("c2", ()) == "conversation c2: no messages yet"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
