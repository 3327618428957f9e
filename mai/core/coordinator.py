"""The ModeCoordinator's core: the mode, the GPU gate and the plan in progress, as a pure state machine.

`Coordinator.handle(message, sender, now) -> effects` is the whole interface: the actor shell passes every message
in with the wall-clock time (`time.time()`, the clock `VramSnapshot.taken_at` uses) and executes the effects that
come back (send a step, reply, publish, wake me at, log, persist a learned footprint). The core never sleeps,
never does I/O and never reads the clock, so tests and the trace simulator drive it with a virtual clock.

Every call ends in `_settle`, a level-triggered reconcile: expire leases and waiters, answer what is satisfied,
recompute the plan (`mai.core.plan`) from scratch, send its first step if nothing is in flight (one at a time,
invariant 5), then — only when the mode has nothing left to send — grant the conversation agent's chat model load
or unload (`mai.core.chat_gate`), declare the mode reached when nothing is left, and ask to be woken at the next
deadline. A chat step is a step like the others: one in flight at a time, bounded by the step timeout, and the
mode's own steps go first; when a step of the mode needs the bytes the chat model holds, the plan asks it to yield.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Union

from mai.core.chat_gate import CHAT_LOAD, CHAT_UNLOAD, chat_refusal, grantable_bytes, room_bytes
from mai.core.attribution import Owner, split_use
from mai.core.footprints import footprint_key, judge_delta, parse_footprints
from mai.core.retry import Backoff
from mai.core.plan import (
    ALLOCATING_KINDS,
    CONFIRM_FREE,
    LOAD_VLM,
    MOVE_CLIP_CPU,
    MOVE_CLIP_GPU,
    READ_VRAM,
    UNLOAD_VLM,
    YIELD_CHAT,
    Demand,
    ModePolicy,
    Plan,
    PlannedStep,
    Refusal,
    World,
    plan_steps,
)
from messages.conversation import (
    ChatGrant,
    ChatLoaded,
    ChatNeeds,
    ChatUnloaded,
    ChatYield,
    GetGrantable,
    Grantable,
)
from messages.errors import InsufficientVram, MaiError, Reason
from messages.events import (
    Degraded,
    FootprintMeasured,
    IdleUnloaded,
    ModeChanged,
    ModelSwitched,
    PlacementChanged,
    PlanRefused,
    Recovered,
    ResourceChanged,
)
from messages.failure import Failure
from messages.requests import (
    AcquireLease,
    ClipPlaced,
    EnsureVlm,
    GetStatus,
    LeaseGranted,
    LeaseReleased,
    ModeAccepted,
    ModeReached,
    PlaceClip,
    ReleaseLease,
    SetMode,
    VlmReady,
)
from messages.resources import SOURCE_TEXT, VramSnapshot
from messages.status import ClipStatus, GpuUseStatus, Status, VlmStatus
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
    VramRecovered,
    WaitVramFree,
)

__all__ = [
    "Coordinator", "CoordinatorSettings", "ModePolicy", "Effect",
    "SendStep", "Reply", "Publish", "WakeAt", "Log", "PersistFootprint", "ReadVram", "ReobserveVlm", "Tell", "Tick",
]

MIB = 2**20
DEFAULT_CLIP_MB = 600  # OpenCLIP ViT-B-32 in fp32, until the first move measures it
DEFAULT_VLM_MB = 8192  # only when the config gives none: a 7B VLM takes 5-8 GB
EVICTED_BY_OLLAMA = "evicted_by_ollama"
OOM_REASONS = frozenset({Reason.INSUFFICIENT_VRAM.value, Reason.OUT_OF_MEMORY.value})
# A sampler that cannot read (GPU lost, driver reset) is asked again after 1 s, then twice as long up to a minute:
# asked before every freeing step instead, it livelocked the coordinator (issue 12, hole 3).
READ_RETRY = Backoff(initial_s=1.0, max_s=60.0)


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatorSettings:
    modes: Mapping[str, ModePolicy]
    default_mode: str
    vlm_model: str
    vlm_host: str
    num_ctx: int
    vlm_declared_bytes: int
    clip_declared_bytes: int
    reserve_bytes: int
    idle_timeout_s: float
    default_lease_ttl_s: float  # what clients put in AcquireLease.ttl_s by default; a request's own ttl_s wins
    recovery_timeout_s: float = 5.0
    recovery_fraction: float = 0.75
    load_retry_backoff_s: float = 5.0  # after a failed step, don't re-plan it before this (unless new demand)
    step_timeout_s: float = 600.0  # a step whose result never comes (its actor died) is given up after this
    chat_yield_timeout_s: float = 30.0  # the chat agent may finish the reply in progress before it yields
    # A vlm=unloaded mode with a grace: an on-demand VLM that sits beside CLIP on the GPU stays until the idle timeout
    # (nothing is gained by unloading it: the next call would reload it); the grace applies when CLIP had to yield.
    keep_coresident_vlm: bool = True
    # A chat load that fits nowhere else takes the place of an idle VLM (no lease held or asked for), rather than the
    # user's turn failing; `chat_min_bytes` (the smallest chat model's footprint) says when nothing else fits.
    chat_takes_idle_vlm: bool = True
    chat_min_bytes: int = 0
    # While the smallest chat model still fits beside the VLM and CLIP, a chat model leaves them their room even when
    # they are off the GPU, so it need not yield (and be loaded again) each time the agent comes back for them.
    chat_leaves_room: bool = True
    chat_declared_bytes: Mapping[str, int] = field(default_factory=dict)  # catalog key -> declared footprint
    chat_backends: Mapping[str, str] = field(default_factory=dict)  # catalog key -> "lmstudio" | "ollama"
    # Ollama evicts a pinned VLM by itself (real-servers.md O9-O11); Mai reloads it. After this many evictions within
    # the window it stops reloading for a while (doubling) and says so, instead of spinning against Ollama.
    evictions_before_backoff: int = 3
    eviction_window_s: float = 300.0
    eviction_backoff_s: float = 30.0
    eviction_backoff_max_s: float = 600.0

    def __post_init__(self) -> None:
        problems = []
        if not self.modes:
            problems.append("modes: got none; accepted: at least one mode")
        if self.default_mode not in self.modes:
            problems.append(f"default_mode: got {self.default_mode!r}; accepted: one of {', '.join(self.modes)}")
        for name in ("vlm_declared_bytes", "clip_declared_bytes", "reserve_bytes", "num_ctx", "chat_min_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}: got {getattr(self, name)!r}; accepted: an integer >= 0")
        for name in ("idle_timeout_s", "default_lease_ttl_s", "recovery_timeout_s", "step_timeout_s",
                     "chat_yield_timeout_s", "eviction_window_s", "eviction_backoff_s", "eviction_backoff_max_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: got {getattr(self, name)!r}; accepted: a number > 0")
        if not 0 < self.recovery_fraction <= 1:
            problems.append(f"recovery_fraction: got {self.recovery_fraction!r}; accepted: a number in (0, 1]")
        if not isinstance(self.evictions_before_backoff, int) or self.evictions_before_backoff < 1:
            problems.append(f"evictions_before_backoff: got {self.evictions_before_backoff!r}; accepted: an integer >= 1")
        if self.load_retry_backoff_s < 0:
            problems.append(f"load_retry_backoff_s: got {self.load_retry_backoff_s!r}; accepted: a number >= 0")
        if problems:
            raise MaiError("CoordinatorSettings " + "; ".join(problems), reason=Reason.INVALID_CONFIG)

    @classmethod
    def from_config(cls, cfg: Any) -> "CoordinatorSettings":
        """From `config.MaiConfig` (sizes there are in MiB)."""
        modes_cfg, ollama = cfg.modes, cfg.ollama
        modes = {
            str(name): ModePolicy(
                vlm=row.vlm,
                clip=row.clip,
                lease_drain_timeout_s=float(getattr(row, "lease_drain_timeout_s", 10.0)),
                vlm_grace_s=None if getattr(row, "vlm_grace_s", None) is None else float(row.vlm_grace_s),
            )
            for name, row in modes_cfg.table.items()
        }
        clip_mb = getattr(cfg.clip, "footprint_mb", None)
        vlm_mb = getattr(ollama, "vlm_footprint_mb", None)
        footprints_mb = {m.key: m.footprint_mb for m in getattr(cfg, "models", ())}
        chat_role = getattr(getattr(cfg, "chat", None), "role", None)
        chain = getattr(cfg, "roles", {}).get(chat_role, ()) if chat_role else ()
        chat_min_mb = min((footprints_mb[k] for k in chain if k in footprints_mb), default=0)
        return cls(
            modes=modes,
            default_mode=modes_cfg.default,
            vlm_model=ollama.vlm_model,
            vlm_host=ollama.host,
            num_ctx=int(ollama.num_ctx),
            vlm_declared_bytes=int((vlm_mb if vlm_mb is not None else DEFAULT_VLM_MB) * MIB),
            clip_declared_bytes=int((clip_mb if clip_mb is not None else DEFAULT_CLIP_MB) * MIB),
            reserve_bytes=int(cfg.gpu.reserve_mb * MIB),
            chat_min_bytes=int(chat_min_mb * MIB),
            chat_declared_bytes={key: int(mb * MIB) for key, mb in footprints_mb.items()},
            chat_backends={m.key: m.backend for m in getattr(cfg, "models", ())},
            chat_leaves_room=bool(getattr(getattr(cfg, "chat", None), "leave_room_for_agent", True)),
            idle_timeout_s=float(ollama.idle_timeout_s),
            default_lease_ttl_s=float(ollama.lease_ttl_s),
            recovery_timeout_s=float(getattr(ollama, "vram_recovery_timeout_s", 5.0)),
            recovery_fraction=float(getattr(ollama, "vram_recovery_fraction", 0.75)),
            # The executors time out and retry on their own; this only catches one that never answers at all.
            step_timeout_s=60.0 + max(
                float(getattr(ollama, "load_timeout_s", 120.0)) * (int(getattr(ollama, "retries", 0)) + 1),
                float(getattr(cfg.clip, "move_timeout_s", 30.0)),
            ),
        )


# --- effects: what the actor shell executes -------------------------------------------------------------------


@dataclass(frozen=True)
class SendStep:
    target: str  # "vlm" | "clip" | "sampler" | "chat"
    message: object  # LoadVlm | UnloadVlm | MoveClip | WaitVramFree | ChatYield


@dataclass(frozen=True)
class Reply:
    to: object  # the opaque sender token given to handle()
    message: object  # a reply, or a Failure


@dataclass(frozen=True)
class Publish:
    event: object  # a messages.events instance, for every subscriber


@dataclass(frozen=True)
class WakeAt:
    at: float  # call handle(Tick(), None, now) at or after this; extra ticks are harmless


@dataclass(frozen=True)
class Log:
    event: str
    fields: Mapping[str, object]


@dataclass(frozen=True)
class PersistFootprint:
    key: str  # `model@context` (mai.core.footprints.footprint_key)
    nbytes: int


@dataclass(frozen=True)
class Tell:
    """Send a fact to the actor with this role (not a step: nothing waits for an answer)."""

    target: str  # "chat"
    message: object


@dataclass(frozen=True)
class ReobserveVlm:
    """Ask the VLM loader to read Ollama now (answered with a VlmObserved): after an out-of-memory failure Ollama may
    have evicted every model, the VLM included (real-servers.md O10, O11)."""


@dataclass(frozen=True)
class ReadVram:
    """Ask the sampler for a reading now (answered with a VramReading): sent when an allocation completes, so the
    estimate stops counting it as uncertain within a round trip instead of at the next periodic sample, and the
    next freeing step needs no "read VRAM again" of its own."""


@dataclass(frozen=True)
class Tick:
    """Time passed: check deadlines (the shell sends it at the times asked for with WakeAt)."""


Effect = Union[SendStep, Reply, Publish, WakeAt, Log, PersistFootprint, ReadVram, ReobserveVlm, Tell]

STEP_TARGETS = {LOAD_VLM: "vlm", UNLOAD_VLM: "vlm", MOVE_CLIP_CPU: "clip", MOVE_CLIP_GPU: "clip",
                CONFIRM_FREE: "sampler", READ_VRAM: "sampler", YIELD_CHAT: "chat", CHAT_LOAD: "chat",
                CHAT_UNLOAD: "chat"}
ACCEPTED = (
    "SetMode, EnsureVlm, AcquireLease, ReleaseLease, PlaceClip, GetStatus, GetGrantable, ChatNeeds, VlmObserved, "
    "ClipObserved, PartHealth, ResourceChanged, VramReading, VlmLoaded, VlmUnloaded, ClipMoved, VramRecovered, "
    "ChatLoaded, ChatUnloaded, StepFailed, ModelSwitched, Tick"
)


# --- state records -----------------------------------------------------------------------------------------------


@dataclass
class _Lease:
    lease_id: str
    holder: str
    granted_at: float
    expires_at: float


@dataclass
class _Waiter:
    kind: str  # "mode" | "ensure" | "place" | "lease" | "chat" | "grantable"
    request: Any  # SetMode | EnsureVlm | PlaceClip | AcquireLease | ChatNeeds | GetGrantable
    sender: object
    since: float
    deadline: float


@dataclass
class _Unconfirmed:
    """Bytes freed by steps whose effect the sampler has not confirmed yet (they do not count as free)."""

    baseline_free_bytes: int
    expected_bytes: int
    includes_vlm: bool
    completed_at: float | None = None  # None while the freeing step is in flight


@dataclass
class _InFlight:
    step: PlannedStep
    step_id: str
    message: Any  # what was sent: a step message, a ChatGrant (the reply that lets the agent go) or a ChatYield
    sent_at: float
    deadline: float
    prev_unconfirmed: _Unconfirmed | None
    prev_state: str  # the VLM state or CLIP placement before the step
    chat_model: str | None = None  # a chat load: the model the agent loads
    chat_context: int = 0  # a chat load: the context length it is loaded with


@dataclass
class _Measure:
    """A load being measured: the exact reading before it; the footprint is the change to the first reading taken
    after the load completed and before Mai's next VRAM-changing step was sent."""

    part: str  # "vlm" | "clip" | "chat"
    model: str
    context_length: int
    declared_bytes: int
    step_id: str
    before: VramSnapshot
    owner: Owner | None  # whose processes load it (NVML's per-process rows); None: only the device-wide change
    completed_at: float | None = None
    next_step_at: float | None = None  # when Mai's next VRAM-changing step was sent (readings after it are spoiled)
    floor_bytes: int = 0  # what the part reports holding once loaded (Ollama's size_vram): a smaller change is spoiled

    @property
    def key(self) -> str:
        return footprint_key(self.model, self.context_length)


class Coordinator:
    """The mode, the GPU gate and the plan in progress. See the module docstring."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        now: float,
        *,
        learned_footprints: Mapping[str, int] | None = None,
        initial_mode: str | None = None,
    ) -> None:
        self.settings = settings
        self._pending_logs: list[Log] = []
        if initial_mode is not None and initial_mode not in settings.modes:
            self._pending_logs.append(Log("mode.restore_ignored", {"mode": initial_mode, "using": settings.default_mode}))
            initial_mode = None
        self._mode = initial_mode or settings.default_mode
        self._target = self._mode
        self._target_set_at = now
        self._steps_done: list[tuple[float, str]] = []
        self._learned, ignored = parse_footprints(dict(learned_footprints or {}))
        if ignored:
            self._pending_logs.append(Log("footprint.ignored", {"keys": list(ignored), "reason": "old format (Ollama's "
                                          "size_vram, no CUDA context) or invalid; measured again on the next load"}))
        self._measure: _Measure | None = None
        self._last_change_at = float("-inf")  # when the last of Mai's own VRAM changes was reported done
        self._evictions: list[float] = []  # when Ollama evicted the VLM on its own, within the window
        self._evicted_until = float("-inf")  # no reload before this (evicted too often)
        self._evicted_note: str | None = None  # why reloads are held back (degraded part "vlm" in status)
        # (Mai's last change, lowest free bytes) over readings since that change with the VLM loaded: what free
        # looked like with the VLM's bytes in use, to tell its memory came back once Ollama is gone.
        self._vlm_low_free: tuple[float, int] | None = None
        self._vlm_step_sent_at = float("-inf")  # when the last VLM step whose result came was sent
        self._clip_reported = 0  # what the mover says CLIP takes (its parameter bytes): until measured
        self._clip_pid = 0  # the CLIP process, to tell its row in NVML's per-process figures (0: not known)
        self._clip_known_at = float("-inf")  # the newest CLIP reading applied: a report's read time, a move's send time
        self._vlm_state = "unknown"
        self._vlm_size_bytes = 0
        self._vlm_size_vram_bytes = 0
        self._clip_placement = "unknown"
        self._clip_device = "unknown"
        self._clip_model = ""
        self._clip_ready = False
        self._snapshot: VramSnapshot | None = None
        self._vlm_gone_guessed = False  # the VLM was taken as gone on a reading while Ollama was down (hole 5)
        self._gpu_snapshot: VramSnapshot | None = None  # the last GPU reading (kept while NVML fails: host readings)
        self._allocs: list[tuple[float, float, int]] = []  # (sent_at, completed_at, bytes) not in the last reading
        self._unconfirmed: _Unconfirmed | None = None
        self._leases: dict[str, _Lease] = {}
        self._waiters: list[_Waiter] = []
        self._pin: str | None = None
        self._health: dict[str, str] = {}  # part -> reason, from PartHealth / VramReading
        self._vram_short: str | None = None  # why the last allocation was refused (degraded part "gpu")
        self._reads_failing: str | None = None  # why the sampler cannot read (degraded part "gpu"), until it can
        self._read_failures = 0  # in a row: the backoff before the next read
        self._inflight: _InFlight | None = None
        self._retry_after: dict[str, tuple[float, str]] = {}  # step kind -> (until, why)
        self._last_used_at = now  # idle timer reference
        self._last_demand_end_at: float | None = None  # grace reference: last on-demand lease/ensure ended
        self._idle: str | None = None  # None | "due" (unload now) | "suspended" (a "loaded" policy waits for demand)
        self._chat_model: str | None = None
        self._chat_context = 0  # the context length the chat model was granted with (0: not known)
        self._chat_bytes = 0  # VRAM the chat model holds, per its ChatLoaded (0: none, or not known)
        self._refused: frozenset[tuple[str, int, int]] = frozenset()
        self._notes: frozenset[str] = frozenset()  # plan notes already logged (a decision is logged once)
        self._fresh_snapshot = False
        self._read_wanted = False  # an allocation completed while handling this message: ask for a reading
        self._step_seq = 0
        self._epoch = format(int(now * 1000) % 0xFFFFFFFF, "x")
        self._handlers: dict[type, Callable[[Any, object, float, list[Effect]], Callable[[], None] | None]] = {
            SetMode: self._on_set_mode, EnsureVlm: self._on_ensure, AcquireLease: self._on_acquire,
            ReleaseLease: self._on_release, PlaceClip: self._on_place, GetStatus: self._on_get_status,
            VlmObserved: self._on_vlm_observed, ClipObserved: self._on_clip_observed, PartHealth: self._on_health,
            ResourceChanged: self._on_resource_changed, VramReading: self._on_vram_reading,
            VlmLoaded: self._on_vlm_loaded, VlmUnloaded: self._on_vlm_unloaded, ClipMoved: self._on_clip_moved,
            VramRecovered: self._on_vram_recovered, StepFailed: self._on_step_failed,
            ModelSwitched: self._on_model_switched, Tick: self._on_tick,
            GetGrantable: self._on_get_grantable, ChatNeeds: self._on_chat_needs, ChatLoaded: self._on_chat_loaded,
            ChatUnloaded: self._on_chat_unloaded,
        }

    # --- public surface ----------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def target_mode(self) -> str:
        return self._target

    @property
    def step_in_flight(self) -> object | None:
        """The step message (LoadVlm, UnloadVlm, MoveClip, WaitVramFree, ChatGrant, ChatYield) awaiting its result."""
        return self._inflight.message if self._inflight else None

    def handle(self, message: object, sender: object, now: float) -> list[Effect]:
        handler = self._handlers.get(type(message))
        if handler is None:
            return self._unknown(message, sender)
        effects: list[Effect] = list(self._pending_logs)
        self._pending_logs.clear()
        after = handler(message, sender, now, effects)
        if self._read_wanted:
            self._read_wanted = False
            effects.append(ReadVram())
        self._settle(now, effects)
        if after is not None:
            after()
        return effects

    def status(self, request_id: str, now: float) -> Status:
        plan = self._plan(now)
        inflight = self._inflight.step.description if self._inflight else None
        return Status(
            request_id=request_id,
            mode=self._mode,
            target_mode=self._target,
            vram=self._snapshot,
            reserve_bytes=self.settings.reserve_bytes,
            vlm=VlmStatus(
                model=self.settings.vlm_model,
                state=self._vlm_state,
                size_bytes=self._vlm_size_bytes,
                size_vram_bytes=self._vlm_size_vram_bytes,
                footprint_bytes=self._shown_fp(self._vlm_key, self._vlm_fp),
                footprint_learned=self._measured(self._vlm_key),
                leases=len(self._leases),
                host=self.settings.vlm_host,
            ),
            clip=ClipStatus(self._clip_model, self._clip_device, self._shown_fp(self._clip_key, self._clip_fp),
                            self._clip_ready, self._measured(self._clip_key)),
            chat_model=self._chat_model,
            degraded=self._degraded(),
            plan=plan.describe(),
            step_in_flight=inflight,
            at=now,
            chat_footprint_bytes=self._chat_bytes,
            chat_footprint_learned=self._chat_key is not None and self._measured(self._chat_key),
            step_in_flight_s=round(now - self._inflight.sent_at, 1) if self._inflight else None,
            fits_against=self._fits_against(now),
            gpu_use=self._gpu_use(),
        )

    def _gpu_use(self) -> GpuUseStatus | None:
        """The last reading's per-process rows, attributed (None without them: status says why not)."""
        snap = self._snapshot
        if snap is None or not snap.per_process:
            return None
        use = split_use(snap.processes, self._clip_pid)
        return GpuUseStatus(tuple((owner.value, n) for owner, n in use.mai), use.others)

    # --- requests ------------------------------------------------------------------------------------------------

    def _on_set_mode(self, msg: SetMode, sender: object, now: float, fx: list[Effect]) -> Callable[[], None] | None:
        if msg.mode not in self.settings.modes:
            fx.append(Reply(sender, self._invalid_mode(msg.request_id, msg.mode)))
            return None
        for w in [w for w in self._waiters if w.kind == "mode" and w.request.mode != msg.mode]:
            self._fail(w, Reason.SUPERSEDED, f"superseded by a request for mode {msg.mode!r}", fx)
        for w in [w for w in self._waiters if w.kind == "place"]:
            self._fail(w, Reason.SUPERSEDED, f"the manual CLIP placement ends with the request for mode {msg.mode!r}", fx)
        previous_target = self._target
        if msg.mode != self._target:
            self._target, self._target_set_at, self._steps_done = msg.mode, now, []
            self._last_demand_end_at = None  # demand that ended before, even at this instant, was the old mode's
        self._pin = None
        self._idle = None
        self._retry_after.clear()  # a new request is new demand: retry a failed step now
        self._evicted_until = float("-inf")  # ... and reload a VLM Ollama kept evicting (the user asked again)
        fx.append(Log("mode.requested", {"mode": msg.mode, "previous_target": previous_target, "wait": msg.wait,
                                         "request_id": msg.request_id}))
        if msg.wait:
            self._waiters.append(_Waiter("mode", msg, sender, now, now + msg.timeout_s))
            return None

        def accept() -> None:
            planned = (self._inflight.step.description,) if self._inflight else ()
            fx.append(Reply(sender, ModeAccepted(msg.request_id, msg.mode, planned + self._plan(now).describe())))

        return accept

    def _on_ensure(self, msg: EnsureVlm, sender: object, now: float, fx: list[Effect]) -> None:
        if msg.loaded:
            self._new_vlm_demand(now)
        self._waiters.append(_Waiter("ensure", msg, sender, now, now + msg.timeout_s))

    def _on_acquire(self, msg: AcquireLease, sender: object, now: float, fx: list[Effect]) -> None:
        self._new_vlm_demand(now)
        self._waiters.append(_Waiter("lease", msg, sender, now, now + msg.timeout_s))

    def _on_release(self, msg: ReleaseLease, sender: object, now: float, fx: list[Effect]) -> None:
        lease = self._leases.pop(msg.lease_id, None)
        if lease is None:  # expired or revoked already: releasing is idempotent, so a client's `with` never fails
            fx.append(Log("lease.release_unknown", {"lease_id": msg.lease_id}))
            fx.append(Reply(sender, LeaseReleased(msg.request_id, msg.lease_id, 0.0)))
            return
        self._lease_ended(lease, now)
        fx.append(Log("lease.released", {"lease_id": lease.lease_id, "holder": lease.holder,
                                         "held_s": round(now - lease.granted_at, 3)}))
        fx.append(Reply(sender, LeaseReleased(msg.request_id, msg.lease_id, now - lease.granted_at)))

    def _on_place(self, msg: PlaceClip, sender: object, now: float, fx: list[Effect]) -> None:
        if msg.device == "gpu" and self._gpu() is False:
            why = self._health.get("gpu") or "the VRAM reading says there is no GPU"
            fx.append(Reply(sender, Failure(msg.request_id, Reason.NO_GPU, f"CLIP cannot move to a GPU: {why}")))
            return
        for w in [w for w in self._waiters if w.kind == "place" and w.request.device != msg.device]:
            self._fail(w, Reason.SUPERSEDED, f"superseded by a request to place CLIP on {msg.device}", fx)
        self._pin = msg.device
        self._retry_after.pop(MOVE_CLIP_GPU if msg.device == "gpu" else MOVE_CLIP_CPU, None)
        fx.append(Log("clip.pinned", {"device": msg.device, "request_id": msg.request_id}))
        self._waiters.append(_Waiter("place", msg, sender, now, now + msg.timeout_s))

    def _on_get_status(self, msg: GetStatus, sender: object, now: float, fx: list[Effect]) -> Callable[[], None]:
        return lambda: fx.append(Reply(sender, self.status(msg.request_id, now)))

    def _on_get_grantable(self, msg: GetGrantable, sender: object, now: float, fx: list[Effect]) -> None:
        # Answered in _settle on a reading that shows every allocation Mai made (the plan reads again if needed);
        # at most recovery_timeout_s later, with the conservative estimate (0 without any reading).
        self._waiters.append(_Waiter("grantable", msg, sender, now, now + self.settings.recovery_timeout_s))

    def _on_chat_needs(self, msg: ChatNeeds, sender: object, now: float, fx: list[Effect]) -> None:
        for w in [w for w in self._waiters if w.kind == "chat" and w.sender == sender]:
            self._fail(w, Reason.SUPERSEDED, f"superseded by a request for chat model {msg.model!r}", fx)
        fx.append(Log("chat.needs", {"model": msg.model, "needed_bytes": msg.needed_bytes, "unload": msg.unload,
                                     "request_id": msg.request_id}))
        self._waiters.append(_Waiter("chat", msg, sender, now, now + msg.timeout_s))

    # --- observations --------------------------------------------------------------------------------------------

    def _on_vlm_observed(self, msg: VlmObserved, sender: object, now: float, fx: list[Effect]) -> None:
        if msg.model != self.settings.vlm_model:
            fx.append(Log("vlm.observed_other_model", {"model": msg.model, "loaded": msg.loaded}))
            return
        if self._inflight and self._inflight.step.kind in (LOAD_VLM, UNLOAD_VLM):
            fx.append(Log("vlm.observed_during_step", {"loaded": msg.loaded}))
            return  # the step's own result is the authority on what it did
        if msg.observed_at and msg.observed_at < self._vlm_step_sent_at:
            # Read before the last VLM step began, delivered after its result (Thespian does not keep the order).
            fx.append(Log("vlm.observed_stale", {"loaded": msg.loaded, "observed_at": msg.observed_at,
                                                 "step_sent_at": self._vlm_step_sent_at}))
            return
        was, held_bytes = self._vlm_state, self._vlm_size_vram_bytes or self._vlm_fp
        self._vlm_state = "loaded" if msg.loaded else "unloaded"
        self._vlm_size_bytes = msg.size_bytes if msg.loaded else 0
        self._vlm_size_vram_bytes = msg.size_vram_bytes if msg.loaded else 0
        if msg.loaded and was != "loaded":
            self._last_used_at = now  # idle counts from when we first know it is there
        if was != self._vlm_state:
            fx.append(Log("vlm.observed", {"state": self._vlm_state, "was": was, "size_vram_bytes": msg.size_vram_bytes}))
        if was == "loaded" and not msg.loaded:
            self._evicted(held_bytes, now, fx)
        elif msg.loaded and self._snapshot is not None:
            self._check_vlm_gone(self._snapshot, now, fx)  # the last reading shows its bytes in use

    def _evicted(self, held_bytes: int, now: float, fx: list[Effect]) -> None:
        """Ollama dropped the VLM on its own (a fit check before another client's load, evict-all after a load's OOM,
        expire-all after a runtime OOM: real-servers.md O9-O11): say so, then the re-plan reloads it if the mode or a
        lease wants it. Its bytes come back late (O7), so they are confirmed before anything counts on them; and a
        reload that keeps being evicted backs off (doubling) instead of spinning against Ollama."""
        self._last_change_at = now
        self._last_used_at = now
        self._add_unconfirmed(held_bytes, True)
        self._read_wanted = True
        window = self.settings.eviction_window_s
        self._evictions = [t for t in self._evictions if now - t < window] + [now]
        count = len(self._evictions)
        fx.append(Log("vlm.evicted", {"model": self.settings.vlm_model, "reason": EVICTED_BY_OLLAMA,
                                      "evictions_in_window": count, "window_s": window, "leases": len(self._leases)}))
        fx.append(Publish(PlacementChanged("vlm", "unloaded", EVICTED_BY_OLLAMA, at=now)))
        over = count - self.settings.evictions_before_backoff
        if over < 0:
            return
        backoff = min(self.settings.eviction_backoff_s * 2 ** over, self.settings.eviction_backoff_max_s)
        self._evicted_until = now + backoff
        note = (f"Ollama evicted {self.settings.vlm_model} {count} times within {window:g} s (another client's load, "
                f"or out of memory); not reloading it for {backoff:g} s")
        fx.append(Log("vlm.eviction_backoff", {"model": self.settings.vlm_model, "backoff_s": backoff,
                                               "evictions_in_window": count, "reason": EVICTED_BY_OLLAMA}))
        self._set_evicted_note(note, now, fx)

    def _on_clip_observed(self, msg: ClipObserved, sender: object, now: float, fx: list[Effect]) -> None:
        if self._inflight and self._inflight.step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
            fx.append(Log("clip.observed_during_step", {"device": msg.device}))
            return
        if msg.observed_at and msg.observed_at < self._clip_known_at:
            # Read before a newer report or move, delivered after it (Thespian does not keep the order).
            fx.append(Log("clip.observed_stale", {"device": msg.device, "ready": msg.ready,
                                                  "observed_at": msg.observed_at, "known_at": self._clip_known_at}))
            return
        self._clip_known_at = max(self._clip_known_at, msg.observed_at)
        was = self._clip_placement
        self._clip_device, self._clip_placement = msg.device, _placement(msg.device)
        self._clip_ready, self._clip_model = msg.ready, msg.model
        if msg.pid > 0:
            self._clip_pid = msg.pid
        if msg.footprint_bytes > 0:
            self._clip_reported = msg.footprint_bytes
        if was != self._clip_placement:
            fx.append(Log("clip.observed", {"device": msg.device, "was": was, "ready": msg.ready}))

    def _on_health(self, msg: PartHealth, sender: object, now: float, fx: list[Effect]) -> None:
        self._set_health(msg.part, None if msg.ok else (msg.reason or f"{msg.part} unhealthy"), now, fx)
        if msg.part == "vlm" and not msg.ok and self._snapshot is not None:
            self._check_vlm_gone(self._snapshot, now, fx)  # the reading may have shown its bytes back already
        elif msg.part == "vlm" and msg.ok and self._vlm_gone_guessed:
            # "Gone" was a guess from a reading (another program may have freed those bytes, the runner may have
            # survived): the loader reports only what changed in its own view, so ask it what Ollama holds now.
            self._vlm_gone_guessed = False
            fx.append(Log("vlm.reobserve", {"reason": "server_back_after_gone_guess"}))
            fx.append(ReobserveVlm())

    def _on_resource_changed(self, msg: ResourceChanged, sender: object, now: float, fx: list[Effect]) -> None:
        self._take_reading(msg.snapshot, fx)
        fx.append(Publish(msg))  # for `mai events` and other subscribers
        if self._chat_model is not None:
            fx.append(Tell("chat", msg))  # the agent checks its model still has room (issue 12, hole 8)

    def _on_vram_reading(self, msg: VramReading, sender: object, now: float, fx: list[Effect]) -> None:
        self._take_reading(msg.snapshot, fx)
        self._set_health("gpu", msg.degraded_reason, now, fx)

    def _on_model_switched(self, msg: ModelSwitched, sender: object, now: float, fx: list[Effect]) -> None:
        if msg.model != self._chat_model:
            # A model we granted no load for (adopted after a restart) holds its footprint all the same: measured at
            # its context if known, else what the agent counts, else the catalog's (a yield gives those bytes back).
            self._chat_context = msg.context_length
            declared = msg.vram_bytes or self.settings.chat_declared_bytes.get(msg.model, 0)
            self._chat_bytes = self._learned.get(footprint_key(msg.model, msg.context_length), declared)
            fx.append(Log("chat.adopted", {"model": msg.model, "vram_bytes": self._chat_bytes,
                                           "context_length": msg.context_length, "reason": msg.reason}))
        self._chat_model = msg.model
        fx.append(Publish(msg))

    def _on_tick(self, msg: Tick, sender: object, now: float, fx: list[Effect]) -> None:
        return None  # _settle does the work: deadlines are checked on every message

    # --- step results ---------------------------------------------------------------------------------------------

    def _take_inflight(self, step_id: str, result: object, fx: list[Effect]) -> _InFlight | None:
        if self._inflight is None or self._inflight.step_id != step_id:
            fx.append(Log("step.stale_result", {"step_id": step_id, "result": type(result).__name__}))
            return None
        inflight, self._inflight = self._inflight, None
        if inflight.step.kind in (LOAD_VLM, UNLOAD_VLM):
            self._vlm_step_sent_at = inflight.sent_at
        if inflight.step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
            self._clip_known_at = max(self._clip_known_at, inflight.sent_at)
        return inflight

    def _on_vlm_loaded(self, msg: VlmLoaded, sender: object, now: float, fx: list[Effect]) -> None:
        inflight = self._take_inflight(msg.step_id, msg, fx)
        if inflight is None and self._vlm_state != "unknown":
            return
        self._vlm_state, self._vlm_size_bytes, self._vlm_size_vram_bytes = "loaded", msg.size_bytes, msg.size_vram_bytes
        self._last_used_at = now
        if self._gpu() and msg.size_vram_bytes > 0:
            self._allocated(inflight.sent_at if inflight else now, now, msg.size_vram_bytes)
        self._last_change_at = now
        if msg.partial_offload:
            # A squeezed load says how little fitted, not what the model needs: keep the footprint we had.
            fx.append(Log("vlm.partial_offload", {"size_bytes": msg.size_bytes, "size_vram_bytes": msg.size_vram_bytes}))
            self._drop_measure(msg.step_id, "partial offload: the load shows how little fitted", fx)
        else:
            self._measured_step_done(msg.step_id, now, floor_bytes=msg.size_vram_bytes)
        if inflight is not None:
            if self._evicted_note is not None:
                self._set_evicted_note(None, now, fx)
            self._step_done(inflight, now, fx)
            fx.append(Log("vlm.loaded", {"model": msg.model, "load_s": msg.load_s, "attempts": msg.attempts,
                                         "size_vram_bytes": msg.size_vram_bytes, "reason": inflight.step.cause}))
            fx.append(Publish(PlacementChanged("vlm", "loaded", inflight.step.cause, at=now)))

    def _on_vlm_unloaded(self, msg: VlmUnloaded, sender: object, now: float, fx: list[Effect]) -> None:
        inflight = self._take_inflight(msg.step_id, msg, fx)
        if inflight is None and self._vlm_state != "unknown":
            return
        self._vlm_state, self._vlm_size_bytes, self._vlm_size_vram_bytes = "unloaded", 0, 0
        self._last_change_at = now
        if self._unconfirmed is not None and self._unconfirmed.completed_at is None:
            self._unconfirmed.completed_at = now
        if inflight is None:
            return
        self._step_done(inflight, now, fx)
        fx.append(Log("vlm.unloaded", {"model": msg.model, "unload_s": msg.unload_s, "reason": inflight.step.cause}))
        fx.append(Publish(PlacementChanged("vlm", "unloaded", inflight.step.cause, at=now)))
        if self._idle == "due":
            self._idle = "suspended"  # a "loaded" policy now waits for new demand or a new SetMode
            if inflight.step.cause == "idle":
                fx.append(Publish(IdleUnloaded(msg.model, now - self._last_used_at, at=now)))

    def _on_clip_moved(self, msg: ClipMoved, sender: object, now: float, fx: list[Effect]) -> None:
        inflight = self._take_inflight(msg.step_id, msg, fx)
        if inflight is None and self._clip_placement != "unknown":
            return
        self._clip_device, self._clip_placement, self._clip_ready = msg.device, _placement(msg.device), True
        if msg.footprint_bytes > 0:
            self._clip_reported = msg.footprint_bytes
        self._last_change_at = now
        if self._clip_placement == "gpu":
            self._measured_step_done(msg.step_id, now)
        if self._clip_placement == "gpu" and self._gpu():
            self._allocated(inflight.sent_at if inflight else now, now, self._clip_fp)
        elif self._unconfirmed is not None and self._unconfirmed.completed_at is None:
            self._unconfirmed.completed_at = now
        if inflight is None:
            return
        self._step_done(inflight, now, fx)
        reason = inflight.step.cause
        fx.append(Log("clip.moved", {"device": msg.device, "move_s": msg.move_s, "reason": reason}))
        fx.append(Publish(PlacementChanged("clip", self._clip_placement, reason, at=now)))

    def _on_chat_loaded(self, msg: ChatLoaded, sender: object, now: float, fx: list[Effect]) -> None:
        """The agent unloaded its previous model (within the same step) and loaded this one. A late result is
        still the truth about what the agent holds."""
        inflight = self._take_inflight(msg.step_id, msg, fx)
        context = inflight.chat_context if inflight is not None else 0
        self._last_change_at = now
        self._measured_step_done(msg.step_id, now)
        # What it holds: a measurement of this model at this context if there is one, else what the agent counted.
        self._chat_context = context
        self._chat_model = msg.model
        self._chat_bytes = self._learned.get(footprint_key(msg.model, context), msg.vram_bytes)
        if self._gpu() and msg.vram_bytes > 0:
            self._allocated(inflight.sent_at if inflight else now, now, msg.vram_bytes)
        fx.append(Log("chat.loaded", {"model": msg.model, "vram_bytes": msg.vram_bytes, "load_s": msg.load_s,
                                      "step_id": msg.step_id, "late": inflight is None}))

    def _on_chat_unloaded(self, msg: ChatUnloaded, sender: object, now: float, fx: list[Effect]) -> None:
        """The end of a granted unload, or of a yield (answered with step_id "yield", so any id ends one)."""
        inflight = self._inflight
        ends_step = inflight is not None and inflight.step.kind in (CHAT_UNLOAD, YIELD_CHAT) and (
            inflight.step_id == msg.step_id or inflight.step.kind == YIELD_CHAT)
        if ends_step:
            self._inflight = None
            if self._unconfirmed is not None and self._unconfirmed.completed_at is None:
                self._unconfirmed.completed_at = now
            if inflight.step.kind == YIELD_CHAT:
                self._step_done(inflight, now, fx)
                # Mai's decision, so subscribers (`mai events`) see it, not only the log.
                fx.append(Publish(PlacementChanged("chat", "unloaded", inflight.step.cause, at=now)))
            reason = inflight.step.cause
        elif msg.model == self._chat_model:
            reason = "agent"  # outside a step: the freed bytes count once a reading shows them
        else:
            fx.append(Log("step.stale_result", {"step_id": msg.step_id, "result": "ChatUnloaded", "model": msg.model}))
            return
        fx.append(Log("chat.unloaded", {"model": msg.model, "freed_bytes": self._chat_bytes, "step_id": msg.step_id,
                                        "reason": reason}))
        self._last_change_at = now
        self._chat_model, self._chat_bytes = None, 0

    def _on_vram_recovered(self, msg: VramRecovered, sender: object, now: float, fx: list[Effect]) -> None:
        inflight = self._take_inflight(msg.step_id, msg, fx)
        self._take_reading(msg.snapshot, fx)
        if inflight is None:
            return
        if msg.snapshot.gpu_present or self._gpu_snapshot is None:
            self._unconfirmed = None
        # else: answered on host memory (NVML lost during the wait): nothing was confirmed; once a GPU reading is
        # back, the freed bytes are confirmed before anything relies on them (invariants 3 and 4).
        self._step_done(inflight, now, fx)
        fields = {"recovered_bytes": msg.recovered_bytes, "waited_s": round(msg.waited_s, 3), "complete": msg.complete}
        fx.append(Log("vram.recovered" if msg.complete else "vram.recovery_incomplete", fields))

    def _on_step_failed(self, msg: StepFailed, sender: object, now: float, fx: list[Effect]) -> None:
        inflight = self._take_inflight(msg.step_id, msg, fx)
        if inflight is None:
            return
        self._step_failed(inflight, msg.failure, now, fx)

    def _step_failed(self, inflight: _InFlight, failure: Failure, now: float, fx: list[Effect]) -> None:
        """Undo what sending the step assumed, hold the step back for a while, fail whoever depended on it."""
        kind = inflight.step.kind
        self._unconfirmed = inflight.prev_unconfirmed
        fx.append(Log("step.failed", {"step": inflight.step.description, "reason": failure.reason.value,
                                      "message": failure.message}))
        self._drop_measure(inflight.step_id, f"the step failed: {failure.reason.value}", fx)
        if failure.reason.value in OOM_REASONS and kind in (LOAD_VLM, CHAT_LOAD):
            # Ollama answers an OOM beside other models by evicting all of them (O10, O11): the VLM may be gone.
            fx.append(Log("vlm.reobserve", {"reason": "out_of_memory", "step": inflight.step.description}))
            fx.append(ReobserveVlm())
        if kind in (CONFIRM_FREE, READ_VRAM):
            # The sampler cannot read: go on with the last reading (freed bytes not counted), read again after a
            # backoff, and let freeing steps run meanwhile (they never over-commit); allocating ones wait.
            self._unconfirmed = None
            self._read_failures += 1
            backoff = READ_RETRY.delay(self._read_failures + 1)
            why = f"VRAM readings failing: {failure.message}; reading again in {backoff:g} s"
            self._retry_after[READ_VRAM] = self._retry_after[CONFIRM_FREE] = (now + backoff, why)
            self._set_reads_failing(why, now, fx)
            return
        if kind in (CHAT_LOAD, CHAT_UNLOAD):
            if kind == CHAT_LOAD and failure.reason != Reason.CANCELLED:
                # The agent unloads its previous model before it loads: after a failed load it holds none (that we
                # know of; a reading shows whatever is left).
                self._chat_model, self._chat_bytes = None, 0
            return  # the agent chooses what to do next; nobody else waits on a chat step
        if kind in (LOAD_VLM, UNLOAD_VLM):
            self._vlm_state = inflight.prev_state
        elif kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
            self._clip_placement = inflight.prev_state
        backoff = self.settings.load_retry_backoff_s
        self._retry_after[kind] = (now + backoff, f"{failure.reason.value}: {failure.message}; retry after {backoff:g} s")
        cause = inflight.step.cause
        for w in list(self._waiters):
            depends = (
                (w.kind == "mode" and cause in ("mode", "grace_ended"))
                or (kind == LOAD_VLM and (w.kind == "lease" or (w.kind == "ensure" and w.request.loaded)))
                or (kind == UNLOAD_VLM and w.kind == "ensure" and not w.request.loaded)
                or (kind == MOVE_CLIP_GPU and w.kind == "place" and w.request.device == "gpu")
                or (kind == MOVE_CLIP_CPU and w.kind == "place" and w.request.device == "cpu")
                or (kind == MOVE_CLIP_CPU and cause == "yield" and (w.kind == "lease" or (w.kind == "ensure" and w.request.loaded)))
                or (kind == YIELD_CHAT and cause == "demand" and (
                    w.kind == "lease" or (w.kind == "ensure" and w.request.loaded)))
                or (kind == YIELD_CHAT and cause == "pin" and w.kind == "place" and w.request.device == "gpu")
            )
            if depends:
                self._fail(w, failure.reason, f"{inflight.step.description} failed: {failure.message}", fx,
                           details=dict(failure.details))

    # --- settle: the reconcile loop ----------------------------------------------------------------------------

    def _settle(self, now: float, fx: list[Effect]) -> None:
        self._retry_after = {k: v for k, v in self._retry_after.items() if v[0] > now}
        self._expire_leases(now, fx)
        self._revoke_after_drain(now, fx)
        self._watch_step(now, fx)
        self._check_idle(now, fx)
        self._answer_satisfied(now, fx)
        self._fail_fast_down(fx)
        self._expire_waiters(now, fx)
        plan = self._plan(now)
        refused_now = False
        for _ in range(4):
            if self._inflight is not None:
                break
            if plan.refusals:
                refused_now = True
                if self._refuse(plan, now, fx):
                    plan = self._plan(now)  # whoever needed the refused step is gone: plan again without them
                    continue
            step = plan.next_step
            if step is not None:
                for note in plan.notes:
                    if note not in self._notes:
                        fx.append(Log("plan.note", {"note": note}))
                self._notes = frozenset(plan.notes)
                self._send(step, now, fx)
                plan = self._plan(now)
            break
        plan = self._serve_chat(plan, now, fx)
        if self._reads_failing is not None and self._inflight is None and plan.next_step is None \
                and READ_VRAM not in self._retry_after:
            # Read again once the backoff is over even when no step needs it: only a reading says the GPU is back.
            self._send(PlannedStep(READ_VRAM, "read VRAM again", 0, "reads_failing"), now, fx)
        if self._inflight is None:
            # Refusals that persist (the mode's own steps) are published once, not on every re-plan.
            self._refused = frozenset(r.key for r in plan.refusals)
            self._fail_blocked_modes(plan, fx)
        if self._vram_short is not None and self._fresh_snapshot and not refused_now and not plan.refusals:
            self._set_vram_short(None, now, fx)
        self._fresh_snapshot = False
        if (self._inflight is None or self._inflight.step.kind in (CHAT_LOAD, CHAT_UNLOAD)) and plan.done:
            self._reach_target(now, fx)
        wake = self._next_deadline(now)
        if wake is not None:
            fx.append(WakeAt(wake))

    def _plan(self, now: float) -> Plan:
        world, policy, demand = self._world(now), self.settings.modes[self._target], self._demand(now)
        plan = plan_steps(world, policy, demand)
        if self._chat_needs_reading(world, plan):
            plan = plan_steps(world, policy, replace(demand, chat_needs_reading=True))
        return plan

    def _chat_needs_reading(self, world: World, plan: Plan) -> bool:
        """The chat agent is answered on a reading, never on a guess: a GetGrantable, or a chat load that does not
        fit the conservative estimate, waits for a fresh one when allocations may be counted twice."""
        if not world.gpu or not world.uncertain_bytes:
            return False
        if any(w.kind == "grantable" for w in self._waiters):
            return True
        grantable = grantable_bytes(world, plan)
        return any(w.kind == "chat" and not w.request.unload and w.request.needed_bytes > grantable
                   for w in self._waiters)

    def _world(self, now: float) -> World:
        """The world as it will be once the step in flight succeeds (the plan is for what comes after it)."""
        free = self._free_estimate()
        if free is not None:
            free -= self._unconfirmed_shown()
        unconfirmed = self._unconfirmed.expected_bytes if self._unconfirmed else 0
        unconfirmed_vlm = bool(self._unconfirmed and self._unconfirmed.includes_vlm)
        inflight = self._inflight
        clip = self._clip_placement
        chat_model, chat_bytes = self._chat_model, self._chat_bytes
        if inflight is not None:
            if inflight.step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
                clip = "cpu" if inflight.step.kind == MOVE_CLIP_CPU else "gpu"
            elif inflight.step.kind in (YIELD_CHAT, CHAT_UNLOAD):
                chat_model, chat_bytes = None, 0
            elif inflight.step.kind == CHAT_LOAD:
                chat_model, chat_bytes = inflight.chat_model, inflight.step.nbytes
            if free is not None and inflight.step.kind in ALLOCATING_KINDS + (CHAT_LOAD,):
                free -= inflight.step.nbytes
            elif free is not None and inflight.step.kind in (CONFIRM_FREE, READ_VRAM):
                free, unconfirmed, unconfirmed_vlm = free + unconfirmed, 0, False
        return World(
            vlm_model=self.settings.vlm_model,
            vlm_state=self._vlm_state,
            vlm_footprint_bytes=self._vlm_fp,
            clip_placement=clip,
            clip_footprint_bytes=self._clip_fp,
            reserve_bytes=self.settings.reserve_bytes,
            gpu=self._gpu(),
            free_bytes=free,
            uncertain_bytes=sum(nbytes for _, _, nbytes in self._allocs),
            unconfirmed_bytes=unconfirmed,
            unconfirmed_vlm=unconfirmed_vlm,
            down={p: r for p, r in self._health.items() if p in ("vlm", "clip")},
            retry_wait=self._retry_wait(now),
            chat_model=chat_model,
            chat_bytes=chat_bytes,
            vlm_idle=self._vlm_idle(),
            chat_min_bytes=self.settings.chat_min_bytes,
            chat_leaves_room=self.settings.chat_leaves_room,
        )

    def _retry_wait(self, now: float) -> dict[str, str]:
        wait = {k: why for k, (until, why) in self._retry_after.items() if now < until}
        if now < self._evicted_until and self._evicted_note:
            wait[LOAD_VLM] = self._evicted_note
        return wait

    def _unconfirmed_shown(self) -> int:
        """Freed bytes waiting for confirmation that the last reading already shows as free (a ResourceChanged while
        the confirmation runs): the world counts them once, as unconfirmed (so they are still confirmed first), not
        a second time as free."""
        u = self._unconfirmed
        if u is None or self._snapshot is None or not self._snapshot.gpu_present:
            return 0  # a host reading shows no VRAM coming back
        return min(u.expected_bytes, max(0, self._snapshot.free_bytes - u.baseline_free_bytes))

    def _vlm_idle(self) -> bool:
        """Loaded, usable, with no lease held or asked for and no VLM step in flight: it may give chat its place."""
        if not self.settings.chat_takes_idle_vlm or self._vlm_state != "loaded" or self._leases:
            return False
        if self._mode != self._target and self.settings.modes[self._target].vlm == "loaded":
            return False  # a mode being entered keeps its VLM (invariant 1); the chat gate must not count its bytes
        if "vlm" in self._health:
            return False
        if self._inflight is not None and self._inflight.step.kind in (LOAD_VLM, UNLOAD_VLM):
            return False
        return not any(w.kind == "lease" or (w.kind == "ensure" and w.request.loaded) for w in self._waiters)

    def _demand(self, now: float) -> Demand:
        waiting = [w for w in self._waiters if w.kind == "lease" or (w.kind == "ensure" and w.request.loaded)]
        fresh_leases = [l for l in self._leases.values() if l.granted_at > self._target_set_at]
        grace_end = self._grace_end_at()
        return Demand(
            leases_held=len(self._leases),
            on_demand=len(waiting) + len(fresh_leases),
            ensure_unloaded=sum(1 for w in self._waiters if w.kind == "ensure" and not w.request.loaded),
            idle_due=self._idle == "due",
            policy_suspended=self._idle == "suspended",
            grace=grace_end is not None and now < grace_end,
            grace_ended=grace_end is not None and now >= grace_end,  # the unload says so, rather than "mode"
            clip_pin=self._pin,
            chat_load_waiting=any(w.kind == "chat" and not w.request.unload for w in self._waiters),
            chat_load_bytes=max((w.request.needed_bytes for w in self._waiters if w.kind == "chat"
                                 and not w.request.unload), default=0) if self.settings.chat_takes_idle_vlm else 0,
            entering=self._mode != self._target,
        )

    def _send(self, step: PlannedStep, now: float, fx: list[Effect]) -> None:
        self._step_seq += 1
        step_id = f"{self._epoch}-{self._step_seq}"
        prev_unconfirmed = None if self._unconfirmed is None else _Unconfirmed(**vars(self._unconfirmed))
        prev_state = self._vlm_state if step.kind in (LOAD_VLM, UNLOAD_VLM) else self._clip_placement
        timeout = self.settings.step_timeout_s
        if step.kind == YIELD_CHAT:
            why = {"mode": f"mode {self._target}", "demand": "the VLM is wanted on demand",
                   "pin": "CLIP was placed by hand"}.get(step.cause, step.cause)
            message: Any = ChatYield(step.short_bytes, f"{step.description} ({why})")
            prev_state, timeout = self._chat_model or "", self.settings.chat_yield_timeout_s
            if step.nbytes:
                self._add_unconfirmed(step.nbytes, False)
        elif step.kind == LOAD_VLM:
            message = LoadVlm(step_id, self.settings.vlm_model)
            self._vlm_state = "loading"
        elif step.kind == UNLOAD_VLM:
            message = UnloadVlm(step_id, self.settings.vlm_model)
            # What Ollama reported it holds on the GPU (0 when it runs on the CPU); the footprint if never reported.
            nbytes = self._vlm_size_vram_bytes if self._vlm_size_bytes else self._vlm_fp
            self._add_unconfirmed(nbytes, True)
            self._vlm_state = "unloading"
        elif step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
            device = "cpu" if step.kind == MOVE_CLIP_CPU else "gpu"
            message = MoveClip(step_id, device)
            if device == "cpu" and self._clip_placement == "gpu":
                self._add_unconfirmed(self._clip_fp, False)
        else:
            baseline = self._unconfirmed.baseline_free_bytes if self._unconfirmed else self._baseline_free()
            expected = self._unconfirmed.expected_bytes if (self._unconfirmed and step.kind == CONFIRM_FREE) else 0
            message = WaitVramFree(step_id, baseline, expected, self.settings.recovery_fraction,
                                   self.settings.recovery_timeout_s)
        if step.kind in (CONFIRM_FREE, READ_VRAM):
            timeout = self.settings.recovery_timeout_s + min(timeout, 60.0)
        else:
            self._step_begins(now)
        if step.kind == LOAD_VLM:
            self._start_measure("vlm", self.settings.vlm_model, self.settings.num_ctx, self.settings.vlm_declared_bytes,
                                step_id, fx)
        elif step.kind == MOVE_CLIP_GPU and self._clip_placement != "gpu":
            declared = max(self.settings.clip_declared_bytes, self._clip_reported)
            self._start_measure("clip", self._clip_model or "clip", 0, declared, step_id, fx)
        self._inflight = _InFlight(step, step_id, message, now, now + timeout, prev_unconfirmed, prev_state)
        if step.kind in ALLOCATING_KINDS and self._vram_short is not None:
            self._set_vram_short(None, now, fx)
        fx.append(Log("step.sent", {"step": step.description, "step_id": step_id, "reason": step.cause}))
        fx.append(SendStep(STEP_TARGETS[step.kind], message))

    def _allocated(self, sent_at: float, completed_at: float, nbytes: int) -> None:
        """Mai claimed these bytes; readings taken before `completed_at` may not show them (uncertain until a
        reading after it arrives, asked for at once)."""
        self._allocs.append((sent_at, completed_at, nbytes))
        self._read_wanted = True

    def _add_unconfirmed(self, nbytes: int, vlm: bool) -> None:
        """Kept even while NVML is failing: if the GPU comes back, those bytes are confirmed before being used. The
        baseline is then the last GPU reading's free bytes (a host reading's are no baseline for VRAM): taken before
        the freeing, it can only err high, which makes the confirmation wait longer, never pass early."""
        if self._snapshot is not None and not self._snapshot.gpu_present and self._gpu_snapshot is None:
            return  # a machine that never had a GPU reading: there is no VRAM to confirm
        if self._unconfirmed is None:
            baseline = self._baseline_free() if self._gpu() is not False else self._gpu_snapshot.free_bytes
            self._unconfirmed = _Unconfirmed(baseline, 0, False)
        self._unconfirmed.expected_bytes += nbytes
        self._unconfirmed.includes_vlm = self._unconfirmed.includes_vlm or vlm
        self._unconfirmed.completed_at = None

    def _step_done(self, inflight: _InFlight, now: float, fx: list[Effect]) -> None:
        self._retry_after.pop(inflight.step.kind, None)
        self._steps_done.append((now, inflight.step.description))

    # --- the chat side of the gate --------------------------------------------------------------------------------

    def _serve_chat(self, plan: Plan, now: float, fx: list[Effect]) -> Plan:
        """Refuse the chat loads that cannot fit as soon as that is known for sure (the agent chooses its next model
        with the figure, so never on an estimate that may count an allocation twice); grant the oldest chat request
        when the mode has nothing to send (its steps go first) and no freed bytes wait for confirmation. Returns the
        plan, re-made if a grant changed what it projects."""
        gpu = self._gpu()
        waiting = [w for w in self._waiters if w.kind == "chat"]
        if not waiting or gpu is None:
            return plan  # nothing asked, or no reading yet to fit against
        world = self._world(now)
        grantable = grantable_bytes(world, plan)
        inflight = self._inflight
        exact = not gpu or not (world.uncertain_bytes or (
            inflight is not None and inflight.step.kind in ALLOCATING_KINDS + (CHAT_LOAD,)))
        for w in waiting:
            req: ChatNeeds = w.request
            if not req.unload and grantable is not None and req.needed_bytes > grantable and exact:
                self._waiters.remove(w)
                err = chat_refusal(req.model, req.needed_bytes, grantable, world, plan)
                fx.append(Reply(w.sender, Failure.from_error(req.request_id, err)))
                fx.append(Log("chat.refused", {"model": req.model, "needed_bytes": req.needed_bytes,
                                               "grantable_bytes": grantable, "request_id": req.request_id}))
        head = next((w for w in self._waiters if w.kind == "chat"), None)
        if head is None or self._inflight is not None or plan.next_step is not None:
            return plan
        unconfirmed = self._unconfirmed
        if gpu and not head.request.unload and ((unconfirmed is not None and (
                unconfirmed.expected_bytes or unconfirmed.includes_vlm)) or head.request.needed_bytes > grantable):
            return plan  # freed bytes are confirmed, or a stale estimate read again, first (the plan does both)
        self._grant_chat(head, grantable, now, fx)
        return self._plan(now)

    def _grant_chat(self, w: _Waiter, grantable: int | None, now: float, fx: list[Effect]) -> None:
        """The agent's turn at the gate: it unloads its model (if any) and loads the asked one, or only unloads."""
        self._waiters.remove(w)
        req: ChatNeeds = w.request
        self._step_seq += 1
        step_id = f"{self._epoch}-{self._step_seq}"
        prev_unconfirmed = None if self._unconfirmed is None else _Unconfirmed(**vars(self._unconfirmed))
        if req.unload:
            step = PlannedStep(CHAT_UNLOAD, f"unload chat {req.model}", self._chat_bytes, "chat")
            if self._chat_bytes:
                self._add_unconfirmed(self._chat_bytes, False)
        else:
            nbytes = req.needed_bytes if self._gpu() else 0
            step = PlannedStep(CHAT_LOAD, f"load chat {req.model}", nbytes, "chat")
        self._step_begins(now)
        if not req.unload and self._chat_model is None:  # a switch unloads first: its change is not the load's alone
            declared = self.settings.chat_declared_bytes.get(req.model, req.needed_bytes)
            self._start_measure("chat", req.model, req.context_length, declared, step_id, fx)
        # Without a GPU there is no VRAM limit: the grant is what was asked.
        message = ChatGrant(req.request_id, step_id, req.needed_bytes if grantable is None else grantable)
        self._inflight = _InFlight(step, step_id, message, now, now + self.settings.step_timeout_s, prev_unconfirmed,
                                   self._chat_model or "", chat_model=None if req.unload else req.model,
                                   chat_context=req.context_length)
        fx.append(Log("chat.granted", {"step": step.description, "step_id": step_id, "request_id": req.request_id,
                                       "needed_bytes": req.needed_bytes, "grantable_bytes": grantable,
                                       "waited_s": round(now - w.since, 3)}))
        fx.append(Reply(w.sender, message))

    def _answer_grantable(self, w: _Waiter, now: float, fx: list[Effect]) -> None:
        self._waiters.remove(w)
        world = self._world(now)
        grantable = grantable_bytes(world, self._plan(now))
        room = None if self._inflight is not None else room_bytes(world)
        fx.append(Log("chat.grantable", {"grantable_bytes": grantable, "room_bytes": room, "chat_model": self._chat_model,
                                         "chat_bytes": self._chat_bytes, "request_id": w.request.request_id}))
        fx.append(Reply(w.sender, Grantable(w.request.request_id, grantable, self._chat_model, room)))

    # --- settle helpers -------------------------------------------------------------------------------------------

    def _expire_leases(self, now: float, fx: list[Effect]) -> None:
        for lease in [l for l in self._leases.values() if l.expires_at <= now]:
            del self._leases[lease.lease_id]
            self._lease_ended(lease, now)
            fx.append(Log("lease.expired", {"lease_id": lease.lease_id, "holder": lease.holder,
                                            "held_s": round(now - lease.granted_at, 3)}))

    def _revoke_after_drain(self, now: float, fx: list[Effect]) -> None:
        """Entering a vlm=unloaded mode waits for older leases at most the drain timeout, then takes the VLM back."""
        deadline = self._drain_deadline()
        if deadline is None or now < deadline:
            return
        for lease in [l for l in self._leases.values() if l.granted_at <= self._target_set_at]:
            del self._leases[lease.lease_id]
            self._last_used_at = now
            fx.append(Log("lease.revoked", {"lease_id": lease.lease_id, "holder": lease.holder, "reason": "drain",
                                            "mode": self._target, "held_s": round(now - lease.granted_at, 3),
                                            "drain_s": self.settings.modes[self._target].lease_drain_timeout_s}))

    def _drain_deadline(self) -> float | None:
        policy = self.settings.modes[self._target]
        if policy.vlm != "unloaded" or self._mode == self._target:
            return None
        if not any(l.granted_at <= self._target_set_at for l in self._leases.values()):
            return None
        return self._target_set_at + policy.lease_drain_timeout_s

    def _watch_step(self, now: float, fx: list[Effect]) -> None:
        """A result that never comes (the executor died) must not freeze the gate: give the step up as unknown."""
        inflight = self._inflight
        if inflight is None or now < inflight.deadline:
            return
        self._inflight = None
        failure = Failure(inflight.step_id, Reason.TIMEOUT,
                          f"no result within {inflight.deadline - inflight.sent_at:g} s")
        self._step_failed(inflight, failure, now, fx)
        if inflight.step.kind in (LOAD_VLM, UNLOAD_VLM):
            self._vlm_state = "unknown"  # reconcile: wait for the loader's next observation
        elif inflight.step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU):
            self._clip_placement = self._clip_device = "unknown"

    def _expire_waiters(self, now: float, fx: list[Effect]) -> None:
        for w in [w for w in self._waiters if w.deadline <= now]:
            if w.kind == "grantable":
                self._answer_grantable(w, now, fx)  # still no reading: 0 bytes, rather than a turn left hanging
                continue
            plan = self._plan(now)
            pending = self._inflight.step.description if self._inflight else (plan.describe() or ("nothing",))[0]
            self._fail(w, Reason.TIMEOUT, f"{type(w.request).__name__} not done within {w.request.timeout_s:g} s; "
                                          f"pending: {pending}", fx)

    def _fail_fast_down(self, fx: list[Effect]) -> None:
        """While Ollama (or CLIP) is down, whoever needs it fails now with the reason, instead of at its timeout."""
        for w in list(self._waiters):
            if w.kind in ("lease", "ensure") and "vlm" in self._health:
                self._fail(w, Reason.BACKEND_UNREACHABLE, f"VLM unavailable: {self._health['vlm']}", fx)
            elif w.kind == "place" and "clip" in self._health:
                self._fail(w, Reason.NOT_RUNNING, f"CLIP unavailable: {self._health['clip']}", fx)

    def _check_idle(self, now: float, fx: list[Effect]) -> None:
        idle_at = self._idle_deadline()
        if idle_at is not None and now >= idle_at:
            self._idle = "due"
            fx.append(Log("vlm.idle", {"idle_s": round(now - self._last_used_at, 3),
                                       "idle_timeout_s": self.settings.idle_timeout_s}))

    def _idle_deadline(self) -> float | None:
        if self._idle is not None or self._vlm_state != "loaded" or self._leases:
            return None
        if any(w.kind == "lease" or (w.kind == "ensure" and w.request.loaded) for w in self._waiters):
            return None
        return self._last_used_at + self.settings.idle_timeout_s

    def _grace_end_at(self) -> float | None:
        """When the grace of an on-demand VLM in this mode ends (None: no grace applies, as no demand came since
        the target was set)."""
        policy = self.settings.modes[self._target]
        end = self._last_demand_end_at
        if policy.vlm != "unloaded" or policy.vlm_grace_s is None or end is None or end < self._target_set_at:
            return None
        grace = policy.vlm_grace_s
        if self.settings.keep_coresident_vlm and self._vlm_state == "loaded" and self._clip_placement == "gpu":
            grace = max(grace, self.settings.idle_timeout_s)  # both fit: co-resident until the idle timeout
        return end + grace

    def _grace_until(self, now: float) -> float | None:
        until = self._grace_end_at()
        return until if until is not None and now < until else None

    def _answer_satisfied(self, now: float, fx: list[Effect]) -> None:
        vlm_busy = self._inflight is not None and self._inflight.step.kind in (LOAD_VLM, UNLOAD_VLM)
        clip_busy = self._inflight is not None and self._inflight.step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU)
        model = self.settings.vlm_model
        vlm_usable = self._vlm_state == "loaded" and not vlm_busy and "vlm" not in self._health
        for w in list(self._waiters):
            if w.kind == "lease" and vlm_usable:
                self._waiters.remove(w)
                req: AcquireLease = w.request
                lease = _Lease(f"lease-{req.request_id}", req.holder, now, now + req.ttl_s)
                self._leases[lease.lease_id] = lease
                self._last_used_at = now
                fx.append(Log("lease.granted", {"lease_id": lease.lease_id, "holder": req.holder, "ttl_s": req.ttl_s,
                                                "waited_s": round(now - w.since, 3)}))
                fx.append(Reply(w.sender, LeaseGranted(req.request_id, lease.lease_id, model, self.settings.vlm_host,
                                                       self.settings.num_ctx, req.ttl_s)))
            elif w.kind == "ensure" and w.request.loaded and vlm_usable:
                self._waiters.remove(w)
                self._last_used_at = self._last_demand_end_at = now
                fx.append(Reply(w.sender, VlmReady(w.request.request_id, True, model, self._vlm_size_vram_bytes)))
            elif (w.kind == "ensure" and not vlm_busy and not w.request.loaded and self._vlm_state == "unloaded"
                  and not (self._unconfirmed and self._unconfirmed.includes_vlm and self._gpu())):
                self._waiters.remove(w)
                fx.append(Reply(w.sender, VlmReady(w.request.request_id, False, model, 0)))
            elif w.kind == "place" and not clip_busy and self._clip_placement == w.request.device:
                self._waiters.remove(w)
                fx.append(Reply(w.sender, ClipPlaced(w.request.request_id, self._clip_device)))
            elif w.kind == "grantable" and (self._gpu() is False or (self._gpu() and not self._allocs)):
                self._answer_grantable(w, now, fx)  # on a reading that shows every allocation (the plan reads one)

    def _refuse(self, plan: Plan, now: float, fx: list[Effect]) -> bool:
        """Fail whoever needs a refused step (invariant 12). True when that changed what is wanted."""
        changed = False
        for refusal in plan.refusals:
            err = InsufficientVram(refusal.message, needed_bytes=refusal.needed_bytes, free_bytes=refusal.free_bytes,
                                   evictable=refusal.evictable)
            for w in list(self._waiters):
                needs = (
                    (refusal.kind == LOAD_VLM and (w.kind == "lease" or (w.kind == "ensure" and w.request.loaded)))
                    or (refusal.kind == MOVE_CLIP_GPU and w.kind == "place" and w.request.device == "gpu")
                    or (w.kind == "mode" and refusal.cause == "mode" and w.request.mode == self._target)
                )
                if needs:
                    self._waiters.remove(w)
                    fx.append(Reply(w.sender, Failure.from_error(w.request.request_id, err)))
                    changed = changed or w.kind != "mode"
            if refusal.kind == MOVE_CLIP_GPU and refusal.cause == "pin":
                self._pin, changed = None, True
            self._publish_refusal(refusal, now, fx)
        return changed

    def _publish_refusal(self, refusal: Refusal, now: float, fx: list[Effect]) -> None:
        if refusal.key in self._refused:
            return
        self._refused = self._refused | {refusal.key}
        fx.append(Log("plan.refused", {"step": refusal.description, "needed_bytes": refusal.needed_bytes,
                                       "free_bytes": refusal.free_bytes, "reserve_bytes": refusal.reserve_bytes,
                                       "evictable": list(refusal.evictable), "cause": refusal.cause}))
        fx.append(Publish(PlanRefused(refusal.description, refusal.message, refusal.needed_bytes, refusal.free_bytes,
                                      at=now)))
        self._set_vram_short(f"VRAM short: {refusal.message}", now, fx)

    def _fail_blocked_modes(self, plan: Plan, fx: list[Effect]) -> None:
        """A mode waiter whose plan is held back by a step waiting on a part that is down fails fast with that reason
        (a blocked step that holds nothing back, plan rule 6, is not what keeps the mode from being reached)."""
        if plan.next_step is not None:
            return
        first = plan.holding_step or next((s for s in plan.steps if STEP_TARGETS[s.kind] in self._health), None)
        part = None if first is None else STEP_TARGETS[first.kind]
        if part not in self._health or part not in ("vlm", "clip"):
            return
        reason = Reason.BACKEND_UNREACHABLE if part == "vlm" else Reason.NOT_RUNNING
        for w in [w for w in self._waiters if w.kind == "mode"]:
            self._fail(w, reason, f"cannot {first.description}: {first.blocked}", fx)

    def _reach_target(self, now: float, fx: list[Effect]) -> None:
        if self._mode != self._target:
            previous, self._mode = self._mode, self._target
            steps = tuple(d for _, d in self._steps_done)
            duration = now - self._target_set_at
            fx.append(Log("mode.reached", {"mode": self._mode, "previous": previous, "duration_s": round(duration, 3),
                                           "steps": list(steps)}))
            fx.append(Publish(ModeChanged(self._mode, previous, duration, steps, at=now)))
        for w in [w for w in self._waiters if w.kind == "mode" and w.request.mode == self._mode]:
            self._waiters.remove(w)
            steps = tuple(d for t, d in self._steps_done if t >= w.since)
            fx.append(Reply(w.sender, ModeReached(w.request.request_id, self._mode, now - w.since, steps)))

    def _next_deadline(self, now: float) -> float | None:
        times = [w.deadline for w in self._waiters]
        times += [l.expires_at for l in self._leases.values()]
        times += [until for until, _ in self._retry_after.values()]
        times.append(self._evicted_until)
        for t in (self._idle_deadline(), self._grace_until(now), self._drain_deadline()):
            if t is not None:
                times.append(t)
        if self._inflight is not None:
            times.append(self._inflight.deadline)
        future = [t for t in times if t > now]
        return min(future) if future else None

    # --- small helpers ------------------------------------------------------------------------------------------------

    @property
    def _vlm_key(self) -> str:
        return footprint_key(self.settings.vlm_model, self.settings.num_ctx)

    @property
    def _vlm_fp(self) -> int:
        return self._learned.get(self._vlm_key, self.settings.vlm_declared_bytes)

    @property
    def _clip_key(self) -> str:
        return footprint_key(self._clip_model or "clip", 0)

    @property
    def _clip_fp(self) -> int:
        return self._learned.get(self._clip_key, self._clip_reported or self.settings.clip_declared_bytes)

    @property
    def _chat_key(self) -> str | None:
        return None if self._chat_model is None else footprint_key(self._chat_model, self._chat_context)

    def _measured(self, key: str) -> bool:
        """Shown as measured: learned, and a GPU reading exists (without one, every footprint is the declared one)."""
        return key in self._learned and self._gpu() is not False

    def _shown_fp(self, key: str, planned: int) -> int:
        return planned if self._gpu() is not False else self._declared_fp(key, planned)

    def _declared_fp(self, key: str, planned: int) -> int:
        if key == self._vlm_key:
            return self.settings.vlm_declared_bytes
        if key == self._clip_key:
            return self._clip_reported or self.settings.clip_declared_bytes
        return planned

    # --- measured footprints (mai.core.footprints) -------------------------------------------------------------------

    def _start_measure(self, part: str, model: str, context: int, declared: int, step_id: str,
                       fx: list[Effect]) -> None:
        """Keep the reading before this load if it is exact: a GPU reading taken after Mai's last VRAM change was
        reported done, with nothing Mai allocated or freed still waiting to show in it."""
        snap, self._measure = self._snapshot, None
        why = None
        if snap is None or not snap.gpu_present or self._gpu() is not True:
            why = "no GPU reading"
        elif self._allocs or self._unconfirmed is not None or snap.taken_at < self._last_change_at:
            why = "the last reading does not show all of Mai's earlier changes yet"
        if why is not None:
            fx.append(Log("footprint.not_measured", {"part": part, "model": model, "reason": why}))
            return
        self._measure = _Measure(part, model, context, declared, step_id, snap, self._owner(part, model))

    def _owner(self, part: str, model: str) -> Owner | None:
        """Whose processes a load by `part` grows (mai.core.attribution); None when the chat model's backend is not
        in the catalog."""
        if part == "vlm":
            return Owner.OLLAMA
        if part == "clip":
            return Owner.CLIP
        backend = self.settings.chat_backends.get(model)
        return Owner(backend) if backend in ("ollama", "lmstudio") else None

    def _step_begins(self, now: float) -> None:
        """Mai changes VRAM again: a reading from now on no longer shows the measured load alone."""
        m = self._measure
        if m is not None and m.completed_at is not None and m.next_step_at is None:
            m.next_step_at = now

    def _measured_step_done(self, step_id: str, now: float, floor_bytes: int = 0) -> None:
        if self._measure is not None and self._measure.step_id == step_id:
            self._measure.completed_at, self._measure.floor_bytes = now, floor_bytes

    def _drop_measure(self, step_id: str, why: str, fx: list[Effect]) -> None:
        m = self._measure
        if m is not None and m.step_id == step_id:
            self._measure = None
            fx.append(Log("footprint.not_measured", {"part": m.part, "model": m.model, "reason": why}))

    def _take_reading(self, snapshot: VramSnapshot, fx: list[Effect]) -> None:
        self._apply_snapshot(snapshot)
        self._check_vlm_gone(snapshot, snapshot.taken_at, fx)
        if self._reads_failing is not None:
            self._set_reads_failing(None, snapshot.taken_at, fx)
        m = self._measure
        if m is None or m.completed_at is None or snapshot.taken_at < m.completed_at:
            return  # nothing measured, or a reading from before the load was done
        self._measure = None
        if m.next_step_at is not None and snapshot.taken_at > m.next_step_at:
            fx.append(Log("footprint.not_measured", {"part": m.part, "model": m.model,
                                                     "reason": "Mai's next step began before a reading came"}))
            return
        verdict = judge_delta(m.before, snapshot, m.declared_bytes, m.owner, self._clip_pid, m.floor_bytes)
        if verdict.nbytes is None:
            fx.append(Log("footprint.rejected", {"part": m.part, "key": m.key, "reason": verdict.reason,
                                                 "declared_bytes": m.declared_bytes}))
            return
        nbytes = verdict.nbytes
        if self._chat_model == m.model and m.part == "chat":
            self._chat_bytes = nbytes
        if self._learned.get(m.key) == nbytes:
            return
        self._learned[m.key] = nbytes
        fx.append(Log("footprint.measured", {"part": m.part, "key": m.key, "nbytes": nbytes,
                                             "declared_bytes": m.declared_bytes, "reason": verdict.reason}))
        fx.append(PersistFootprint(m.key, nbytes))
        event = FootprintMeasured(m.part, m.model, m.context_length, nbytes, at=snapshot.taken_at)
        if m.part == "chat":
            fx.append(Tell("chat", event))  # the agent chooses its model by footprint

    def _gpu(self) -> bool | None:
        """True: a GPU to plan on (read by NVML, or by torch in the CLIP process where NVML is missing). False: the
        reading is host memory (psutil stands in: NVML and CUDA both unusable). None: no reading yet. A degraded
        `gpu` says where readings come from; it never turns the fit checks off (issue 12, hole 7)."""
        if self._snapshot is None:
            return None
        return self._snapshot.gpu_present

    def _fits_against(self, now: float) -> str:
        """Which reading the fit checks use, for status."""
        snap = self._snapshot
        if snap is None:
            return "no reading yet: chat loads and GPU steps wait for one"
        text = SOURCE_TEXT.get(snap.source, snap.source)
        if not snap.gpu_present:
            text += " (no GPU reading: chat grants are bounded by host memory)"
        if self._reads_failing is not None:
            text += f"; the last reading is {max(0.0, now - snap.taken_at):.0f} s old (readings failing)"
        return text

    def _free_estimate(self) -> int | None:
        """The last reading's free bytes minus what Mai allocated since it was taken; freed bytes count only once
        a reading shows them. Never more optimistic than the truth, whatever order readings arrive in."""
        if self._snapshot is None:
            return None
        return self._snapshot.free_bytes - sum(nbytes for _, _, nbytes in self._allocs)

    def _baseline_free(self) -> int:
        """Free VRAM before a freeing step, for the sampler's recovery check. Unlike the fit estimate it errs high
        (an allocation in progress when the reading was taken may already be in it): a high baseline can only make
        the confirmation wait longer, never pass before the bytes are back."""
        if self._snapshot is None:
            return 0
        taken = self._snapshot.taken_at
        return max(0, self._snapshot.free_bytes - sum(n for sent, _, n in self._allocs if sent > taken))

    def _apply_snapshot(self, snapshot: VramSnapshot) -> None:
        if self._snapshot is not None and snapshot.taken_at < self._snapshot.taken_at:
            return  # an older reading that arrived late
        back_from_host = self._snapshot is not None and not self._snapshot.gpu_present
        self._snapshot = snapshot
        self._fresh_snapshot = True
        if snapshot.gpu_present:
            self._gpu_snapshot = snapshot
            if back_from_host and self._unconfirmed is not None:
                # The first GPU reading after an outage: whatever changed meanwhile (a chat model unloaded, another
                # program quit) may be in it, so it is the baseline if higher. High errs safe: the confirmation may
                # end incomplete at its timeout, never pass on bytes something else gave back.
                u = self._unconfirmed
                u.baseline_free_bytes = max(u.baseline_free_bytes, snapshot.free_bytes)
        elif self._gpu_snapshot is None:
            self._unconfirmed = None  # no GPU ever read: nothing to confirm (NVML failing keeps them, see above)
        self._allocs = [a for a in self._allocs if a[1] > snapshot.taken_at]
        u = self._unconfirmed
        if u is not None and not u.includes_vlm and u.completed_at is not None and snapshot.taken_at > u.completed_at \
                and snapshot.gpu_present:
            self._unconfirmed = None  # a GPU reading taken after the freeing shows the freed bytes

    def _check_vlm_gone(self, snapshot: VramSnapshot, now: float, fx: list[Effect]) -> None:
        """A VLM whose server is gone (Ollama crashed: its runner went with it) and whose memory came back is not
        loaded (issue 12, hole 5): nothing is left to unload, and AUTOPILOT goes on. "Came back": the reading's free
        bytes rose by the recovery fraction of what the VLM held, over the lowest free seen with the VLM loaded since
        Mai's last change (the sampler usually shows the bytes back before the loader finds the server gone). A wrong
        guess costs nothing: every allocation is still fitted against the readings."""
        vlm_step = self._inflight is not None and self._inflight.step.kind in (LOAD_VLM, UNLOAD_VLM)
        if self._vlm_state != "loaded":
            self._vlm_low_free = None
        if self._vlm_state != "loaded" or vlm_step or self._gpu() is not True or snapshot is not self._snapshot:
            return
        since, low = self._last_change_at, self._vlm_low_free
        if snapshot.taken_at >= since:  # a reading from before Mai's last change shows another placement
            fresh = low is None or low[0] != since
            self._vlm_low_free = low = (since, snapshot.free_bytes if fresh else min(low[1], snapshot.free_bytes))
        if "vlm" not in self._health or low is None or low[0] != since:
            return
        held = self._vlm_size_vram_bytes if self._vlm_size_bytes else self._vlm_fp
        back = snapshot.free_bytes - low[1]
        if back < self.settings.recovery_fraction * held:
            return
        self._vlm_state, self._vlm_size_bytes, self._vlm_size_vram_bytes = "unloaded", 0, 0
        self._vlm_low_free = None
        self._vlm_gone_guessed = True
        self._last_change_at = self._last_used_at = now
        fx.append(Log("vlm.gone", {"model": self.settings.vlm_model, "reason": "server_gone_memory_back",
                                   "back_bytes": back, "held_bytes": held, "health": self._health["vlm"]}))
        fx.append(Publish(PlacementChanged("vlm", "unloaded", "server_gone", at=now)))

    def _set_health(self, part: str, reason: str | None, now: float, fx: list[Effect]) -> None:
        was = self._health.get(part)
        if reason is None and was is not None:
            del self._health[part]
            fx.append(Log("part.recovered", {"part": part}))
            fx.append(Publish(Recovered(part, at=now)))
        elif reason is not None and reason != was:
            self._health[part] = reason
            fx.append(Log("part.degraded", {"part": part, "reason": reason}))
            fx.append(Publish(Degraded(part, reason, at=now)))

    def _set_reads_failing(self, reason: str | None, now: float, fx: list[Effect]) -> None:
        """The sampler's reads failing (or readable again) show as a degraded GPU; said once per change."""
        if reason is None:
            self._read_failures = 0
            self._retry_after.pop(READ_VRAM, None)
            self._retry_after.pop(CONFIRM_FREE, None)
        if (reason is None) == (self._reads_failing is None):
            self._reads_failing = reason
            return
        self._reads_failing = reason
        fx.append(Log("vram.reads_failing" if reason else "vram.reads_recovered", {"reason": reason or "a reading came"}))
        if "gpu" in self._health:
            return  # the sampler's own report is what status shows
        fx.append(Publish(Degraded("gpu", reason, at=now) if reason else Recovered("gpu", at=now)))

    def _set_vram_short(self, reason: str | None, now: float, fx: list[Effect]) -> None:
        if reason == self._vram_short:
            return
        self._vram_short = reason
        if "gpu" in self._health:
            return  # the GPU's own degradation is what status shows
        fx.append(Publish(Degraded("gpu", reason, at=now) if reason else Recovered("gpu", at=now)))

    def _set_evicted_note(self, note: str | None, now: float, fx: list[Effect]) -> None:
        """Reloads held back after repeated evictions show as a degraded VLM until one sticks."""
        if note == self._evicted_note:
            return
        self._evicted_note = note
        if "vlm" in self._health:
            return  # Ollama's own unreachability is what status shows
        fx.append(Publish(Degraded("vlm", note, at=now) if note else Recovered("vlm", at=now)))

    def _degraded(self) -> tuple[tuple[str, str], ...]:
        parts = dict(self._health)
        if self._reads_failing and "gpu" not in parts:
            parts["gpu"] = self._reads_failing
        if self._vram_short and "gpu" not in parts:
            parts["gpu"] = self._vram_short
        if self._evicted_note and "vlm" not in parts:
            parts["vlm"] = self._evicted_note
        return tuple(sorted(parts.items()))

    def _lease_ended(self, lease: _Lease, now: float) -> None:
        self._last_used_at = now
        if lease.granted_at > self._target_set_at:  # an on-demand lease of this mode (older ones drain)
            self._last_demand_end_at = now

    def _new_vlm_demand(self, now: float) -> None:
        self._idle = None
        self._last_used_at = now
        self._retry_after.pop(LOAD_VLM, None)
        self._retry_after.pop(MOVE_CLIP_CPU, None)
        self._retry_after.pop(YIELD_CHAT, None)

    def _fail(self, w: _Waiter, reason: Reason, message: str, fx: list[Effect], details: dict | None = None) -> None:
        if w in self._waiters:
            self._waiters.remove(w)
        if w.kind == "place" and reason not in (Reason.TIMEOUT, Reason.SUPERSEDED) and self._pin == w.request.device:
            self._pin = None  # a manual placement that cannot happen is dropped, not retried until the next SetMode
        pairs = tuple((str(k), str(v)) for k, v in (details or {}).items())
        fx.append(Reply(w.sender, Failure(w.request.request_id, reason, message, pairs)))
        fx.append(Log("request.failed", {"request": type(w.request).__name__, "request_id": w.request.request_id,
                                         "reason": reason.value, "message": message}))

    def _invalid_mode(self, request_id: str, mode: str) -> Failure:
        accepted = ", ".join(sorted(self.settings.modes))
        return Failure(request_id, Reason.INVALID_REQUEST, f"unknown mode {mode!r}; accepted: {accepted}",
                       (("field", "mode"), ("value", mode), ("accepted", accepted)))

    def _unknown(self, message: object, sender: object) -> list[Effect]:
        name = type(message).__name__
        request_id = getattr(message, "request_id", None)
        if isinstance(request_id, str):
            return [Reply(sender, Failure(request_id, Reason.INVALID_REQUEST,
                                          f"the coordinator does not handle {name}; accepted: {ACCEPTED}"))]
        return [Log("coordinator.unknown_message", {"type": name})]


def _placement(device: str) -> str:
    """A device string ("cpu", "cuda:0", "sim-gpu", "unknown") as a placement the plan reasons about."""
    if device == "cpu":
        return "cpu"
    if device in ("", "unknown"):
        return "unknown"
    return "gpu"
