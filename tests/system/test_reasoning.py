"""A reasoning model end to end: the real actors, the LM Studio double streaming reasoning fragments (`<think>`,
reasoning, `</think>`, then the reply; real-servers.md L3). The double's reply is derived from the whole history
it received, so the second reply proves the reasoning of the first never reached the model again."""

from __future__ import annotations

import pytest

from mai.conversation import Mai
from mai.sim.lmstudio_server import reasoning_for, reply_for
from messages.chat import ReplyFragment
from tests.doubles.lmstudio import lmstudio_double
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai

pytestmark = pytest.mark.slow
GiB = 2**30
BIG = "qwen2.5-7b-instruct"
INSTANCE = f"mai:{BIG}"


def test_reasoning_is_streamed_apart_never_stored_and_never_fed_back(tmp_path):
    ledger = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger, vram_bytes=16 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger)) as lms:
        sections = {
            "gpu": {"simulated_total_mb": 16384, "simulated_ledger": str(ledger)},
            "ollama": {"host": ollama.host},
            "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
            "chat": {"reply_timeout_s": 60, "token_batch_ms": 20},
        }
        lms.configure(reasoning={BIG: 5}, reasoning_delay_s=0.05)
        with running_mai(tmp_path, **sections) as system, Mai(config=system.config) as m:
            prompt = system.config.chat.system_prompt
            asked = [("system", prompt), ("user", "why is the sky blue?")]

            pieces = list(m.stream_message("why is the sky blue?", thinking=True))
            assert all(isinstance(p, ReplyFragment) for p in pieces)
            thinking = "".join(p.text for p in pieces if p.reasoning)
            first = "".join(p.text for p in pieces if not p.reasoning)
            assert thinking == reasoning_for(INSTANCE, asked) == m.last_reply.thinking
            assert first == reply_for(INSTANCE, asked) == m.last_reply.content
            assert pieces.index(next(p for p in pieces if not p.reasoning)) > 0  # the thinking came first

            second = "".join(m.stream_message("and at sunset?"))  # content only, by default
            replayed = asked + [("assistant", first), ("user", "and at sunset?")]
            assert second == reply_for(INSTANCE, replayed)  # the model got the reply, not the reasoning
            assert m.last_reply.thinking == reasoning_for(INSTANCE, replayed)

            history = m.get_conversation_history()
            assert [h["content"] for h in history if h["role"] == "assistant"] == [first, second]
            assert not any("think-digest" in h["content"] or "<think>" in h["content"] for h in history)
            predicts = [f["creationParameter"]["history"]["messages"]
                        for f in lms.frames(type="channelCreate", endpoint="predict")]
            assert len(predicts) == 2
            sent = [part.get("text", "") for message in predicts[1] for part in message["content"]]
            assert first in sent and not any("think-digest" in text or "<think>" in text for text in sent)
