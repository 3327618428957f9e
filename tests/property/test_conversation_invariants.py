"""Invariants 13 and 14 at the core level: the pure policy, the pure context fitter and the real history store,
driven by hypothesis through random conversations.

13. No chat turn is ever lost: across model switches, failed replies, crashes (the store reopened, the policy
    rebuilt from nothing) and a process SIGKILLed mid-reply, every completed turn is in the store, in order.
14. After a switch the new model receives the conversation: the messages it is fed always hold the system prompt
    and the latest user message, fit its window, and are the canonical list in order with some messages left out,
    at most one summary added, and consecutive roles merged.

The harness plays the conversation agent's part in a few lines: store the user's message, choose a model, fit the
canonical list to its window, stream a reply into the store. Models differ in window and tokenizer.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from backends.history_store import HistoryStore
from mai.core.chat_policy import Availability, Candidate, ChatPolicy
from mai.core.context import (
    SUMMARY_PREFIX,
    TRUNCATION_MARKER,
    ContextPlan,
    approx_tokens,
    fit_to_window,
    merge_consecutive,
)
from messages.chat import ChatMessage
from messages.errors import Reason

GiB = 1024**3
SYSTEM_PROMPT = "You are Mai, a helpful assistant. Answer briefly."
OVERHEAD = 4
EVERYTHING = Availability(frozenset({"lmstudio", "ollama"}))


def words(text: str) -> int:
    return len(text.split())


def half_chars(text: str) -> int:
    return math.ceil(len(text) / 2)


def utf8_thirds(text: str) -> int:
    return len(text.encode()) // 3 + (1 if text else 0)


def bumpy(text: str) -> int:
    """Not additive: joining two texts with a blank line costs more than the two apart."""
    return len(text) // 3 + 2 * text.count("\n") + 1


TOKENIZERS: dict[str, Callable[[str], int]] = {
    "approx": approx_tokens, "words": words, "half_chars": half_chars, "utf8_thirds": utf8_thirds, "bumpy": bumpy,
}
MODELS = (("large", "lmstudio", 3, 6 * GiB), ("medium", "ollama", 2, 3 * GiB), ("small", "ollama", 1, 1 * GiB))
WORDS = ("the", "cat", "sat", "on", "a", "mat.", "Why?", "because", "it", "was", "warm!", "GPU", "memory", "é",
         "日本")
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=60).map(" ".join)


def make_turns(turns: int, seed: int, max_words: int) -> list[tuple[str, str]]:
    """(role, text) pairs, long conversations cheaply: hypothesis draws the size and a seed, not every word."""
    rng = random.Random(seed)
    return [
        (rng.choice(["user", "assistant"]), " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))))
        for _ in range(turns)
    ]


history_turns = st.builds(
    make_turns, turns=st.integers(0, 150), seed=st.integers(0, 2**32 - 1), max_words=st.sampled_from([5, 30, 120])
)


def reserve_for(window: int) -> int:
    return window // 8


def check_fed(plan: ContextPlan, canonical: list[ChatMessage], window: int, count: Callable[[str], int]) -> None:
    """Invariant 14 for one plan fed to a model with `window` tokens."""
    fed, budget = plan.messages, window - reserve_for(window)
    latest_user = max(i for i, m in enumerate(canonical) if m.role == "user")
    # The system prompt and the latest user message are there.
    assert fed[0].role == "system" and fed[0].content.startswith(SYSTEM_PROMPT)
    assert {0, latest_user} <= set(plan.kept)
    if canonical[-1].role == "user":  # a question waiting for this model's reply: it is the last thing fed
        assert fed[-1].role == "user"
        assert TRUNCATION_MARKER in fed[-1].content if plan.truncated else fed[-1].content.endswith(
            canonical[-1].content
        )
    # It fits the window, counted by this model's tokenizer.
    assert plan.tokens == sum(count(m.content) + OVERHEAD for m in fed)
    assert plan.tokens <= budget
    # The canonical list in order, some messages left out, at most one summary, roles merged.
    assert list(plan.kept) == sorted(set(plan.kept)) and plan.dropped == len(canonical) - len(plan.kept)
    assert sum(SUMMARY_PREFIX in m.content for m in fed) <= (1 if plan.summary is not None else 0)
    assert all(a.role != b.role for a, b in zip(fed, fed[1:]))
    if not plan.truncated:
        selected = [canonical[i] for i in plan.kept]
        if plan.summary is not None:
            assert plan.summary.role == "system" and plan.summary.content.startswith(SUMMARY_PREFIX)
            first_dropped = min(set(range(len(canonical))) - set(plan.kept))
            selected.insert(sum(1 for i in plan.kept if i < first_dropped), plan.summary)
        assert merge_consecutive(selected) == fed


def _append_then_die(path: str, conversation: str, question: str, model: str, partial: str) -> None:
    """Child process: the user's message and the start of a reply are written, then the process is killed."""
    store = HistoryStore(path)
    store.append(conversation, ChatMessage("user", question), model=None, now=0.0)
    reply = store.begin_reply(conversation, model, now=0.0)
    store.update_reply(reply, partial, status="pending")
    os.kill(os.getpid(), signal.SIGKILL)


class Conversation(RuleBasedStateMachine):
    """The agent's loop against the real store and the pure cores, with a virtual clock."""

    @initialize(
        windows=st.tuples(*[st.sampled_from([256, 512, 1024, 4096])] * 3),
        tokenizers=st.tuples(*[st.sampled_from(sorted(TOKENIZERS))] * 3),
        earlier_turns=history_turns,
    )
    def start(
        self, windows: tuple[int, int, int], tokenizers: tuple[str, str, str], earlier_turns: list[tuple[str, str]]
    ) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mai-conv-")
        self.path = str(Path(self.tmp) / "conversation.db")
        self.chain = [Candidate(key, backend, tier, window, footprint)
                      for (key, backend, tier, footprint), window in zip(MODELS, windows)]
        self.count = {key: TOKENIZERS[name] for (key, *_), name in zip(MODELS, tokenizers)}
        self.now = 0.0
        self.grantable: int | None = None
        self.pinned: str | None = None
        self.current: str | None = None
        self.killed_child = False
        self.store = HistoryStore(self.path)
        self.conversation = self.store.new_conversation(SYSTEM_PROMPT, now=self.now)
        self.expected = [ChatMessage("system", SYSTEM_PROMPT)]  # every completed turn, in order
        for role, text in earlier_turns:  # a conversation that has been going on for a while
            self.store.append(self.conversation, ChatMessage(role, text), model="small", now=self.now)
            self.expected.append(ChatMessage(role, text))
        self.policy = self._new_policy()

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _new_policy(self) -> ChatPolicy:
        return ChatPolicy(self.chain, cooldown_s=60, hysteresis_s=30, max_retries=1, retry_backoff_s=0.5,
                          min_tokens_per_s=2.0)

    # -- the agent's steps ---------------------------------------------------------------------------------

    def _switch(self) -> str | None:
        """Choose; whenever the model changes, the new one is fed the canonical list and checked (invariant 14)."""
        key = self.policy.choose(self.grantable, EVERYTHING, self.now, self.current, self.pinned).key
        if key is not None and key != self.current:
            event("switched")
            self._feed(key)
        self.current = key
        return key

    def _feed(self, key: str) -> ContextPlan:
        window = self.policy.candidate(key).context_window
        canonical = self.store.messages_for_model(self.conversation)
        plan = fit_to_window(canonical, window, self.count[key], reserve_for_reply=reserve_for(window),
                             message_overhead_tokens=OVERHEAD)
        if any(m.role == "user" for m in canonical):
            check_fed(plan, canonical, window, self.count[key])
        event(f"fed {'compressed' if plan.compressed else 'trimmed' if plan.dropped else 'whole'}")
        return plan

    def _reply(self, key: str, text: str, fail: bool) -> bool:
        """Stream a reply on `key`; True when it completed."""
        self._feed(key)
        reply = self.store.begin_reply(self.conversation, key, now=self.now)
        self.store.update_reply(reply, text[: len(text) // 2], status="pending")
        if fail:
            self.store.update_reply(reply, text[: len(text) // 2], status="failed")
            self.policy.record_failure(key, Reason.PREDICTION_FAILED, self.now)
            event("reply failed")
            return False
        self.store.update_reply(reply, text, status="complete")
        self.expected.append(ChatMessage("assistant", text))
        self.policy.record_success(key, self.now, tokens_per_s=20.0)
        return True

    def _restart(self) -> None:
        """The agent crashed: a new process opens the store, marks what was streaming, rebuilds its policy."""
        self.store = HistoryStore(self.path)  # the old object is abandoned, as a dead process would leave it
        self.store.mark_interrupted(now=self.now)
        self.policy = self._new_policy()
        self.current = None
        assert self.store.current_conversation() == self.conversation

    # -- rules -----------------------------------------------------------------------------------------------

    @rule(question=texts, answer=texts, failures=st.integers(min_value=0, max_value=3))
    def user_says(self, question: str, answer: str, failures: int) -> None:
        self.now += 1
        self.store.append(self.conversation, ChatMessage("user", question), model=None, now=self.now)
        self.expected.append(ChatMessage("user", question))
        for attempt in range(failures + 1):
            key = self._switch()
            if key is None:
                return  # no model fits now: the question waits in the store
            if self._reply(key, f"({key}) {answer}", fail=attempt < failures):
                return

    @rule(grantable=st.sampled_from([None, 8 * GiB, 4 * GiB, 2 * GiB, GiB // 2]), gap_s=st.floats(0, 100))
    def resources_change(self, grantable: int | None, gap_s: float) -> None:
        self.now += gap_s
        self.grantable = grantable
        self._switch()

    @rule(pinned=st.sampled_from([None, "large", "medium", "small"]))
    def user_switches(self, pinned: str | None) -> None:
        self.pinned = pinned
        self._switch()

    @rule(answer=texts)
    def crash_mid_reply(self, answer: str) -> None:
        key = self._switch()
        if key is None or self.expected[-1].role != "user":
            return
        reply = self.store.begin_reply(self.conversation, key, now=self.now)
        self.store.update_reply(reply, answer[: len(answer) // 2], status="pending")
        self._restart()
        event("crashed")
        assert self.store.history(self.conversation)[-1].status == "interrupted"

    @rule(question=texts, partial=texts)
    def process_killed_mid_reply(self, question: str, partial: str) -> None:
        """Once per run, a real process writes the question, starts a reply and is SIGKILLed."""
        if self.killed_child:
            return
        self.killed_child = True
        event("process killed")
        child = multiprocessing.get_context("fork").Process(
            target=_append_then_die, args=(self.path, self.conversation, question, self.current or "small", partial)
        )
        child.start()
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        self.expected.append(ChatMessage("user", question))  # append returned in the child: it is durable
        self._restart()
        last = self.store.history(self.conversation)[-1]
        assert (last.role, last.content, last.status) == ("assistant", partial, "interrupted")

    # -- invariant 13 ----------------------------------------------------------------------------------------

    @invariant()
    def no_completed_turn_is_lost(self) -> None:
        if hasattr(self, "store"):
            assert self.store.messages_for_model(self.conversation) == self.expected
            assert all(m.status != "pending" for m in self.store.history(self.conversation))


Conversation.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_conversation_invariants = Conversation.TestCase


# -- invariant 14 on its own: any conversation, any window, any tokenizer --------------------------------------

conversations = st.builds(
    lambda turns, question: [ChatMessage("system", SYSTEM_PROMPT)] + [ChatMessage(r, t) for r, t in turns]
    + [ChatMessage("user", question)],
    history_turns,
    st.one_of(texts, st.builds(lambda n: "Why? " * n, st.integers(100, 1000))),  # sometimes far too long
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    canonical=conversations,
    windows=st.lists(st.sampled_from([256, 300, 512, 1000, 2048]), min_size=1, max_size=4),
    tokenizer=st.sampled_from(sorted(TOKENIZERS)),
)
def test_every_model_switched_to_is_fed_a_fitting_faithful_context(
    canonical: list[ChatMessage], windows: list[int], tokenizer: str
) -> None:
    count = TOKENIZERS[tokenizer]
    for window in windows:  # one switch after another, each to a model with another window
        plan = fit_to_window(canonical, window, count, reserve_for_reply=reserve_for(window),
                             message_overhead_tokens=OVERHEAD)
        check_fed(plan, canonical, window, count)
