"""Contract: Ollama's thinking output (real-servers.md O15) through the REAL `ollama` client against the double.

A thinking-capable model thinks by default: `message.thinking` streams before `content`. Mai surfaces it tagged
REASONING, never as the reply, and sends `think` only for a model Ollama says can think (`think: true` to any
other model is a 400)."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

from backends.chat import ChatBackends
from backends.ollama import OllamaAdapter
from config import load_config
from mai.core.chat_policy import Candidate
from mai.sim.ollama_server import chat_reply, thinking_reply
from messages.chat import ChatMessage, FragmentKind
from messages.errors import InvalidRequest
from tests.doubles.ollama import OllamaDouble, ollama_double

THINKER = "qwen3:0.6b"  # capabilities completion, tools, thinking in the double's default models
PLAIN = "qwen2.5:0.5b"  # no thinking capability
HISTORY = [ChatMessage("system", "You are terse."), ChatMessage("user", "Why is the sky blue?")]
WIRE = [{"role": m.role, "content": m.content} for m in HISTORY]


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> Iterator[OllamaDouble]:
    with ollama_double(tmp_path_factory.mktemp("ollama-think")) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(double: OllamaDouble) -> None:
    double.reset()


@pytest.fixture
def adapter(double: OllamaDouble) -> Iterator[OllamaAdapter]:
    with OllamaAdapter(double.host, num_ctx=4096, request_timeout_s=2.0, load_timeout_s=5.0) as a:
        yield a


def chat_bodies(double: OllamaDouble) -> list[dict]:
    return [r["body"] for r in double.requests("/api/chat")]


def joined(fragments, kind: FragmentKind) -> str:
    return "".join(f.text for f in fragments if f.kind is kind)


def test_a_thinking_model_thinks_by_default_and_its_thinking_is_tagged_not_the_reply(double, adapter):
    fragments = list(adapter.chat_stream(THINKER, HISTORY))

    assert joined(fragments, FragmentKind.REASONING) == thinking_reply(THINKER, "Why is the sky blue?")
    assert joined(fragments, FragmentKind.CONTENT) == chat_reply(THINKER, WIRE)
    kinds = [f.kind for f in fragments]
    assert kinds == sorted(kinds, key=lambda k: k is FragmentKind.CONTENT)  # all the thinking comes first
    assert "think" not in chat_bodies(double)[-1]  # nothing sent: on by default


def test_think_true_is_sent_when_asked_and_false_turns_thinking_off(double, adapter):
    thought = list(adapter.chat_stream(THINKER, HISTORY, think=True))
    assert chat_bodies(double)[-1]["think"] is True
    assert joined(thought, FragmentKind.REASONING)

    plain = list(adapter.chat_stream(THINKER, HISTORY, think=False))
    assert chat_bodies(double)[-1]["think"] is False
    assert [f.kind for f in plain] == [FragmentKind.CONTENT] * len(plain)
    assert joined(plain, FragmentKind.CONTENT) == chat_reply(THINKER, WIRE)


def test_a_model_without_the_capability_streams_content_only_and_refuses_think_true(double, adapter):
    fragments = list(adapter.chat_stream(PLAIN, HISTORY))
    assert {f.kind for f in fragments} == {FragmentKind.CONTENT}
    with pytest.raises(InvalidRequest, match="does not support thinking"):
        list(adapter.chat_stream(PLAIN, HISTORY, think=True))


def test_think_must_be_a_bool_or_none(adapter):
    with pytest.raises(InvalidRequest, match="think"):
        adapter.chat_stream(THINKER, HISTORY, think="high")  # type: ignore[arg-type]


def test_the_chat_backends_send_think_only_to_a_model_ollama_says_can_think(double):
    cfg = load_config(env={}, overrides={"ollama.host": double.host, "lmstudio.enabled": False})
    backends = ChatBackends(cfg)
    try:
        for key, sent in ((THINKER, True), (PLAIN, None), (THINKER, True)):
            candidate = Candidate(key, "ollama", 1, 4096, 2**20)
            fragments = list(backends.stream(candidate, HISTORY, threading.Event()))
            assert chat_bodies(double)[-1].get("think") is sent
            assert joined(fragments, FragmentKind.CONTENT) == chat_reply(key, WIRE)
        shows = [r["body"]["model"] for r in double.requests("/api/show")]
        assert shows == [THINKER, PLAIN]  # the capability is asked once per model
    finally:
        backends.close()
