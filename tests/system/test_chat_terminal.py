"""`mai chat` as a user meets it: a real pseudo-terminal running `python -m mai chat` against the real Mai, with the
LM Studio and Ollama doubles in their own processes sharing one simulated GPU ledger. The doubles' replies say
how many messages the model was given (`messages=<n>`), so the test sees the conversation grow."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")

from bootstrap.system import system_processes  # noqa: E402
from tests.doubles.lmstudio import lmstudio_double  # noqa: E402
from tests.doubles.ollama import ollama_double  # noqa: E402
from tests.system.harness import ROOT, running_mai, wait_for  # noqa: E402
from tests.system.harness import test_env as child_env  # noqa: E402  (not a test)

pytestmark = pytest.mark.slow
GiB = 2**30
PROMPT = "you> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")
REPLY = re.compile(r"mai> \[[^\]]*\] messages=(\d+) last_user=.* digest=[0-9a-f]{8}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    ledger = tmp / "gpu.sqlite"
    with ollama_double(tmp / "ollama", ledger=ledger, vram_bytes=12 * GiB) as ollama, \
            lmstudio_double(tmp, ledger=ledger) as lms:
        sections = {"gpu": {"simulated_ledger": str(ledger)}, "ollama": {"host": ollama.host},
                    "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
                    "chat": {"reply_timeout_s": 60, "switch_hysteresis_s": 0, "token_batch_ms": 20}}
        with running_mai(tmp, **sections) as system:
            yield system, lms


class Terminal:
    """`mai chat` in a pty; `say` types a line and returns what was shown until the next prompt."""

    def __init__(self, system) -> None:
        env = dict(child_env(), TERM="xterm")
        self.child = pexpect.spawn(sys.executable, ["-m", "mai", "--config", str(system.config_path), "chat"],
                                   cwd=str(ROOT), env=env, encoding="utf-8", timeout=60, dimensions=(50, 240))
        self.child.expect(PROMPT)
        self.banner = clean(self.child.before)

    def say(self, line: str, timeout_s: float = 60) -> str:
        self.child.sendline(line)
        self.child.expect(PROMPT, timeout=timeout_s)
        return clean(self.child.before)

    def exit_status(self, timeout_s: float = 20) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout_s)
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.sendline("/quit")
            try:
                self.child.expect(pexpect.EOF, timeout=10)
            finally:
                self.child.close(force=True)


def clean(text: str) -> str:
    return ANSI.sub("", text)


def messages_in(reply_text: str) -> int:
    match = REPLY.search(reply_text)
    assert match, f"no reply from the model in: {reply_text!r}"
    return int(match.group(1))


@pytest.fixture
def terminal(world):
    system, _ = world
    term = Terminal(system)
    yield term
    term.close()


def test_chat_streams_replies_and_the_model_gets_the_growing_conversation(terminal):
    assert "/help" in terminal.banner
    first = messages_in(terminal.say("hello Mai"))
    second = terminal.say("tell me more")
    assert messages_in(second) == first + 2  # our previous message and Mai's reply went in with the new one
    assert "last_user=tell me more" in second


def test_slash_commands_answer_in_readable_lines(terminal, world):
    terminal.say("warm up")  # a model is chosen and loaded for the first reply
    models = terminal.say("/models")
    for column in ("model", "backend", "tier", "footprint", "loaded", "why not selectable"):
        assert column in models
    assert "qwen2.5-7b-instruct" in models and "llama3.2:3b" in models and "lmstudio" in models

    assert "pinned qwen2.5-3b-instruct" in terminal.say("/switch qwen2.5-3b-instruct")
    assert "qwen2.5-3b-instruct" in REPLY.search(terminal.say("which model are you?")).group(0)
    assert "current: qwen2.5-3b-instruct; pinned: qwen2.5-3b-instruct" in terminal.say("/models")
    assert "pin cleared" in terminal.say("/switch auto")
    assert "error: unknown chat model 'no-such-model'" in terminal.say("/switch no-such-model")

    assert "mode idle accepted" in terminal.say("/mode idle")
    assert "error: unknown mode 'warp'" in terminal.say("/mode warp")
    status = terminal.say("/status")
    assert "mode   idle" in status and "vram" in status and "chat   qwen2.5-3b-instruct" in status

    history = terminal.say("/history 2")
    assert "last 2 message(s)" in history
    assert "user: which model are you?" in history and "assistant (qwen2.5-3b-instruct):" in history

    help_text = terminal.say("/help")
    for command in ("/status", "/models", "/switch", "/mode", "/history", "/new", "/quit", "/help"):
        assert command in help_text
    unknown = terminal.say("/teleport")
    assert "error: unknown command /teleport; accepted: /status, /models" in unknown
    assert "Traceback" not in models + status + history + help_text + unknown

    started = terminal.say("/new")
    assert "new conversation" in started
    assert messages_in(terminal.say("fresh start")) == 2  # the system prompt and this message only


def test_ctrl_c_cancels_the_streaming_reply_but_not_the_session(terminal, world):
    _, lms = world
    terminal.say("/switch auto")
    terminal.say("warm up")
    cancels_before = len(_cancel_frames(lms))
    lms.configure(fragment_delay_s=1.0)  # six fragments: a whole reply would take six seconds
    try:
        terminal.child.sendline("tell me a long story")
        terminal.child.expect("mai> ")
        terminal.child.expect(r"\S")  # the first fragment is on the screen: the reply streams
        interrupted_at = time.monotonic()
        terminal.child.sendintr()
        terminal.child.expect(r"\[cancelled\]", timeout=10)
        terminal.child.expect(PROMPT, timeout=10)
        assert time.monotonic() - interrupted_at < 4.0
        assert "digest=" not in clean(terminal.child.before)
    finally:
        lms.configure(fragment_delay_s=0.01)
    wait_for(lambda: len(_cancel_frames(lms)) > cancels_before, timeout_s=10)  # the model really stopped

    after = terminal.say("are you still there?")
    assert "are you still there? digest=" in REPLY.search(after).group(0)  # the session goes on
    assert "[interrupted]" in terminal.say("/history 3")


def test_a_thinking_model_shows_one_dim_line_that_collapses_before_the_reply(terminal, world):
    _, lms = world
    terminal.say("/switch auto")
    terminal.say("warm up")
    lms.configure(reasoning={"qwen2.5-7b-instruct": 6, "qwen2.5-3b-instruct": 6}, reasoning_delay_s=0.25)
    try:
        terminal.child.sendline("why is the sky blue?")
        terminal.child.expect(PROMPT, timeout=60)
        raw = terminal.child.before
    finally:
        lms.configure(reasoning={})
    dim_line = re.compile(r"\r\x1b\[2K\x1b\[2mthinking… \((\d+) words\)\x1b\[0m")
    counts = [int(n) for n in dim_line.findall(raw)]
    assert len(counts) >= 3 and counts == sorted(counts)  # one line, redrawn in place as the reasoning grows
    summary = re.search(r"\r\x1b\[2K\x1b\[2mthought for \d+\.\d s \((\d+) words\) · /thinking shows it\x1b\[0m\r?\n", raw)
    assert summary and int(summary.group(1)) == counts[-1]
    shown = clean(raw)
    assert shown.index("thought for") < shown.index("mai> ")  # collapsed before the reply starts
    reply = REPLY.search(shown).group(0)
    assert "think-digest" not in shown and "last_user=why is the sky blue?" in reply

    reasoning = terminal.say("/thinking")
    assert "reasoning of the last reply" in reasoning and "think-digest=" in reasoning
    assert "the user asked: why is the sky blue?" in reasoning
    assert "think-digest" not in terminal.say("/history 2")
    assert "/thinking" in terminal.say("/help")


def _cancel_frames(lms) -> list:
    return [f for f in lms.frames() if (f.get("message") or {}).get("type") == "cancel"]


@pytest.mark.parametrize("leave", ["/quit", "ctrl-d", "ctrl-c", "hangup"])
def test_leaving_ends_the_session_and_its_actor(world, leave):
    system, _ = world
    port = system.config.system.admin_port
    before = {p.pid for p in system_processes(port)}
    term = Terminal(system)
    assert len(system_processes(port)) == len(before) + 1  # the session's ReplActor
    if leave == "/quit":
        term.child.sendline("/quit")
    elif leave == "ctrl-d":
        term.child.sendeof()
    elif leave == "ctrl-c":
        term.child.sendintr()
    else:  # the terminal window was closed
        term.child.kill(signal.SIGHUP)
    assert term.exit_status() == (128 + signal.SIGHUP if leave == "hangup" else 0)
    wait_for(lambda: {p.pid for p in system_processes(port)} == before, timeout_s=15)


def test_piped_input_chats_without_a_prompt(world):
    system, _ = world
    result = subprocess.run([sys.executable, "-m", "mai", "--config", str(system.config_path), "chat"],
                            input="/mode idle\nhello from a pipe\n", capture_output=True, text=True, timeout=90,
                            env=child_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert PROMPT not in result.stdout
    assert "mode idle accepted" in result.stdout and "last_user=hello from a pipe" in result.stdout


def test_chat_says_plainly_when_mai_is_not_running(tmp_path):
    from tests.system.harness import mai, write_config

    result = mai(write_config(tmp_path), "chat")
    assert result.returncode == 1
    assert "Mai is not running" in result.stderr and "mai start" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_terminal_notices_when_mai_stops(tmp_path):
    with running_mai(tmp_path) as system:
        term = Terminal(system)
        stopped = system.cli("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        term.child.expect("the chat session is gone", timeout=30)  # noticed at the prompt, without typing
        assert term.exit_status() == 1
