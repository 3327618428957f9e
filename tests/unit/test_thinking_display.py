"""How `mai chat` shows a reasoning model's thinking, without actors: the terminal's rendering of TerminalOutput
(one dim line redrawn in place, collapsed before the reply; nothing on a pipe; NO_COLOR drops the dim) and the
`/thinking` command's parsing and text."""

from __future__ import annotations

import io

import pytest

from mai.chat_terminal import ChatTerminal, _Shown
from mai.core import repl_commands as rc
from messages.repl import TerminalOutput


class Screen(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def render(outputs: list[tuple[str, str]], *, tty: bool) -> str:
    screen = Screen(tty)
    terminal = ChatTerminal(None, None, None, screen, interactive=False)
    shown = _Shown()
    for kind, text in outputs:
        terminal._show(TerminalOutput("r1", kind, text), shown)
    return screen.getvalue()


THOUGHT_THEN_REPLY = [("thinking", "Okay, the user "), ("thinking", "asks about the sky."), ("chunk", "Rayleigh"),
                      ("chunk", " scattering."), ("done", "")]


def test_on_a_terminal_thinking_is_one_dim_line_that_collapses_before_the_reply(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    shown = render(THOUGHT_THEN_REPLY, tty=True)
    assert shown.startswith("\r\x1b[2K\x1b[2mthinking… (3 words)\x1b[0m\r\x1b[2K\x1b[2mthinking… (7 words)\x1b[0m")
    summary, reply = shown.rsplit("\r\x1b[2K", 1)[1].split("\n", 1)
    assert summary.startswith("\x1b[2mthought for ") and summary.endswith(" s (7 words) · /thinking shows it\x1b[0m")
    assert reply == "mai> Rayleigh scattering.\n"
    assert "sky" not in shown  # the reasoning itself is not printed, only its size


def test_no_color_keeps_the_line_but_drops_the_dim(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    shown = render(THOUGHT_THEN_REPLY, tty=True)
    assert "\x1b[2m" not in shown and "\r\x1b[2Kthinking… (7 words)" in shown


def test_a_pipe_gets_the_reply_only():
    assert render(THOUGHT_THEN_REPLY, tty=False) == "mai> Rayleigh scattering.\n"


@pytest.mark.parametrize("ending", [("error", "the model failed"), ("done", ""), ("restart", "again")])
def test_the_thinking_line_is_closed_whatever_ends_it(ending, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    shown = render([("thinking", "hmm"), ending], tty=True)
    assert "thought for" in shown and shown.index("thought for") < shown.rindex("\n")
    tail = shown.split("/thinking shows it\x1b[0m\n", 1)[1]
    assert "thinking…" not in tail


def test_the_thinking_command_is_local_and_listed_in_help():
    assert rc.parse_line("/thinking") == rc.ReplCommand("thinking")
    assert rc.parse_line("/thinking now").kind == "invalid"
    assert "thinking" in rc.LOCAL_KINDS and "/thinking" in rc.help_text()
    assert "without reasoning" in rc.thinking_text("", "qwen")
    text = rc.thinking_text("  first I consider the sky  ", "qwen3:0.6b")
    assert text == "reasoning of the last reply (qwen3:0.6b, 5 words):\nfirst I consider the sky"
