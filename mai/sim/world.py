"""A simulated world around the coordinator core: virtual time, a GPU ledger, and executors that answer steps.

The coordinator core (`mai.core.coordinator.Coordinator`) is pure: messages in, effects out. `SimWorld` plays
everything else, the way the actors and the outside world would, but in virtual time and in memory:

- `VramLedger`: the GPU's memory by owner ("vlm", "clip", "chat", "external"). Every allocation is kept as an interval
  (begin, end, bytes, what was in use just before), so invariants are checked on the record afterwards: capacity
  minus reserve never exceeded, VRAM really went down after an unload, and so on.
- `SimVlm` (Ollama behind the VLM loader), `SimClip` (the CLIP mover), and a sampler: they answer LoadVlm /
  UnloadVlm / MoveClip / WaitVramFree after configurable durations (`Timings`), may fail on request (Ollama
  unreachable, the next N loads fail, the GPU disappears), and change the ledger the way the real thing does —
  a VLM's bytes come back `vlm_release_lag_s` after its unload returns, as Ollama's runner exits after replying.
- `SimChat`: the conversation agent's side of the chat gate (`actors/conversation_agent.py`): a turn asks what the
  gate can grant (GetGrantable), chooses the best model of its catalog that fits, asks for it (ChatNeeds), and on
  the ChatGrant unloads its model and loads the new one (claiming its bytes as the load starts), answering
  ChatLoaded; a refusal makes it choose a smaller model with the bytes the refusal names. A ChatYield unloads its
  model (after the reply in progress, if one is streaming) and answers ChatUnloaded("yield", model).
- The sampler is the VramSampler actor's own pure core (`mai.core.sampler.SamplerCore`) reading the ledger: it
  samples `sample_interval_s` after every change (and, while a WaitVramFree is pending, when the core's poll
  schedule asks: 10 ms, then doubling up to 250 ms), delivers `ResourceChanged`
  when use moved by at least `change_threshold_bytes`, and answers waits by Ollama's recovery rule.
- `SimWorld` keeps one event queue ordered by (time, arrival), delivers messages to the core, executes its
  effects (SendStep → an executor, Reply/Publish/Log/PersistFootprint → records, WakeAt → a Tick later), and
  calls `observers` with every delivery and every effect *before* it takes effect, so a test can assert
  invariants at the exact instant something happens.

Nothing here sleeps: `advance(seconds)` runs the queue up to a virtual time. The trace benchmark (`bench/trace`) drives
this world to replay days of an ExecutionLoop and a chat user in seconds: the ledger keeps running totals (used, peak)
and records every allocation refused for lack of memory (`out_of_memory`), and `turn_observers` see when a chat turn
starts streaming and how it ends.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from mai.core.coordinator import (
    Coordinator,
    CoordinatorSettings,
    Log,
    PersistFootprint,
    Publish,
    ReadVram,
    ReobserveVlm,
    Reply,
    SendStep,
    Tell,
    Tick,
    WakeAt,
)
from mai.core.sampler import SamplerCore, fallback_reason
from messages.conversation import (
    ChatGrant,
    ChatLoaded,
    ChatNeeds,
    ChatUnloaded,
    ChatYield,
    GetGrantable,
    Grantable,
)
from messages.errors import Reason
from messages.events import ModelSwitched, ResourceChanged
from messages.failure import Failure
from messages.resources import GpuProcess, VramSnapshot
from messages.steps import (
    ClipMoved,
    ClipObserved,
    LoadVlm,
    MoveClip,
    PartHealth,
    StepFailed,
    UnloadVlm,
    VlmLoaded,
    VlmObserved,
    VlmUnloaded,
    VramReading,
    WaitVramFree,
)

MIB = 2**20
GIB = 2**30
# The VramSampler's words when NVML fails mid-run and CUDA fails too (mai/core/sampler.py, fallback_reason).
NVML_LOST = fallback_reason("GPU is lost", False, False, "CUDA unusable in the CLIP process")


# --- the GPU ledger ------------------------------------------------------------------------------------------------


@dataclass
class Allocation:
    owner: str  # "vlm" | "clip" | "chat" | "external"
    nbytes: int
    begin: float
    end: float | None = None  # None while held
    used_before: int = 0  # ledger use just before this allocation: capacity checks need no replay
    model: str = ""  # which model of the owner (the chat model's key): a reload is told from a switch

    def live_at(self, t: float) -> bool:
        return self.begin <= t and (self.end is None or t < self.end)


@dataclass(frozen=True)
class OutOfMemory:
    """An allocation refused because it did not fit what was free: what CUDA (or llama.cpp) does."""

    at: float
    owner: str
    nbytes: int
    free_bytes: int


class VramLedger:
    """One GPU's memory, allocation by allocation, with the full history kept (and the running totals, so a
    simulated day stays linear in its length): what is held, the peak, and every allocation refused for memory."""

    def __init__(self, total_bytes: int, *, gpu_present: bool = True, device_name: str = "sim-gpu",
                 host_total_bytes: int = 64 * GIB, per_process: bool = False) -> None:
        self.total_bytes = total_bytes
        self.per_process = per_process  # readings carry NVML-like per-process rows (PROCESSES: one per owner)
        self.gpu_present = gpu_present
        self.device_name = device_name
        self.host_total_bytes = host_total_bytes
        self.allocations: list[Allocation] = []
        self.out_of_memory: list[OutOfMemory] = []
        self.peak_bytes = 0
        self._live: list[Allocation] = []
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self._used

    def held(self, owner: str) -> int:
        return sum(a.nbytes for a in self._live if a.owner == owner)

    def allocate(self, owner: str, nbytes: int, at: float, model: str = "") -> Allocation:
        alloc = Allocation(owner, nbytes, at, used_before=self._used, model=model)
        self.allocations.append(alloc)
        self._live.append(alloc)
        self._used += nbytes
        self.peak_bytes = max(self.peak_bytes, self._used)
        return alloc

    def release(self, alloc: Allocation, at: float) -> None:
        if alloc.end is None:
            alloc.end = at
            self._live.remove(alloc)
            self._used -= alloc.nbytes

    def refuse(self, owner: str, nbytes: int, at: float) -> None:
        """Record an allocation that failed for lack of memory (the executor reports the error)."""
        self.out_of_memory.append(OutOfMemory(at, owner, nbytes, self.free_bytes))

    def used_at(self, t: float) -> int:
        return sum(a.nbytes for a in self.allocations if a.live_at(t))

    def snapshot(self, now: float) -> VramSnapshot:
        if not self.gpu_present:  # psutil stand-in: host RAM, nothing Mai places on a GPU
            used = self.host_total_bytes // 4
            return VramSnapshot(self.host_total_bytes, used, self.host_total_bytes - used, "psutil", "host", now, False)
        if not self.per_process:
            return VramSnapshot(self.total_bytes, self.used_bytes, self.free_bytes, "simulated", self.device_name, now)
        rows = tuple(GpuProcess(pid, name, self.held(owner), parent) for owner, (pid, name, parent) in PROCESSES.items()
                     if self.held(owner))
        return VramSnapshot(self.total_bytes, self.used_bytes, self.free_bytes, "simulated", self.device_name, now,
                            processes=rows, per_process=True)


CLIP_PID = 4242
PROCESSES = {  # owner -> (pid, name, parent's name) as NVML and psutil would show them (mai/sim/nvml.py)
    "vlm": (4300, "llama-server", "ollama"),
    "chat": (4400, "lm-studio", ""),
    "clip": (CLIP_PID, "python3", "python3"),
    "external": (4500, "firefox", "systemd"),
}


# --- executors -------------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    vlm_load_s: float = 4.0
    vlm_unload_s: float = 0.4
    vlm_release_lag_s: float = 0.3  # VRAM comes back this long after the unload call returned
    clip_move_s: float = 0.05
    chat_load_s: float = 2.0
    chat_unload_s: float = 0.2
    ack_s: float = 0.005  # an idempotent no-op step (already loaded, already there)
    fail_s: float = 0.05  # a step that fails at once (Ollama unreachable)
    sample_interval_s: float = 0.25  # sampler: reading after a change, and WaitVramFree polls
    read_s: float | None = 0.0  # a reading the coordinator asks for (ReadVram) arrives this late; None: never


@dataclass
class SimVlm:
    """Ollama as the VLM loader sees it: one model, loaded or not, on the GPU or (without one) on the CPU."""

    model: str
    true_bytes: int  # what a full load takes on the GPU (Ollama's size == size_vram when it fits)
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    size_vram_bytes: int = 0
    reachable: bool = True
    fail_loads: int = 0  # the next N loads fail with LOAD_FAILED
    alloc: Allocation | None = None
    history: list[tuple[float, str]] = field(default_factory=list)

    def set_state(self, state: str, now: float) -> None:
        self.state = state
        self.history.append((now, state))


@dataclass
class SimClip:
    model: str
    true_bytes: int
    placement: str = "cpu"  # cpu | gpu
    alloc: Allocation | None = None
    history: list[tuple[float, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ChatModelSpec:
    key: str
    footprint_bytes: int  # what the agent asks the gate for (declared, or learned)
    true_bytes: int  # what a load really takes on the GPU (at most the footprint: estimates are conservative)


DEFAULT_CHAT_MODELS = (
    ChatModelSpec("qwen3:8b", 5632 * MIB, 5400 * MIB),
    ChatModelSpec("qwen3:4b", 3072 * MIB, 2900 * MIB),
    ChatModelSpec("qwen3:1.7b", 1280 * MIB, 1200 * MIB),
)


@dataclass
class ChatTurn:
    """One user turn as the agent's state machine sees it (choose → grant → stream)."""

    turn_id: str
    want: int  # the best tier (catalog index) this turn may use
    reply_s: float  # how long the reply streams once a model is there
    deadline: float
    phase: str = "choose"  # choose | grant | stream
    request_id: str = ""  # the GetGrantable or ChatNeeds being answered
    model: ChatModelSpec | None = None
    refused: set[str] = field(default_factory=set)


@dataclass
class SimChat:
    """The conversation agent's model and the turn in progress; `outcomes` records how each turn ended."""

    models: tuple[ChatModelSpec, ...]
    current: ChatModelSpec | None = None
    alloc: Allocation | None = None
    turn: ChatTurn | None = None
    streaming_until: float = float("-inf")
    deferred_yield: Any = None  # the StepRecord of a yield that waits for the reply in progress
    unloading: Any = None  # the StepRecord of an asked-for unload (ChatNeeds unload=True)
    fail_loads: int = 0
    fail_oom: bool = False  # the failing loads run out of memory on Ollama, which evicts every model (O10)
    asked: dict[str, float] = field(default_factory=dict)  # request id -> when; removed when answered
    outcomes: list[tuple[float, str, str]] = field(default_factory=list)  # (time, turn id, how it ended)

    @property
    def held_bytes(self) -> int:
        return self.alloc.nbytes if self.alloc is not None and self.alloc.end is None else 0


@dataclass
class StepRecord:
    step_id: str
    target: str
    message: Any
    sent_at: float
    ended_at: float | None = None  # when its result reached the core
    result: Any = None

    @property
    def ok(self) -> bool | None:
        return None if self.result is None else not isinstance(self.result, StepFailed)


@dataclass
class ReplyRecord:
    at: float
    to: Any
    message: Any


@dataclass(frozen=True)
class Delivery:
    """What observers see when a message is about to reach the core."""

    message: Any
    sender: Any


Observer = Callable[["SimWorld", Any], None]  # called with a Delivery or an effect, before it takes effect
TurnObserver = Callable[["SimWorld", ChatTurn, str], None]  # a turn starts streaming ("stream") or ends (how)


class SimWorld:
    """The core plus a simulated GPU, Ollama, CLIP and sampler, in virtual time. See the module docstring."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        gpu_total_bytes: int = 12 * GIB,
        gpu_present: bool = True,
        external_bytes: int = 0,
        vlm_true_bytes: int | None = None,
        clip_true_bytes: int | None = None,
        vlm_loaded: bool = False,
        clip_device: str = "cpu",
        timings: Timings | None = None,
        learned_footprints: Mapping[str, int] | None = None,
        initial_mode: str | None = None,
        start_at: float = 1_000.0,
        change_threshold_bytes: int = 100 * MIB,
        observe_at_start: bool = True,
        observers: Iterable[Observer] = (),
        chat_models: Sequence[ChatModelSpec] = DEFAULT_CHAT_MODELS,
        per_process: bool = False,
    ) -> None:
        self.settings = settings
        self.now = start_at
        self.timings = timings or Timings()
        self.observers: list[Observer] = list(observers)
        self.turn_observers: list[TurnObserver] = []  # the agent's side of a turn, which no message shows
        self.ledger = VramLedger(gpu_total_bytes, gpu_present=gpu_present, per_process=per_process)
        self.gpu_healthy = True
        self.external: Allocation | None = None
        if external_bytes and gpu_present:
            self.external = self.ledger.allocate("external", external_bytes, start_at)
        self.vlm = SimVlm(settings.vlm_model, vlm_true_bytes or settings.vlm_declared_bytes)
        self.vlm.set_state("unloaded", start_at)
        if vlm_loaded:
            self._vlm_up(start_at)
        self.chat = SimChat(tuple(chat_models))
        self.clip = SimClip("ViT-B-32", clip_true_bytes or settings.clip_declared_bytes)
        self.clip.history.append((start_at, "cpu"))
        if clip_device == "gpu" and gpu_present and self.ledger.free_bytes >= self.clip.true_bytes:
            self.clip.alloc = self.ledger.allocate("clip", self.clip.true_bytes, start_at)
            self.clip.placement = "gpu"
            self.clip.history.append((start_at, "gpu"))
        self.core = Coordinator(settings, start_at, learned_footprints=learned_footprints, initial_mode=initial_mode)

        self.replies: list[ReplyRecord] = []
        self.events: list[tuple[float, Any]] = []
        self.logs: list[tuple[float, str, dict]] = []
        self.steps: list[StepRecord] = []
        self.persisted: dict[str, int] = {}
        self.told: list[tuple[float, str, Any]] = []  # facts the core sent an actor (Tell)
        self.ticks = 0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._chat_ids = itertools.count(1)
        self._ticks_at: set[float] = set()
        self._open_steps: dict[str, StepRecord] = {}
        self.sampler = SamplerCore(threshold_bytes=change_threshold_bytes)
        self.sampler.observe(self.ledger.snapshot(self.now), self.now)  # the baseline for "changed by"
        self._sample_pending = False
        self._poll_at: float | None = None  # the next reading pending waits asked for
        if observe_at_start:
            self.deliver(VramReading("watch", self.ledger.snapshot(self.now), None), "sampler")
            self.deliver(self._vlm_observation(), "vlm")
            self.deliver(ClipObserved(self._clip_device(), self.clip.true_bytes, True, self.clip.model, CLIP_PID),
                         "clip")

    # --- driving the world ------------------------------------------------------------------------------------------

    def send(self, message: Any, sender: Any = "client") -> None:
        """A client's message arrives now (after whatever is already queued for this instant)."""
        self.at(self.now, lambda: self.deliver(message, sender))
        self.run_until(self.now)

    def ask(self, message: Any, sender: Any = "client", within_s: float = 0.0) -> Any:
        """Send a request and run up to `within_s` seconds, or until it is answered; the answer or None."""
        self.send(message, sender)
        deadline = self.now + within_s
        while self.reply(message.request_id) is None and self._queue and self._queue[0][0] <= deadline:
            self._step_queue()
        if self.reply(message.request_id) is None:
            self.now = max(self.now, deadline)
        return self.reply(message.request_id)

    def advance(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, t: float) -> None:
        guard = 0
        while self._queue and self._queue[0][0] <= t:
            self._step_queue()
            guard += 1
            if guard > 200_000:
                raise RuntimeError(f"the simulation does not settle at t={self.now}: a loop between core and world?")
        self.now = max(self.now, t)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), action))

    def _step_queue(self) -> None:
        when, _, action = heapq.heappop(self._queue)
        self.now = max(self.now, when)
        action()

    def deliver(self, message: Any, sender: Any) -> None:
        """Hand a message to the core now and execute the effects it returns, in order."""
        for observe in self.observers:
            observe(self, Delivery(message, sender))
        if isinstance(message, Tick):
            self.ticks += 1
        for effect in self.core.handle(message, sender, self.now):
            for observe in self.observers:
                observe(self, effect)
            self._execute(effect)

    # --- the outside world changing -------------------------------------------------------------------------------

    def set_ollama_reachable(self, reachable: bool) -> None:
        """Ollama goes away (or comes back); the loader tells the coordinator, as the VLM loader actor does."""
        self.vlm.reachable = reachable
        reason = "" if reachable else "Ollama unreachable at http://127.0.0.1:11434 (simulated)"
        self.send(PartHealth("vlm", reachable, reason), "vlm")

    def set_gpu_healthy(self, healthy: bool) -> None:
        """NVML fails mid-run with CUDA unusable too (or recovers), as the VramSampler actor reports it: its health
        with its own words, then readings of host memory (psutil stands in: no GPU to plan on)."""
        self.gpu_healthy = healthy
        self.send(PartHealth("gpu", healthy, "" if healthy else NVML_LOST), "sampler")
        self.send(VramReading("health", self.reading(), None if healthy else NVML_LOST), "sampler")

    def reading(self) -> VramSnapshot:
        """What the sampler reads now: the ledger, or host memory while the GPU cannot be read."""
        if self.gpu_healthy or not self.ledger.gpu_present:
            return self.ledger.snapshot(self.now)
        host, used = self.ledger.host_total_bytes, self.ledger.host_total_bytes // 4
        return VramSnapshot(host, used, host - used, "psutil", "host memory (no GPU)", self.now, False)

    def set_external_bytes(self, nbytes: int) -> None:
        """Another program's VRAM use changes; the sampler reports it at once."""
        if not self.ledger.gpu_present:
            return
        if self.external is not None:
            self.ledger.release(self.external, self.now)
        self.external = self.ledger.allocate("external", nbytes, self.now) if nbytes else None
        self._sample()
        self.run_until(self.now)

    def evict_vlm(self, observe_after_s: float | None = 0.0) -> None:
        """Ollama drops the VLM on its own (another client's load, an OOM: real-servers.md O9-O11); the loader notices
        `observe_after_s` later (None: only when asked to re-observe)."""
        self._evict_vlm(observe_after_s)
        self.run_until(self.now)

    def _evict_vlm(self, observe_after_s: float | None) -> None:
        vlm = self.vlm
        if vlm.state != "loaded":
            return
        alloc, vlm.alloc, vlm.size_vram_bytes = vlm.alloc, None, 0
        vlm.set_state("unloaded", self.now)
        if alloc is not None:
            self._release(alloc)
        if observe_after_s is not None:
            self.at(self.now + observe_after_s, lambda: self.deliver(self._vlm_observation(), "vlm"))

    def crash_ollama(self, probe_after_s: float = 2.0, *, runner_survives: bool = False) -> None:
        """Ollama's server dies with the VLM loaded. Its runner dies too (its VRAM comes back and the sampler sees
        it at once) unless `runner_survives` (an orphaned runner keeps its bytes); the loader finds the server gone
        at its next probe, `probe_after_s` later, and reports only that (it cannot observe the VLM any more)."""
        vlm = self.vlm
        vlm.reachable = False
        if not runner_survives and vlm.alloc is not None:
            alloc, vlm.alloc, vlm.size_vram_bytes = vlm.alloc, None, 0
            vlm.set_state("unloaded", self.now)
            self._release(alloc)
        reason = "Ollama unreachable at http://127.0.0.1:11434: connection refused (simulated crash)"
        self.at(self.now + probe_after_s, lambda: self.deliver(PartHealth("vlm", False, reason), "vlm"))
        self.run_until(self.now)

    def fail_next_loads(self, count: int = 1) -> None:
        self.vlm.fail_loads += count

    # --- the conversation agent ---------------------------------------------------------------------------------------

    def chat_turn(self, want: int = 0, reply_s: float = 1.0, timeout_s: float = 60.0) -> bool:
        """A user message: the agent makes sure it has a model of tier `want` or below, then replies for `reply_s`.
        False when a turn is already in progress (the agent answers Busy)."""
        chat = self.chat
        if chat.turn is not None or chat.unloading is not None:
            return False
        turn = ChatTurn(f"turn-{next(self._chat_ids)}", want, reply_s, self.now + timeout_s)
        chat.turn = turn
        if chat.current is not None and chat.current.key == chat.models[want].key:
            self._chat_stream()
        else:
            turn.request_id = f"grantable-{next(self._chat_ids)}"
            self._chat_ask(GetGrantable(turn.request_id))
        self.run_until(self.now)
        return True

    def chat_unload(self) -> bool:
        """The agent gives its model back on its own (ChatNeeds unload=True). False when there is nothing to unload
        or a turn is in progress."""
        chat = self.chat
        if chat.current is None or chat.turn is not None or chat.unloading is not None:
            return False
        request_id = f"unload-{next(self._chat_ids)}"
        chat.unloading = request_id
        self._chat_ask(ChatNeeds(request_id, chat.current.key, 0, unload=True, timeout_s=60.0))
        self.run_until(self.now)
        return True

    def fail_next_chat_loads(self, count: int = 1, *, oom: bool = False) -> None:
        """`oom`: out of memory on Ollama, which answers by evicting every model it holds, the VLM included, and tells
        no one (real-servers.md O10): the loader sees it only when it looks again."""
        self.chat.fail_loads += count
        self.chat.fail_oom = oom

    def _chat_ask(self, message: Any) -> None:
        self.chat.asked[message.request_id] = self.now
        self.at(self.now, lambda: self.deliver(message, "chat"))

    def _chat_receive(self, message: Any) -> None:
        """A reply from the coordinator reaches the agent (after the effects of the same instant)."""
        chat, turn = self.chat, self.chat.turn
        request_id = getattr(message, "request_id", None)
        chat.asked.pop(request_id, None)
        if isinstance(message, ChatGrant):
            self._chat_granted(message)
        elif isinstance(message, Grantable) and turn is not None and request_id == turn.request_id:
            self._chat_choose(message.grantable_bytes)
        elif isinstance(message, Failure) and request_id == chat.unloading:
            chat.unloading = None
        elif isinstance(message, Failure) and turn is not None and request_id == turn.request_id:
            free = dict(message.details).get("free_bytes", "")
            if message.reason == Reason.INSUFFICIENT_VRAM and len(turn.refused) < len(chat.models):
                turn.refused.add(turn.model.key)
                self._chat_choose(int(free) if free.isdigit() else 0)
            else:
                self._chat_end(f"failed: {message.reason.value}")

    def _chat_choose(self, grantable: int | None) -> None:
        chat, turn = self.chat, self.chat.turn
        fitting = [m for m in chat.models[turn.want:] if m.key not in turn.refused
                   and (grantable is None or m.footprint_bytes <= grantable)]
        if not fitting:
            self._chat_end("no model fits")
            return
        choice = fitting[0]
        if chat.current is not None and choice.key == chat.current.key:
            self._chat_stream()
            return
        turn.phase, turn.model = "grant", choice
        turn.request_id = f"needs-{next(self._chat_ids)}"
        self._chat_ask(ChatNeeds(turn.request_id, choice.key, choice.footprint_bytes,
                                 timeout_s=max(1.0, turn.deadline - self.now)))

    def _chat_granted(self, grant: ChatGrant) -> None:
        """Unload the model held (its bytes come back at once), claim the new one's as the load starts."""
        chat, turn, t = self.chat, self.chat.turn, self.timings
        record = self._open_chat_step(grant.step_id, grant)
        step_id = grant.step_id
        if grant.request_id == chat.unloading:
            chat.unloading = None
            self._chat_release_after(t.chat_unload_s, record, lambda model: ChatUnloaded(step_id, model))
            return
        if turn is None or turn.phase != "grant" or grant.request_id != turn.request_id:
            self._fail_after(t.fail_s, record, Reason.CANCELLED, "the turn that asked for this grant is over")
            return
        previous, candidate = chat.current, turn.model
        if chat.alloc is not None:
            self.ledger.release(chat.alloc, self.now)
            chat.alloc = None
            self._vram_changed()
        chat.current = None
        if chat.fail_loads > 0:
            chat.fail_loads -= 1
            if chat.fail_oom:
                self._evict_vlm(observe_after_s=None)
                self._fail_after(t.chat_load_s / 2, record, Reason.INSUFFICIENT_VRAM,
                                 "llama-server reported out-of-memory during startup: cudaMalloc failed (simulated)")
            else:
                self._fail_after(t.chat_load_s / 2, record, Reason.LOAD_FAILED, "chat model failed to load (simulated)")
            self.at(self.now + t.chat_load_s / 2, lambda: self._chat_end("load failed", turn.turn_id))
            return
        vram = 0
        if self.gpu_usable:
            if self.ledger.free_bytes < candidate.true_bytes:
                self.ledger.refuse("chat", candidate.true_bytes, self.now)
                self._fail_after(t.fail_s, record, Reason.OUT_OF_MEMORY, "CUDA out of memory (simulated chat load)")
                self.at(self.now + t.fail_s, lambda: self._chat_end("out of memory", turn.turn_id))
                return
            chat.alloc = self.ledger.allocate("chat", candidate.true_bytes, self.now, candidate.key)
            vram = candidate.true_bytes
            self._vram_changed()
        load_s = (t.chat_unload_s if previous else 0.0) + t.chat_load_s

        def loaded() -> Any:
            chat.current = candidate
            return ChatLoaded(step_id, candidate.key, vram, load_s)

        def switched() -> None:
            reason = "chosen for the resources available" if previous is None else f"switched from {previous.key}"
            self.deliver(ModelSwitched(previous.key if previous else None, candidate.key, reason, at=self.now), "chat")
            self._chat_stream()

        self._finish_after(load_s, record, loaded)
        self.at(self.now + load_s, switched)

    def _chat_stream(self) -> None:
        chat, turn = self.chat, self.chat.turn
        if turn is None:
            return
        turn.phase = "stream"
        chat.streaming_until = self.now + turn.reply_s
        for observe in self.turn_observers:
            observe(self, turn, "stream")
        self.at(chat.streaming_until, lambda: self._chat_end("replied", turn.turn_id))

    def _chat_end(self, how: str, turn_id: str | None = None) -> None:
        chat = self.chat
        if chat.turn is None or (turn_id is not None and chat.turn.turn_id != turn_id):
            return
        chat.outcomes.append((self.now, chat.turn.turn_id, how))
        turn, chat.turn = chat.turn, None
        for observe in self.turn_observers:
            observe(self, turn, how)
        chat.streaming_until = min(chat.streaming_until, self.now)
        if chat.deferred_yield is not None:
            record, chat.deferred_yield = chat.deferred_yield, None
            self._chat_yield(record)

    def _chat_yield(self, record: StepRecord) -> None:
        """A ChatYield: unload now, or once the reply in progress is done. Like the real agent, nothing is answered
        when no model is held (the coordinator asks only for bytes it saw loaded)."""
        chat = self.chat
        if chat.current is None:
            return
        if chat.turn is not None and chat.turn.phase == "stream":
            chat.deferred_yield = record
            return
        self._chat_release_after(self.timings.chat_unload_s, record, lambda model: ChatUnloaded("yield", model))

    def _chat_release_after(self, delay: float, record: StepRecord, make: Callable[[str], Any]) -> None:
        chat = self.chat

        def unloaded() -> Any:
            model = chat.current.key if chat.current else "none"
            if chat.alloc is not None:
                self.ledger.release(chat.alloc, self.now)
                chat.alloc = None
                self._vram_changed()
            chat.current = None
            return make(model)

        self._finish_after(delay, record, unloaded)

    def _open_chat_step(self, step_id: str, message: Any) -> StepRecord:
        record = StepRecord(step_id, "chat", message, self.now)
        self.steps.append(record)
        self._open_steps[record.step_id] = record
        return record

    # --- records ------------------------------------------------------------------------------------------------------

    def reply(self, request_id: str) -> Any:
        for record in self.replies:
            if getattr(record.message, "request_id", None) == request_id:
                return record.message
        return None

    def replies_for(self, request_id: str) -> list[ReplyRecord]:
        return [r for r in self.replies if getattr(r.message, "request_id", None) == request_id]

    def events_of(self, kind: type) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def logs_of(self, name: str) -> list[dict]:
        return [fields for _, event, fields in self.logs if event == name]

    def sent(self, kind: type | None = None) -> list[Any]:
        """The step messages sent so far, in order (of one type, if given)."""
        return [s.message for s in self.steps if kind is None or isinstance(s.message, kind)]

    @property
    def step_open(self) -> StepRecord | None:
        return next(iter(self._open_steps.values()), None)

    @property
    def gpu_usable(self) -> bool:
        return self.ledger.gpu_present and self.gpu_healthy

    # --- effects ---------------------------------------------------------------------------------------------------------

    def _execute(self, effect: Any) -> None:
        if isinstance(effect, SendStep) and isinstance(effect.message, ChatYield):
            record = self._open_chat_step("yield", effect.message)
            self.at(self.now, lambda: self._chat_yield(record))
        elif isinstance(effect, SendStep):
            record = StepRecord(effect.message.step_id, effect.target, effect.message, self.now)
            self.steps.append(record)
            self._open_steps[record.step_id] = record
            self._begin(record)
        elif isinstance(effect, Reply):
            self.replies.append(ReplyRecord(self.now, effect.to, effect.message))
            if effect.to == "chat":
                self.at(self.now, lambda message=effect.message: self._chat_receive(message))
        elif isinstance(effect, Publish):
            self.events.append((self.now, effect.event))
        elif isinstance(effect, WakeAt):
            when = max(effect.at, self.now)
            if when not in self._ticks_at:
                self._ticks_at.add(when)
                self.at(when, lambda: (self._ticks_at.discard(when), self.deliver(Tick(), None)))
        elif isinstance(effect, Log):
            self.logs.append((self.now, effect.event, dict(effect.fields)))
        elif isinstance(effect, PersistFootprint):
            self.persisted[effect.key] = effect.nbytes
        elif isinstance(effect, Tell):
            self.told.append((self.now, effect.target, effect.message))
        elif isinstance(effect, ReobserveVlm):
            if self.vlm.reachable:  # the loader reads /api/ps and reports what it sees
                self.at(self.now, lambda: self.deliver(self._vlm_observation(), "vlm"))
        elif isinstance(effect, ReadVram) and self.timings.read_s is not None:
            degraded = None if self.gpu_healthy else NVML_LOST
            self.at(self.now + self.timings.read_s,
                    lambda: self.deliver(VramReading("read", self.reading(), degraded), "sampler"))
        elif isinstance(effect, ReadVram):
            pass  # the reading is lost (a sampler that died with it)
        else:
            raise TypeError(f"unknown effect {effect!r}")

    def _finish(self, record: StepRecord, result: Any) -> None:
        self._open_steps.pop(record.step_id, None)
        record.ended_at, record.result = self.now, result
        self.deliver(result, record.target)

    def _finish_after(self, delay: float, record: StepRecord, make: Callable[[], Any]) -> None:
        self.at(self.now + delay, lambda: self._finish(record, make()))

    def _fail_after(self, delay: float, record: StepRecord, reason: Reason, message: str) -> None:
        step_id = record.step_id
        self._finish_after(delay, record, lambda: StepFailed(step_id, Failure(step_id, reason, message)))

    def _begin(self, record: StepRecord) -> None:
        msg, t = record.message, self.timings
        if isinstance(msg, LoadVlm):
            self._begin_load(record, msg)
        elif isinstance(msg, UnloadVlm):
            self._begin_unload(record, msg)
        elif isinstance(msg, MoveClip):
            self._begin_move(record, msg)
        elif isinstance(msg, WaitVramFree):
            self.sampler.wait(msg, record, self.now)
            self.at(self.now, self._sample)
        else:
            self._fail_after(t.fail_s, record, Reason.INVALID_REQUEST, f"no executor takes {type(msg).__name__}")

    def _begin_load(self, record: StepRecord, msg: LoadVlm) -> None:
        vlm, t = self.vlm, self.timings
        if not vlm.reachable:
            self._fail_after(t.fail_s, record, Reason.BACKEND_UNREACHABLE, "Ollama unreachable (simulated)")
        elif vlm.state == "loaded":
            self._finish_after(t.ack_s, record, lambda: self._loaded_message(msg.step_id, 0.0))
        elif vlm.fail_loads > 0:
            vlm.fail_loads -= 1
            self._fail_after(t.vlm_load_s / 2, record, Reason.LOAD_FAILED, "model failed to load (simulated)")
        else:
            vlm.set_state("loading", self.now)
            if self.gpu_usable:  # Ollama claims its VRAM as it starts loading; what does not fit stays on the CPU
                vlm.size_vram_bytes = max(0, min(vlm.true_bytes, self.ledger.free_bytes))
                vlm.alloc = self.ledger.allocate("vlm", vlm.size_vram_bytes, self.now)
                self._vram_changed()
            else:
                vlm.size_vram_bytes = 0

            def done() -> Any:
                vlm.set_state("loaded", self.now)
                return self._loaded_message(msg.step_id, t.vlm_load_s)

            self._finish_after(t.vlm_load_s, record, done)

    def _begin_unload(self, record: StepRecord, msg: UnloadVlm) -> None:
        vlm, t = self.vlm, self.timings
        if not vlm.reachable:
            self._fail_after(t.fail_s, record, Reason.BACKEND_UNREACHABLE, "Ollama unreachable (simulated)")
        elif vlm.state == "unloaded":
            self._finish_after(t.ack_s, record, lambda: VlmUnloaded(msg.step_id, msg.model, 0.0))
        else:
            vlm.set_state("unloading", self.now)

            def done() -> Any:
                vlm.set_state("unloaded", self.now)
                alloc, vlm.alloc, vlm.size_vram_bytes = vlm.alloc, None, 0
                if alloc is not None:
                    self.at(self.now + t.vlm_release_lag_s, lambda: self._release(alloc))
                return VlmUnloaded(msg.step_id, msg.model, t.vlm_unload_s)

            self._finish_after(t.vlm_unload_s, record, done)

    def _begin_move(self, record: StepRecord, msg: MoveClip) -> None:
        clip, t = self.clip, self.timings
        if msg.device == clip.placement:
            self._finish_after(t.ack_s, record, lambda: ClipMoved(msg.step_id, self._clip_device(), clip.true_bytes, 0.0))
        elif msg.device == "gpu" and not self.gpu_usable:
            self._fail_after(t.fail_s, record, Reason.NO_GPU, "no CUDA device (simulated)")
        elif msg.device == "gpu" and self.ledger.free_bytes < clip.true_bytes:
            self.ledger.refuse("clip", clip.true_bytes, self.now)
            self._fail_after(t.fail_s, record, Reason.OUT_OF_MEMORY, "CUDA out of memory (simulated)")
        elif msg.device == "gpu":
            clip.alloc = self.ledger.allocate("clip", clip.true_bytes, self.now)
            self._vram_changed()

            def on_gpu() -> Any:
                clip.placement = "gpu"
                clip.history.append((self.now, "gpu"))
                return ClipMoved(msg.step_id, "sim-gpu", clip.true_bytes, t.clip_move_s)

            self._finish_after(t.clip_move_s, record, on_gpu)
        else:

            def on_cpu() -> Any:
                clip.placement = "cpu"
                clip.history.append((self.now, "cpu"))
                if clip.alloc is not None:
                    self._release(clip.alloc)  # torch frees on .to('cpu') + empty_cache()
                    clip.alloc = None
                return ClipMoved(msg.step_id, "cpu", clip.true_bytes, t.clip_move_s)

            self._finish_after(t.clip_move_s, record, on_cpu)

    # --- helpers ------------------------------------------------------------------------------------------------------

    def _vlm_up(self, at: float) -> None:
        self.vlm.set_state("loaded", at)
        if self.ledger.gpu_present:  # what does not fit stays on the CPU (Ollama's partial offload)
            self.vlm.size_vram_bytes = max(0, min(self.vlm.true_bytes, self.ledger.free_bytes))
            self.vlm.alloc = self.ledger.allocate("vlm", self.vlm.size_vram_bytes, at)

    def _vlm_observation(self) -> VlmObserved:
        vlm = self.vlm
        loaded = vlm.state == "loaded"
        return VlmObserved(vlm.model, loaded, vlm.true_bytes if loaded else 0, vlm.size_vram_bytes if loaded else 0)

    def _loaded_message(self, step_id: str, load_s: float) -> VlmLoaded:
        return VlmLoaded(step_id, self.vlm.model, self.vlm.true_bytes, self.vlm.size_vram_bytes, load_s)

    def _clip_device(self) -> str:
        return "sim-gpu" if self.clip.placement == "gpu" else "cpu"

    def _release(self, alloc: Allocation) -> None:
        self.ledger.release(alloc, self.now)
        self._vram_changed()

    def _vram_changed(self) -> None:
        """The sampler notices at its next reading (`sample_interval_s` later), like the VramSampler actor."""
        if not self._sample_pending:
            self._sample_pending = True
            self.at(self.now + self.timings.sample_interval_s, lambda: self._sample())

    def _sample(self, poll: bool = False) -> None:
        """One reading: maybe a ResourceChanged, maybe answers to waits; poll again while waits are pending, when
        the sampler's core asks (as the VramSampler actor does)."""
        if not poll:
            self._sample_pending = False
        event, answers = self.sampler.observe(self.reading(), self.now)
        if event is not None:
            event = ResourceChanged(event.snapshot, event.delta_used_bytes, at=self.now)  # virtual time, not wall
            self.at(self.now, lambda: self.deliver(event, "sampler"))
        for record, answer in answers:
            self.at(self.now, lambda record=record, answer=answer: self._finish(record, answer))
        due = self.sampler.next_poll()
        if due is not None and (self._poll_at is None or due < self._poll_at):
            self._poll_at = due
            self.at(max(due, self.now), self._poll)

    def _poll(self) -> None:
        self._poll_at = None
        self._sample(poll=True)
