"""ConversationAgent ("Mai"): owns the conversation, the chat model choice and the chat adapters.

A turn is a small state machine driven by messages, so the mailbox stays responsive between token batches:
persist the user's message → read what the turn needs (`estimate_needs`, each model's `window_fits`) and ask the
coordinator what VRAM it can grant, choose a model, wait for the gate's grant, load → stream in batches (a 1 ms
wakeup per batch, so a CancelReply can get in between) → persist the reply. A preload (`PreloadModel`) is the grant
and load without the turn. Decisions come from `ChatPolicy`, `turn_needs` and `fit_to_window`; this shell only
executes."""

from __future__ import annotations

import datetime
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from bootstrap.paths import under_state_dir
from mai.core.chat_policy import Availability, Candidate, ChatPolicy
from mai.core.context import ContextPlan, fit_to_window
from mai.core.turn_needs import TurnNeeds, WindowSpec, estimate_needs, window_fits, with_windows
from mai.core.footprints import FOOTPRINTS_FILE, footprint_key, parse_footprints
from messages.base import new_request_id
from messages.chat import ChatMessage, FragmentKind, ReplyFragment
from messages.conversation import (
    CancelReply,
    ChatGrant,
    ChatLoaded,
    ChatNeeds,
    ChatUnloaded,
    ChatYield,
    ConversationStarted,
    GetGrantable,
    GetHistory,
    Grantable,
    History,
    HistoryEntry,
    ListModels,
    ModelList,
    ModelPinned,
    ModelPreloaded,
    ModelRow,
    ModelSelection,
    NewConversation,
    PreloadModel,
    ReplyChunk,
    ReplyDone,
    SelectModel,
    SwitchModel,
    UserTurn,
)
from messages.errors import Busy, InvalidRequest, MaiError, NoModelAvailable, OperationTimeout, Reason
from messages.events import FootprintMeasured, ModelSwitched, ResourceChanged
from messages.failure import Failure
from messages.steps import PartHealth, Reobserve, StepFailed
from messages.system import Init

CHECKPOINT_EVERY_S = 0.5  # partial replies reach the store at least this often: a crash loses at most this much


@dataclass
class _Turn:
    request: UserTurn
    sender: Any
    started: float
    phase: str = "choose"  # choose | grant | stream
    step_id: str = ""
    model: Candidate | None = None
    stream: Iterator[ReplyFragment] | None = None
    message_id: int = 0
    content: str = ""
    thinking: str = ""  # the model's reasoning: relayed and returned, never stored or replayed
    seq: int = 0
    tokens: int = 0
    stream_started: float = 0.0
    last_checkpoint: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    switches: list[str] = field(default_factory=list)
    restarted: bool = False
    attempts: int = 0
    needs: TurnNeeds | None = None  # read once per turn, at its first choice

    @property
    def deadline(self) -> float:
        return self.started + self.request.timeout_s


@dataclass
class _Recheck:
    """Between turns, after a ResourceChanged: does the model we hold still have room? (asking, then switching)"""

    request_id: str
    step_id: str = ""  # the ChatNeeds for the smaller model, once chosen
    model: Candidate | None = None
    reason: str = ""


RECHECK_GRANT_TIMEOUT_S = 60.0  # a switch between turns waits at most this long for the gate


@dataclass
class _Preload:
    """A PreloadModel waiting for the gate's grant (the load itself runs in the grant's handler)."""

    request: PreloadModel
    sender: Any
    model: Candidate
    step_id: str


class ConversationAgent(MaiActor):
    role = "chat"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store: Any = None
        self.backends: Any = None
        self.policy: ChatPolicy | None = None
        self.conversation_id = ""
        self.current: Candidate | None = None
        self.pinned: str | None = None
        self.turn: _Turn | None = None
        self.availability = Availability(frozenset(), None)
        self.pending_yield: ChatYield | None = None
        self.recheck: _Recheck | None = None  # resources changed between turns: is there still room?
        self.recheck_after_turn = False  # they changed during a turn: check once the reply has ended
        self.measured: set[str] = set()  # chat models whose footprint was measured (at their context window)
        self.preload: _Preload | None = None
        self.preloaded: str | None = None  # the current model, when a preload (not a turn) loaded it
        self.selections: dict[str, tuple[SelectModel, Any]] = {}  # SelectModel asks waiting for a Grantable

    # --- start and reconcile --------------------------------------------------------------------------------------
    def on_init(self, init: Init) -> None:
        from backends.chat import ChatBackends
        from backends.history_store import HistoryStore

        cfg = init.config
        if self.store is None:
            self.store = HistoryStore(under_state_dir(cfg, cfg.chat.history_db))
            interrupted = self.store.mark_interrupted(time.time())
            self.conversation_id = self.store.current_conversation() or self.store.new_conversation(cfg.chat.system_prompt, time.time())
            self.log.info("chat.history", conversation=self.conversation_id, interrupted_replies=interrupted)
        specs = [cfg.model(key) for key in cfg.roles[cfg.chat.role]]
        measured = self._measured_footprints(cfg)
        chain = [Candidate.from_spec(spec, measured.get(footprint_key(spec.key, spec.context_window))) for spec in specs]
        self.measured = {c.key for c in chain if footprint_key(c.key, c.context_window) in measured}
        c = cfg.chat
        self.policy = ChatPolicy(chain, cooldown_s=c.cooldown_s, hysteresis_s=c.switch_hysteresis_s, max_retries=c.max_retries,
                                 retry_backoff_s=c.retry_backoff_s, min_tokens_per_s=c.min_tokens_per_s)
        self.backends = ChatBackends(cfg)
        self._refresh_availability()
        loaded = self.guarded("", None, self.backends.loaded) or {}
        adopted = next((cand for cand in chain if cand.key in loaded), None)
        if adopted is not None:  # reconcile: a model we loaded before a restart is still there
            self.current = adopted
            self._tell_coordinator(self._holding(adopted, "found loaded after a restart"))
            self.log.info("chat.adopted", model=adopted.key)

    @staticmethod
    def _measured_footprints(cfg: Any) -> dict[str, int]:
        """What the coordinator measured and persisted (`model@context` -> bytes); a damaged file costs only the
        measurements, which the next loads take again."""
        try:
            raw = json.loads(under_state_dir(cfg, FOOTPRINTS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return parse_footprints(raw)[0]

    def receiveMsg_FootprintMeasured(self, msg: FootprintMeasured, sender: Any) -> None:
        """The gate measured a model's VRAM across its load (at the context it was loaded with): choose by that."""
        if msg.part != "chat" or msg.nbytes <= 0:
            return
        for cand in self.policy.chain if self.policy is not None else ():
            if cand.key == msg.model and cand.context_window == msg.context_length:
                self.policy.learn_footprint(cand.key, msg.nbytes)
                self.measured.add(cand.key)
                if self.current is not None and self.current.key == cand.key:
                    self.current = self.policy.candidate(cand.key)
                self.log.info("chat.footprint_measured", model=cand.key, context_length=msg.context_length,
                              nbytes=msg.nbytes, reason="vram_delta")

    def receiveMsg_Reobserve(self, msg: Reobserve, sender: Any) -> None:
        """A restarted coordinator asks what we hold: it counts the chat model's VRAM and may ask it to yield.
        Answered to the asker: the supervisor's Peers naming it may reach us after its question (seen in CI)."""
        if self.current is not None:
            self.send(sender, self._holding(self.current, "reported to a restarted coordinator"))

    def on_peers(self, restarted: frozenset[str]) -> None:
        """The coordinator was restarted: tell it which model we hold (its Reobserve may have overtaken this news),
        and what it was deciding for the turn in progress died with it: ask again."""
        if "coordinator" not in restarted:
            return
        if self.current is not None:
            self._tell_coordinator(self._holding(self.current, "reported to a restarted coordinator"))
        if self.preload is not None:
            p = self.preload
            self._tell_coordinator(ChatNeeds(p.step_id, p.model.key, p.model.footprint_bytes,
                                             timeout_s=p.request.timeout_s, context_length=p.model.context_window))
        for request_id in self.selections:
            self._tell_coordinator(GetGrantable(request_id))
        turn = self.turn
        if turn is None:
            return
        self.log.info("chat.asked_again", phase=turn.phase, request_id=turn.request.request_id)
        if turn.phase == "choose":
            self._tell_coordinator(GetGrantable(turn.request.request_id))
        elif turn.phase == "grant":
            self._tell_coordinator(ChatNeeds(turn.step_id, turn.model.key, turn.model.footprint_bytes,
                                             timeout_s=max(1.0, turn.deadline - time.time()),
                                             context_length=turn.model.context_window))

    @staticmethod
    def _holding(model: Candidate, reason: str) -> ModelSwitched:
        """A model the coordinator did not grant (adopted, or news for a restarted coordinator), with the footprint
        the agent counts it as (measured or declared), so a yield is known to give those bytes back."""
        return ModelSwitched(None, model.key, reason, vram_bytes=model.footprint_bytes,
                             context_length=model.context_window)

    def _refresh_availability(self) -> None:
        self.availability = self.backends.availability()
        for backend, error in self.backends.last_errors.items():
            self.log.info("chat.backend_unavailable", backend=backend, reason=error)
        reason = self.backends.degraded_reason({c.backend for c in self.policy.chain})
        self._tell_coordinator(PartHealth("chat", not reason, reason))

    def _tell_coordinator(self, message: Any) -> None:
        if self.peers.get("coordinator") is not None:
            self.send(self.peers["coordinator"], message)

    # --- a turn -------------------------------------------------------------------------------------------------------
    def receiveMsg_UserTurn(self, msg: UserTurn, sender: Any) -> None:
        if self.turn is not None:
            self.send(sender, Failure.from_error(msg.request_id, Busy("a reply is still streaming; cancel it (Ctrl-C) or wait")))
            return
        self.store.append(self.conversation_id, ChatMessage("user", msg.text), model=None, now=time.time())
        self.recheck = None  # the turn chooses on a fresh figure itself (a late grant for the check is refused)
        if self.preload is not None:  # the turn chooses its own model; a late grant for the preload is refused
            self._end_preload(Failure(self.preload.request.request_id, Reason.CANCELLED,
                                      "a turn began before the preload was granted; the turn chooses its model"))
        self.turn = _Turn(msg, sender, time.time())
        self.wakeupAfter(datetime.timedelta(seconds=msg.timeout_s), payload=("deadline", msg.request_id))
        self._choose()

    def _choose(self) -> None:
        """Every turn asks the gate what it could grant, so the policy can also move *up* when VRAM was freed
        (its hysteresis keeps the current model unless a better one fitted for a while)."""
        turn = self.turn
        assert turn is not None
        turn.phase = "choose"
        if self.current is None or turn.switches:
            self._refresh_availability()
        self._tell_coordinator(GetGrantable(turn.request.request_id))

    def receiveMsg_Grantable(self, msg: Grantable, sender: Any) -> None:
        if self.recheck is not None and msg.request_id == self.recheck.request_id:
            self._recheck_with(msg.grantable_bytes, msg.room_bytes)
            return
        if msg.request_id in self.selections:
            self._answer_selection(*self.selections.pop(msg.request_id), msg.grantable_bytes)
            return
        turn = self.turn
        if turn is None or turn.phase != "choose" or msg.request_id != turn.request.request_id:
            return
        self._choose_with(msg.grantable_bytes)

    def _choose_with(self, grantable: int | None) -> None:
        turn = self.turn
        assert turn is not None
        if turn.needs is None:
            turn.needs = self._needs(turn.request.text, self.store.messages_for_model(self.conversation_id))
        current = self.current.key if self.current else None
        choice = self.policy.choose(grantable, self.availability, time.time(), current=current, pinned=self.pinned,
                                    needs=turn.needs)
        self.log.info("chat.choose", model=choice.key or "", previous=current or "", reason=choice.reason,
                      turn=turn.needs.describe(), load=choice.key is not None and choice.key != current,
                      grantable=grantable, rejected=dict(choice.rejected))
        if choice.key is None:
            why = "; ".join(f"{key}: {reason}" for key, reason in choice.rejected)
            self._fail_turn(NoModelAvailable(f"no chat model can run now: {choice.reason}" + (f" ({why})" if why else "")))
            return
        candidate = self.policy.candidate(choice.key)
        if self.current is not None and candidate.key == self.current.key:
            turn.model = candidate
            self._start_stream()
            return
        turn.phase, turn.model, turn.step_id = "grant", candidate, new_request_id()
        self._tell_coordinator(ChatNeeds(turn.step_id, candidate.key, candidate.footprint_bytes,
                                         timeout_s=max(1.0, turn.deadline - time.time()),
                                         context_length=candidate.context_window))

    def receiveMsg_Failure(self, msg: Failure, sender: Any) -> None:
        if self.preload is not None and msg.request_id == self.preload.step_id:
            self.log.info("chat.preload_refused", model=self.preload.model.key, reason=msg.reason.value,
                          error=msg.message)
            self._end_preload(Failure(self.preload.request.request_id, msg.reason, msg.message, msg.details))
            return
        if self.recheck is not None and msg.request_id == self.recheck.step_id:
            self.recheck = None  # the gate refused the smaller model too: the next turn chooses again
            self.log.info("chat.switch_refused", model=msg.request_id, reason=msg.message)
            return
        turn = self.turn
        if turn is None or turn.phase != "grant" or msg.request_id != turn.step_id:
            return
        if msg.reason is Reason.INSUFFICIENT_VRAM and turn.attempts < len(self.policy.chain):
            turn.attempts += 1
            self.policy.record_failure(turn.model.key, Reason.INSUFFICIENT_VRAM.value, time.time())
            free = dict(msg.details).get("free_bytes")
            self._choose_with(int(free) if free and free.isdigit() else 0)
            return
        self._fail_turn(msg.to_error())

    def receiveMsg_ChatGrant(self, msg: ChatGrant, sender: Any) -> None:
        recheck = self.recheck
        if recheck is not None and recheck.model is not None and msg.request_id == recheck.step_id:
            self.recheck = None
            previous = self.current
            if self._load_granted(msg, sender, recheck.model) is None:
                self._switched(previous, recheck.model, recheck.reason)
            return
        preload = self.preload
        if preload is not None and msg.request_id == preload.step_id:
            previous, began = self.current, time.monotonic()
            err = self._load_granted(msg, sender, preload.model)
            if err is not None:
                self._end_preload(Failure.from_error(preload.request.request_id, err))
                return
            self._switched(previous, preload.model, "preloaded on request")
            self.preloaded = preload.model.key
            self._end_preload(ModelPreloaded(preload.request.request_id, preload.model.key,
                                             previous.key if previous else None, time.monotonic() - began))
            return
        turn = self.turn
        if turn is None or turn.phase != "grant" or msg.request_id != turn.step_id:
            self.send(sender, StepFailed(msg.step_id, Failure(msg.step_id, Reason.CANCELLED, "the turn that asked for this grant is over")))
            return
        previous, candidate = self.current, turn.model
        if self._load_granted(msg, sender, candidate) is not None:
            return
        self._switched(previous, candidate, "chosen for the resources available" if previous is None else f"switched from {previous.key}")
        self._start_stream()

    def _load_granted(self, msg: ChatGrant, sender: Any, candidate: Candidate) -> MaiError | None:
        """The gate's grant: unload the model we hold (if another), load `candidate`, answer the step. None when
        it loaded, else the error (the step is answered failed and the policy told)."""
        previous = self.current
        began = time.monotonic()
        try:
            if previous is not None and previous.key != candidate.key:
                self.backends.unload(previous)
                self.current = None
            vram = self.backends.load(candidate)
        except MaiError as err:
            self.send(sender, StepFailed(msg.step_id, Failure.from_error(msg.step_id, err)))
            self._model_failed(candidate, err)
            return err
        # What the backend reports is no footprint (LM Studio: the file's size; Ollama: no CUDA context): the gate
        # counts at least the footprint it granted, and measures the real one from the VRAM readings around the load.
        load_s = time.monotonic() - began
        self.policy.record_load(candidate.key, load_s)
        self.send(sender, ChatLoaded(msg.step_id, candidate.key, max(vram, candidate.footprint_bytes), load_s))
        return None

    def _switched(self, previous: Candidate | None, candidate: Candidate, reason: str) -> None:
        self.current = candidate
        if self.preloaded != candidate.key:
            self.preloaded = None
        if previous is not None and previous.key != candidate.key and self.turn is not None:
            self.turn.switches.append(f"{previous.key} → {candidate.key}: {reason}")
        self.log.info("chat.model", model=candidate.key, previous=previous.key if previous else "", reason=reason)
        self._tell_coordinator(ModelSwitched(previous.key if previous else None, candidate.key, reason))

    def _model_failed(self, candidate: Candidate, err: MaiError) -> None:
        turn = self.turn
        verdict = self.policy.record_failure(candidate.key, err.reason.value, time.time())
        self.log.warning("chat.model_failed", model=candidate.key, reason=err.reason.value, error=str(err),
                         retry_same=verdict.retry_same, delay_s=verdict.delay_s)
        if turn is None:
            return
        if verdict.retry_same:
            turn.phase = "retry"
            self.wakeupAfter(datetime.timedelta(seconds=verdict.delay_s), payload=("retry", turn.request.request_id))
        else:
            if self.current is not None and self.current.key == candidate.key:
                self._drop_current(f"failed: {err.reason.value}")  # the next choice skips it while it cools down
            turn.switches.append(f"{candidate.key} failed ({err.reason.value}); choosing another")
            self._choose()

    # --- streaming ------------------------------------------------------------------------------------------------------
    def _start_stream(self) -> None:
        turn = self.turn
        assert turn is not None and turn.model is not None
        candidate = turn.model
        plan = self._fit(candidate, self.store.messages_for_model(self.conversation_id))
        if plan.dropped or plan.compressed:
            self.log.info("chat.context_trimmed", model=candidate.key, dropped=plan.dropped, tokens=plan.tokens)
        if turn.message_id == 0:
            turn.message_id = self.store.begin_reply(self.conversation_id, candidate.key, time.time())
        if turn.seq > 0:  # a restart after a failure mid-reply: the new model answers from the start
            turn.restarted = True
            self.send(turn.sender, ReplyChunk(turn.request.request_id, turn.seq, "", restart=True))
            turn.seq += 1
            turn.content = turn.thinking = ""
        turn.phase = "stream"
        turn.stream = iter(self.backends.stream(candidate, plan.messages, turn.cancel))
        turn.stream_started = turn.last_checkpoint = time.monotonic()
        turn.tokens = 0
        self._pump_later(turn.request.request_id)

    def _fit(self, candidate: Candidate, messages: list[ChatMessage]) -> ContextPlan:
        """What `candidate` is fed of `messages`; `_window` describes the same call to `window_fits`."""
        return fit_to_window(messages, candidate.context_window, self.backends.token_counter(candidate),
                             reserve_for_reply=self._reserve(candidate),
                             compress_at_fraction=self.config.chat.compress_at_fraction)

    def _reserve(self, candidate: Candidate) -> int:
        return min(self.config.chat.max_tokens, candidate.context_window // 4)

    def _needs(self, text: str, messages: list[ChatMessage]) -> TurnNeeds:
        """The turn's needs (`text` counted as the model in use counts, the chain's first when none is) and how each
        model's window takes `messages` (the conversation with the turn's message last)."""
        counted_by = self.current or self.policy.chain[0]
        needs = estimate_needs(text, self.config.turns, self.backends.token_counter(counted_by))
        specs = [WindowSpec(c.key, c.context_window, self.backends.token_counter(c), self._reserve(c))
                 for c in self.policy.chain]
        return with_windows(needs, window_fits(messages, specs,
                                               compress_at_fraction=self.config.chat.compress_at_fraction))

    def _pump_later(self, turn_id: str) -> None:
        # Not self.send: Thespian's TCP transport delivers a message to oneself before reading any socket, so
        # a self-sent pump would starve the mailbox and a CancelReply would wait for the whole reply.
        self.wakeupAfter(datetime.timedelta(milliseconds=1), payload=("pump", turn_id))

    def _pump(self, turn_id: str) -> None:
        turn = self.turn
        if turn is None or turn.phase != "stream" or turn_id != turn.request.request_id:
            return
        if turn.cancel.is_set():
            self._finish(status="cancelled")
            return
        batch_until = time.monotonic() + self.config.chat.token_batch_ms / 1000
        parts: list[ReplyFragment] = []
        try:
            while time.monotonic() < batch_until:
                parts.append(next(turn.stream))
                turn.tokens += 1
        except StopIteration:
            self._flush(parts)
            self._finish(status="complete")
            return
        except MaiError as err:
            self._flush(parts)
            turn.stream = None
            self._model_failed(turn.model, err)
            return
        self._flush(parts)
        self._pump_later(turn_id)  # next batch, after anything already waiting in the mailbox (a cancel)

    def _flush(self, parts: list[ReplyFragment]) -> None:
        """One ReplyChunk per run of one kind, in order. Only CONTENT becomes the reply and reaches the store:
        reasoning fed back to a model would be read as something it said (and fills its window)."""
        turn = self.turn
        runs: list[tuple[FragmentKind, str]] = []
        for part in parts:
            if runs and runs[-1][0] is part.kind:
                runs[-1] = (part.kind, runs[-1][1] + part.text)
            else:
                runs.append((part.kind, part.text))
        for kind, text in runs:
            if not text:
                continue
            if kind is FragmentKind.REASONING:
                turn.thinking += text
            else:
                turn.content += text
            self.send(turn.sender, ReplyChunk(turn.request.request_id, turn.seq, text, kind=kind))
            turn.seq += 1
        if runs and time.monotonic() - turn.last_checkpoint >= CHECKPOINT_EVERY_S:
            self.store.update_reply(turn.message_id, turn.content, status="pending")
            turn.last_checkpoint = time.monotonic()

    def _finish(self, status: str) -> None:
        turn = self.turn
        self.turn = None
        if turn.stream is not None and hasattr(turn.stream, "close"):
            turn.stream.close()
        elapsed = max(1e-6, time.monotonic() - turn.stream_started)
        speed = turn.tokens / elapsed if status == "complete" else None
        stored = "complete" if status == "complete" else "interrupted"
        self.store.update_reply(turn.message_id, turn.content, status=stored, model=turn.model.key)
        if status == "complete":
            self.policy.record_success(turn.model.key, time.time(), speed)
        self.log.info("chat.reply", model=turn.model.key, status=status, chars=len(turn.content),
                      thinking_chars=len(turn.thinking), tokens_per_s=round(speed, 1) if speed else None,
                      switches=len(turn.switches))
        self.send(turn.sender, ReplyDone(turn.request.request_id, turn.model.key, turn.content, status, speed,
                                         tuple(turn.switches), thinking=turn.thinking))
        self._after_turn()

    def _fail_turn(self, err: MaiError) -> None:
        turn = self.turn
        self.turn = None
        if turn is None:
            return
        turn.cancel.set()
        if turn.message_id:
            self.store.update_reply(turn.message_id, turn.content, status="failed")
        self.log.error("chat.turn_failed", reason=err.reason.value, error=str(err))
        self.send(turn.sender, Failure.from_error(turn.request.request_id, err))
        self._after_turn()

    def _after_turn(self) -> None:
        if self.pending_yield is not None:
            msg, self.pending_yield = self.pending_yield, None
            self.receiveMsg_ChatYield(msg, None)
        if self.recheck_after_turn:
            self.recheck_after_turn = False
            self._recheck()

    def receiveMsg_CancelReply(self, msg: CancelReply, sender: Any) -> None:
        if self.turn is not None and self.turn.request.request_id == msg.request_id:
            self.turn.cancel.set()
            if self.turn.phase != "stream":
                self._fail_turn(MaiError("cancelled before the reply started", reason=Reason.CANCELLED))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        kind, turn_id = msg.payload
        if kind == "pump":
            self._pump(turn_id)
            return
        if kind == "preload_deadline":
            if self.preload is not None and self.preload.request.request_id == turn_id:
                self._end_preload(Failure.from_error(turn_id, OperationTimeout(
                    f"the gate did not grant {self.preload.model.key} within {self.preload.request.timeout_s:.0f} s")))
            return
        turn = self.turn
        if turn is None or turn.request.request_id != turn_id:
            return
        if kind == "deadline":
            self._fail_turn(OperationTimeout(f"no complete reply within {turn.request.timeout_s:.0f} s"))
        elif kind == "retry" and turn.phase == "retry":
            if self.current is not None and turn.model.key == self.current.key:
                self._start_stream()
            else:
                self._choose()

    # --- resources ------------------------------------------------------------------------------------------------------
    def receiveMsg_ResourceChanged(self, msg: ResourceChanged, sender: Any) -> None:
        """VRAM use moved (another program took some, or Mai's parts moved): check that the model we hold still has
        room, between turns — a reply in progress is never cut for it; the check runs once it has ended."""
        if self.current is None:
            return
        if self.turn is not None:
            self.recheck_after_turn = True
            return
        self._recheck()

    def _recheck(self) -> None:
        if self.current is None or self.recheck is not None or self.turn is not None:
            return
        self.recheck = _Recheck(new_request_id())
        self._tell_coordinator(GetGrantable(self.recheck.request_id))

    def _recheck_with(self, grantable: int | None, room: int | None) -> None:
        """Resources running short switch *down* at once (the policy's rule); a better model waits for a turn and
        the policy's hysteresis. Silent: one log line, with the reason, when the model changes. Short means the GPU
        itself has no room left for the model (`room`): a grantable figure that is low only because Mai's own plan
        claims the bytes for a while (a mode switch in progress) is not a reason to load another model — the mode
        asks the model to yield when it needs the bytes, and the next turn chooses again."""
        recheck, current = self.recheck, self.current
        assert recheck is not None
        if current is None or grantable is None or room is None or current.footprint_bytes <= room:
            self.recheck = None
            return
        choice = self.policy.choose(grantable, self.availability, time.time(), current=current.key, pinned=self.pinned)
        if choice.key == current.key:
            self.recheck = None
            return
        if choice.key is None:
            self.recheck = None
            self._drop_current(f"resources short, no chat model has room: {choice.reason}")
            return
        recheck.model, recheck.step_id = self.policy.candidate(choice.key), new_request_id()
        recheck.reason = f"resources short between turns: {choice.reason}"
        self._tell_coordinator(ChatNeeds(recheck.step_id, recheck.model.key, recheck.model.footprint_bytes,
                                         timeout_s=RECHECK_GRANT_TIMEOUT_S, context_length=recheck.model.context_window))

    def receiveMsg_ChatYield(self, msg: ChatYield, sender: Any) -> None:
        """The mode needs VRAM our chat model holds: unload it now, or right after the reply that is streaming.
        Always answered, even with nothing loaded, so the coordinator never waits on us for nothing."""
        if self.turn is not None and self.turn.phase == "stream":
            self.pending_yield = msg
            return
        if self.current is not None:
            self._drop_current(f"yield: {msg.reason}")  # its ChatUnloaded ends the coordinator's yield step
        else:
            self._tell_coordinator(ChatUnloaded("yield", ""))

    def _drop_current(self, reason: str) -> None:
        """Unload the current chat model (best effort) and say so: the coordinator counts what chat holds."""
        previous, self.current, self.preloaded = self.current, None, None
        try:
            self.backends.unload(previous)
        except MaiError as err:
            self.log.warning("chat.unload_failed", model=previous.key, error=str(err))
        self.log.info("chat.unloaded", model=previous.key, reason=reason)
        self._tell_coordinator(ChatUnloaded("dropped", previous.key))

    # --- queries -----------------------------------------------------------------------------------------------------------
    def receiveMsg_GetHistory(self, msg: GetHistory, sender: Any) -> None:
        def answer() -> None:
            rows = self.store.history(self.conversation_id)
            if msg.limit:
                rows = rows[-msg.limit:]
            entries = tuple(HistoryEntry(r.role, r.content, r.model, r.status, r.created_at) for r in rows)
            self.send(sender, History(msg.request_id, self.conversation_id, entries))

        self.guarded(msg.request_id, sender, answer)

    def receiveMsg_NewConversation(self, msg: NewConversation, sender: Any) -> None:
        def start() -> None:
            self.conversation_id = self.store.new_conversation(self.config.chat.system_prompt, time.time())
            self.send(sender, ConversationStarted(msg.request_id, self.conversation_id))

        self.guarded(msg.request_id, sender, start)

    def receiveMsg_ListModels(self, msg: ListModels, sender: Any) -> None:
        def answer() -> None:
            self._refresh_availability()
            loaded = self.backends.loaded()
            choice = self.policy.choose(None, self.availability, time.time(),
                                        current=self.current.key if self.current else None, pinned=self.pinned)
            why = dict(choice.rejected)
            rows = []
            for cand in self.policy.chain:
                available = cand.backend in self.availability.reachable_backends and (
                    self.availability.installed is None or cand.key in self.availability.installed)
                rows.append(ModelRow(cand.key, cand.backend, cand.tier, cand.context_window, cand.footprint_bytes,
                                     cand.key in self.measured, available, cand.key in loaded,
                                     self.current is not None and self.current.key == cand.key, self.pinned == cand.key,
                                     "" if cand.key == choice.key else why.get(cand.key, ""),
                                     preloaded=self.preloaded == cand.key and cand.key in loaded))
            self.send(sender, ModelList(msg.request_id, tuple(rows), self.current.key if self.current else None, self.pinned))

        self.guarded(msg.request_id, sender, answer)

    def receiveMsg_SwitchModel(self, msg: SwitchModel, sender: Any) -> None:
        if msg.model is not None and msg.model not in {c.key for c in self.policy.chain}:
            known = ", ".join(c.key for c in self.policy.chain)
            self.send(sender, Failure.from_error(msg.request_id, InvalidRequest(f"unknown chat model {msg.model!r}; known: {known}")))
            return
        self.pinned = msg.model
        self.log.info("chat.pinned", model=msg.model or "", reason="manual switch" if msg.model else "pin cleared")
        self.send(sender, ModelPinned(msg.request_id, msg.model, self.current.key if self.current else None))

    # --- preload and selection ---------------------------------------------------------------------------------------
    def receiveMsg_PreloadModel(self, msg: PreloadModel, sender: Any) -> None:
        """Load a model now, through the gate as a turn would (ChatNeeds), so the next turn finds it ready. Once
        loaded it is the current model: it yields like any idle chat model, and a simple turn stays on it."""
        known = {c.key for c in self.policy.chain}
        if msg.model not in known:
            self.send(sender, Failure.from_error(msg.request_id, InvalidRequest(
                f"unknown chat model {msg.model!r}; known: {', '.join(c.key for c in self.policy.chain)}")))
            return
        if self.turn is not None or self.preload is not None:
            busy = "a reply is in progress" if self.turn is not None else f"{self.preload.model.key} is being preloaded"
            self.send(sender, Failure.from_error(msg.request_id, Busy(f"{busy}; preload after it")))
            return
        candidate = self.policy.candidate(msg.model)
        if self.current is not None and self.current.key == candidate.key:
            self.preloaded = self.preloaded or candidate.key
            self.log.info("chat.preload", model=candidate.key, reason="already loaded")
            self.send(sender, ModelPreloaded(msg.request_id, candidate.key, candidate.key, 0.0, already_loaded=True))
            return
        self.recheck = None  # a check between turns would ask the gate for another model at the same time
        self.preload = _Preload(msg, sender, candidate, new_request_id())
        self.log.info("chat.preload", model=candidate.key, previous=self.current.key if self.current else "",
                      needed_bytes=candidate.footprint_bytes, reason="requested")
        self.wakeupAfter(datetime.timedelta(seconds=msg.timeout_s), payload=("preload_deadline", msg.request_id))
        self._tell_coordinator(ChatNeeds(self.preload.step_id, candidate.key, candidate.footprint_bytes,
                                         timeout_s=msg.timeout_s, context_length=candidate.context_window))

    def _end_preload(self, answer: Any) -> None:
        preload, self.preload = self.preload, None
        if preload is not None:
            self.send(preload.sender, answer)

    def receiveMsg_SelectModel(self, msg: SelectModel, sender: Any) -> None:
        """Which model would answer `msg.text` now, and why: the turn's choice on a fresh grantable figure, made
        as a dry run (nothing is loaded, no hysteresis clock moves)."""
        self.selections[msg.request_id] = (msg, sender)
        self._tell_coordinator(GetGrantable(msg.request_id))

    def _answer_selection(self, msg: SelectModel, sender: Any, grantable: int | None) -> None:
        def answer() -> None:
            messages = self.store.messages_for_model(self.conversation_id) + [ChatMessage("user", msg.text)]
            needs = self._needs(msg.text, messages)
            current = self.current.key if self.current else None
            choice = self.policy.choose(grantable, self.availability, time.time(), current=current,
                                        pinned=self.pinned, needs=needs, dry_run=True)
            self.log.info("chat.select", model=choice.key or "", reason=choice.reason, turn=needs.describe())
            self.send(sender, ModelSelection(msg.request_id, choice.key, choice.reason,
                                             tuple(kind.value for kind in needs.kinds), needs.message_tokens,
                                             choice.key is not None and choice.key != current, choice.rejected))

        self.guarded(msg.request_id, sender, answer)
