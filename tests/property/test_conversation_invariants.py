"""Invariants 13 and 14, driven by hypothesis through random conversations with the REAL conversation agent:
`actors.conversation_agent.ConversationAgent` itself (its handlers, `ChatPolicy`, `fit_to_window`, the real
`HistoryStore` on disk), its messages delivered one by one by a small in-process driver on a virtual clock.

13. No chat turn is ever lost: across model switches, failed loads and replies, yields to the mode, crashes (a new
    agent object on the same store) and a process SIGKILLed mid-reply, every completed turn is in the store, in
    order, with the text the model streamed; no reply stays 'pending'; reasoning never reaches the store.
14. Every model is fed the conversation: each `stream` call gets the system prompt and the latest user message,
    fits the model's window by its tokenizer, and is the canonical list in order with some messages left out, at
    most one summary added, consecutive roles merged.

What is not the product here (each plays the part of something outside the agent's process, sending only the
messages the real one sends): the driver (Thespian's mailbox and wakeups), `Gate` (the coordinator's answers to
GetGrantable and ChatNeeds: Grantable, ChatGrant, or a Failure INSUFFICIENT_VRAM naming the free bytes), and
`Servers` (the ChatBackends facade over LM Studio and Ollama: availability, load, unload, stream, tokenizers).
"""

from __future__ import annotations

import datetime
import heapq
import math
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from thespian.actors import ActorAddress, WakeupMessage

import actors.base
import backends.chat
import actors.conversation_agent as agent_module
from backends.history_store import HistoryStore
from config import load_config
from mai.core.chat_policy import Availability
from mai.core.context import (
    SUMMARY_PREFIX,
    TRUNCATION_MARKER,
    ContextPlan,
    approx_tokens,
    fit_to_window,
    merge_consecutive,
)
from messages.chat import ChatMessage, FragmentKind, ReplyFragment
from messages.conversation import (
    ChatGrant,
    ChatNeeds,
    ChatYield,
    GetGrantable,
    Grantable,
    ModelPinned,
    ReplyChunk,
    ReplyDone,
    SwitchModel,
    UserTurn,
)
from messages.errors import BackendUnavailable, InsufficientVram, LoadFailed, PredictionFailed, Reason
from messages.failure import Failure
from messages.system import Init

GiB = 1024**3
SYSTEM_PROMPT = "You are Mai, a helpful assistant. Answer briefly."
OVERHEAD = 4
THINK_MARKER = "think-marker"
NO_REPLY_EXIT = 3


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
# (key, backend, tier, footprint): the chat chain, best first.
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


def reserve_for(window: int, max_tokens: int = 10**9) -> int:
    """The agent's reserve for the reply: a quarter of the window, at most chat.max_tokens."""
    return min(max_tokens, window // 4)


def check_fed(plan: ContextPlan, canonical: list[ChatMessage], window: int, count: Callable[[str], int],
              reserve: int) -> None:
    """Invariant 14 for one plan fed to a model with `window` tokens."""
    fed, budget = plan.messages, window - reserve
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


# -- what lies outside the agent's process ---------------------------------------------------------------------

CLIENT, COORDINATOR = ActorAddress("client"), ActorAddress("coordinator")


class Clock:
    """Virtual time for the agent module's `time.time()` and `time.monotonic()`; each monotonic read moves it
    on a little, so the agent's token batches and checkpoints happen as they would on a real clock."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        self.now += 0.01
        return self.now


@dataclass
class Servers:
    """LM Studio and Ollama behind the ChatBackends facade: which models are loaded, scripted failures, and every
    context fed to a model (checked against invariant 14 as it is fed)."""

    tokenizers: dict[str, Callable[[str], int]]
    answers: list[str] = field(default_factory=list)  # the next replies' texts, one per stream
    loaded_models: dict[str, int] = field(default_factory=dict)
    load_failures: set[str] = field(default_factory=set)
    midstream_failures: int = 0  # the next n streams fail halfway
    down: set[str] = field(default_factory=set)  # backends that do not answer
    reasoning: bool = False
    kill_after: int | None = None  # this process is SIGKILLed after that many fragments (a crash mid-reply)
    on_stream: Callable[[str, list[ChatMessage]], None] | None = None
    last_errors: dict[str, str] = field(default_factory=dict)

    def availability(self) -> Availability:
        self.last_errors = {b: f"{b} does not answer" for b in self.down}
        return Availability(frozenset({"lmstudio", "ollama"} - self.down), None)

    def degraded_reason(self, used: set[str]) -> str:
        return "; ".join(self.last_errors[b] for b in sorted(used & set(self.last_errors)))

    def loaded(self) -> dict[str, int]:
        return dict(self.loaded_models)

    def load(self, candidate: Any, on_progress: Any = None) -> int:
        if candidate.backend in self.down:
            raise BackendUnavailable(f"{candidate.backend} does not answer")
        if candidate.key in self.load_failures:
            raise LoadFailed(f"{candidate.key} failed to load")
        self.loaded_models[candidate.key] = candidate.footprint_bytes
        return candidate.footprint_bytes

    def unload(self, candidate: Any) -> None:
        self.loaded_models.pop(candidate.key, None)

    def token_counter(self, candidate: Any) -> Callable[[str], int]:
        return self.tokenizers[candidate.key]

    def stream(self, candidate: Any, messages: Any, cancel: Any) -> Iterator[ReplyFragment]:
        if self.on_stream is not None:
            self.on_stream(candidate.key, list(messages))
        fail = self.midstream_failures > 0
        self.midstream_failures -= fail
        text = f"({candidate.key}) {self.answers.pop(0) if self.answers else 'ok'}"
        return self._fragments(text, fail)

    def _fragments(self, text: str, fail: bool) -> Iterator[ReplyFragment]:
        if self.reasoning:
            yield ReplyFragment(f"{THINK_MARKER} first, ", FragmentKind.REASONING)
        pieces = text.split(" ")
        for n, piece in enumerate(pieces):
            if fail and n == len(pieces) // 2:
                raise PredictionFailed("the model stopped answering halfway")
            if self.kill_after is not None and n == self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            yield ReplyFragment(piece + (" " if n < len(pieces) - 1 else ""))


@dataclass
class Gate:
    """The coordinator's side of a chat turn, as the real one answers: what it could grant, and each ChatNeeds
    granted when it fits (counting what the chat model holds), else refused for memory."""

    grantable: int | None = None
    step: int = 0

    def answer(self, msg: Any) -> Any:
        if isinstance(msg, GetGrantable):
            return Grantable(msg.request_id, self.grantable, None, self.grantable)
        if isinstance(msg, ChatNeeds) and not msg.unload:
            if self.grantable is not None and msg.needed_bytes > self.grantable:
                err = InsufficientVram(f"{msg.model} needs {msg.needed_bytes} bytes", needed_bytes=msg.needed_bytes,
                                       free_bytes=self.grantable, evictable=())
                return Failure.from_error(msg.request_id, err)
            self.step += 1
            return ChatGrant(msg.request_id, f"chat-step-{self.step}", self.grantable or 0)
        return None  # ChatLoaded, ChatUnloaded, ModelSwitched, PartHealth, StepFailed: facts it takes note of


class DrivenAgent(agent_module.ConversationAgent):
    """The real agent; only Thespian's two primitives are replaced, by the driver's mailbox and timer queue."""

    def __init__(self, driver: "Driver") -> None:
        super().__init__()
        self.driver = driver

    def send(self, target: Any, message: Any) -> None:
        self.driver.outbox.append((target, message))

    def wakeupAfter(self, delay: datetime.timedelta, payload: Any = None) -> None:
        self.driver.timer(delay.total_seconds(), WakeupMessage(delay, payload))


class Driver:
    """One agent's mailbox: messages are delivered in the order sent; wakeups when the virtual clock reaches them."""

    def __init__(self, config: Any, clock: Clock, servers: Servers, gate: Gate) -> None:
        self.config, self.clock, self.servers, self.gate = config, clock, servers, gate
        self.outbox: list[tuple[Any, Any]] = []
        self.timers: list[tuple[float, int, WakeupMessage]] = []
        self.to_client: list[Any] = []
        self.seq = 0
        self.agent = self.start()

    def start(self) -> DrivenAgent:
        """A fresh agent process: Init from the supervisor, then whatever it reconciles from the world."""
        self.outbox.clear()
        self.timers.clear()
        self.agent = DrivenAgent(self)
        self.deliver(Init(self.config, (("coordinator", COORDINATOR),), 0), ActorAddress("supervisor"))
        self.settle()
        return self.agent

    def timer(self, delay_s: float, wakeup: WakeupMessage) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (self.clock.now + delay_s, self.seq, wakeup))

    def deliver(self, message: Any, sender: Any) -> None:
        self.agent.receiveMessage(message, sender)

    def settle(self, until: Callable[[], bool] = lambda: False, max_s: float = 600.0) -> None:
        """Deliver everything sent, then timers in time order, until `until()` or nothing is left to do."""
        deadline = self.clock.now + max_s
        while not until():
            if self.outbox:
                target, message = self.outbox.pop(0)
                if target == COORDINATOR:
                    answer = self.gate.answer(message)
                    if answer is not None:
                        self.deliver(answer, COORDINATOR)
                else:
                    self.to_client.append(message)
                continue
            if not self.timers or self.timers[0][0] > deadline:
                return
            at, _, wakeup = heapq.heappop(self.timers)
            self.clock.now = max(self.clock.now, at)
            self.deliver(wakeup, None)

    def ask(self, message: Any) -> Any:
        """Send a request as a client does; the final answer (ReplyDone, Failure, ModelPinned), chunks aside."""
        self.to_client.clear()
        self.deliver(message, CLIENT)
        self.settle(until=lambda: any(not isinstance(m, ReplyChunk) for m in self.to_client))
        finals = [m for m in self.to_client if not isinstance(m, ReplyChunk)]
        assert finals, f"no answer to {message!r}: the agent went quiet"
        return finals[0]


def _config(tmp: str, windows: tuple[int, int, int]) -> Any:
    catalog = {
        "models": [{"key": key, "backend": backend, "tier": tier, "context_window": window,
                    "footprint_mb": footprint // 2**20, "capabilities": ["chat"]}
                   for (key, backend, tier, footprint), window in zip(MODELS, windows)],
        "roles": {"chat": [key for key, *_ in MODELS]},
    }
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(catalog))
    user = {
        "system": {"state_dir": str(Path(tmp) / "state"), "models_file": str(models)},
        "chat": {"system_prompt": SYSTEM_PROMPT, "max_retries": 1, "retry_backoff_s": 0.5, "cooldown_s": 60,
                 "switch_hysteresis_s": 30, "min_tokens_per_s": 2.0, "token_batch_ms": 20, "reply_timeout_s": 300},
        "logging": {"console": False, "level": "warning"},
    }
    path = Path(tmp) / "mai.yaml"
    path.write_text(yaml.safe_dump(user))
    return load_config(path, env={})


def _die_mid_reply(driver: Driver, question: str, answer: str) -> None:
    """Child process: the real agent takes the turn and streams until the process is SIGKILLed mid-reply."""
    driver.servers.kill_after = len(answer.split(" ")) // 2 + 1
    driver.servers.answers[:] = [answer]
    driver.start()  # a new agent, with its own connection to the store
    driver.deliver(UserTurn("killed", question), CLIENT)
    driver.settle()
    os._exit(NO_REPLY_EXIT)  # reached only when no reply began: a streaming reply kills the process


class Conversation(RuleBasedStateMachine):
    """The real agent's turns against the real store, with scripted servers and gate, on a virtual clock."""

    @initialize(
        windows=st.tuples(*[st.sampled_from([256, 512, 1024, 4096])] * 3),
        tokenizers=st.tuples(*[st.sampled_from(sorted(TOKENIZERS))] * 3),
        earlier_turns=history_turns,
        reasoning=st.booleans(),
    )
    def start(self, windows: tuple[int, int, int], tokenizers: tuple[str, str, str],
              earlier_turns: list[tuple[str, str]], reasoning: bool) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mai-conv-")
        self.config = _config(self.tmp, windows)
        self.windows = {key: window for (key, *_), window in zip(MODELS, windows)}
        self.clock = Clock()
        self.real_time, agent_module.time = agent_module.time, SimpleNamespace(
            time=self.clock.time, monotonic=self.clock.monotonic)
        self.real_die, actors.base.die_with_parent = actors.base.die_with_parent, lambda: None
        self.real_backends, backends.chat.ChatBackends = backends.chat.ChatBackends, lambda cfg: self.servers
        counts = {key: TOKENIZERS[name] for (key, *_), name in zip(MODELS, tokenizers)}
        self.servers = Servers(counts, reasoning=reasoning, on_stream=self._fed)
        self.gate = Gate()
        self.killed_child = False
        self.fed_models: list[str] = []
        db = Path(self.config.system.state_dir) / self.config.chat.history_db
        db.parent.mkdir(parents=True, exist_ok=True)
        self.store = HistoryStore(db)  # the conversation that was going on before this agent started
        self.conversation = self.store.new_conversation(SYSTEM_PROMPT, now=self.clock.now)
        self.expected = [ChatMessage("system", SYSTEM_PROMPT)]  # every completed turn, in order
        for role, text in earlier_turns:
            self.store.append(self.conversation, ChatMessage(role, text), model="small", now=self.clock.now)
            self.expected.append(ChatMessage(role, text))
        self.driver = Driver(self.config, self.clock, self.servers, self.gate)
        assert self.driver.agent.conversation_id == self.conversation

    def teardown(self) -> None:
        if hasattr(self, "real_time"):
            agent_module.time, actors.base.die_with_parent = self.real_time, self.real_die
            backends.chat.ChatBackends = self.real_backends
        if hasattr(self, "store"):
            self.store.close()
            if getattr(self.driver.agent, "store", None) is not None:
                self.driver.agent.store.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _fed(self, key: str, fed: list[ChatMessage]) -> None:
        """Invariant 14, checked on what the agent hands the server, at the moment it hands it over."""
        canonical = self.store.messages_for_model(self.conversation)
        window, count = self.windows[key], self.servers.tokenizers[key]
        reserve = reserve_for(window, self.config.chat.max_tokens)
        plan = fit_to_window(canonical, window, count, reserve_for_reply=reserve,
                             compress_at_fraction=self.config.chat.compress_at_fraction)
        assert list(plan.messages) == fed, "the agent fed something other than the canonical list fitted to the window"
        check_fed(plan, canonical, window, count, reserve)
        assert not any(THINK_MARKER in m.content for m in fed), "reasoning was fed back to a model"
        if self.fed_models and self.fed_models[-1] != key:
            event("switched model")
        self.fed_models.append(key)
        event(f"fed {'compressed' if plan.compressed else 'trimmed' if plan.dropped else 'whole'}")

    # -- rules -----------------------------------------------------------------------------------------------

    @rule(question=texts, answer=texts, midstream=st.integers(0, 3), load_fails=st.sets(st.sampled_from(
        [key for key, *_ in MODELS]), max_size=2))
    def user_says(self, question: str, answer: str, midstream: int, load_fails: set[str]) -> None:
        self.servers.midstream_failures, self.servers.load_failures = midstream, set(load_fails)
        self.servers.answers[:] = [answer] * 8
        self.expected.append(ChatMessage("user", question))  # stored when the turn arrives, whatever follows
        done = self.driver.ask(UserTurn(f"turn-{len(self.expected)}", question))
        self.servers.midstream_failures, self.servers.load_failures = 0, set()
        if isinstance(done, ReplyDone):
            assert done.status == "complete" and done.content == f"({done.model}) {answer}", done
            self.expected.append(ChatMessage("assistant", done.content))
            event("reply after a failure" if midstream or load_fails & set(self.fed_models) else "reply")
        else:
            assert isinstance(done, Failure), done
            assert done.reason in (Reason.NO_MODEL_AVAILABLE.value, Reason.INSUFFICIENT_VRAM.value), done
            event(f"turn failed: {done.reason}")

    @rule(grantable=st.sampled_from([None, 8 * GiB, 4 * GiB, 2 * GiB, GiB // 2]), gap_s=st.sampled_from([0, 5, 40, 100]))
    def resources_change(self, grantable: int | None, gap_s: float) -> None:
        self.clock.now += gap_s
        self.gate.grantable = grantable

    @rule(down=st.sets(st.sampled_from(["lmstudio", "ollama"])))
    def servers_come_and_go(self, down: set[str]) -> None:
        self.servers.down = set(down)

    @rule(pinned=st.sampled_from([None, "large", "medium", "small"]))
    def user_switches(self, pinned: str | None) -> None:
        answer = self.driver.ask(SwitchModel("pin", pinned))
        assert isinstance(answer, ModelPinned) and answer.model == pinned

    @rule()
    def the_mode_takes_the_vram(self) -> None:
        self.driver.deliver(ChatYield(GiB, "recording needs it"), COORDINATOR)
        self.driver.settle()
        assert self.driver.agent.current is None and not self.servers.loaded_models

    @rule(question=texts, answer=texts)
    def crash_mid_reply(self, question: str, answer: str) -> None:
        """The agent's process dies after the first chunk of a reply; a new one starts on the same store."""
        self.servers.answers[:] = [answer + " and more" * 3]
        self.expected.append(ChatMessage("user", question))
        self.driver.to_client.clear()
        self.driver.deliver(UserTurn("crashing", question), CLIENT)
        self.driver.settle(until=lambda: bool(self.driver.to_client))
        streaming = any(isinstance(m, ReplyChunk) for m in self.driver.to_client)
        self.driver.agent.store.close()
        self.driver.start()
        last = self.store.history(self.conversation)[-1]
        if streaming:
            event("crashed mid-reply")
            assert (last.role, last.status) == ("assistant", "interrupted")
        elif last.role == "assistant":
            assert last.status != "pending"

    @rule(question=texts, answer=st.lists(st.sampled_from(WORDS), min_size=120, max_size=200).map(" ".join))
    def process_killed_mid_reply(self, question: str, answer: str) -> None:
        """Once per run, the real agent in a forked process takes a turn and is SIGKILLed mid-reply."""
        if self.killed_child:
            return
        self.killed_child = True
        child = multiprocessing.get_context("fork").Process(target=_die_mid_reply, args=(self.driver, question, answer))
        child.start()
        child.join(timeout=60)
        # 3: no model could stream (servers down, nothing grantable), the turn failed before any reply began.
        assert child.exitcode in (-signal.SIGKILL, NO_REPLY_EXIT), child.exitcode
        self.expected.append(ChatMessage("user", question))  # appended before the turn began: durable
        self.driver.agent.store.close()
        self.driver.start()  # the supervisor's restart: the reply that was streaming is marked
        last = self.store.history(self.conversation)[-1]
        if child.exitcode == NO_REPLY_EXIT:
            assert (last.role, last.content) == ("user", question) or last.status == "failed", last
            return
        assert (last.role, last.status) == ("assistant", "interrupted"), last
        assert any(answer.startswith(last.content[len(f"({m}) "):]) for m in self.windows
                   if last.content.startswith(f"({m}) ")) or last.content == "", last.content
        event("process killed mid-reply")

    @rule(gap_s=st.sampled_from([1.0, 31.0, 61.0, 700.0]))
    def time_passes(self, gap_s: float) -> None:
        self.clock.now += gap_s
        self.driver.settle(max_s=0)

    # -- invariant 13 ----------------------------------------------------------------------------------------

    @invariant()
    def no_completed_turn_is_lost(self) -> None:
        if hasattr(self, "driver"):
            assert self.store.messages_for_model(self.conversation) == self.expected
            history = self.store.history(self.conversation)
            assert all(m.status != "pending" for m in history)
            assert not any(THINK_MARKER in m.content for m in history), "reasoning reached the store"


Conversation.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
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


@settings(max_examples=300, database=None, deadline=None,
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
        plan = fit_to_window(canonical, window, count, reserve_for_reply=window // 8,
                             message_overhead_tokens=OVERHEAD)
        check_fed(plan, canonical, window, count, window // 8)
