"""The GPU gate's planner: given what the world looks like and what is wanted, the ordered steps still to run.

A pure function, recomputed after every request and every step result (level-triggered, so a dropped message or a
restart never leaves a stale plan behind). The coordinator sends the first step when it is not blocked; the rest
is what `mai status` shows as "plan in progress".

The rules, in the order they are applied:
1. Goals. The VLM is wanted on demand (a lease held since the target was set, a lease queued, an EnsureVlm(loaded)
   waiting) before anything else (invariant 9); then an EnsureVlm(unloaded); then the idle timer; then a chat load
   that fits nowhere else (an idle VLM — no lease held or asked for — gives it its place, rather than a user's turn
   failing); then the autopilot grace; then the mode's policy. CLIP follows a manual pin, else the policy; without a
   GPU it stays on the CPU.
2. Yield. If the VLM is wanted and the VLM and CLIP do not both fit, CLIP yields to the CPU (unless pinned) — but
   only when that makes the VLM fit (counting what the chat model would give back); otherwise CLIP keeps its place
   and the VLM load is refused. The chat model yields before CLIP does: Mai's own parts win over chat.
3. Order (invariant 3). Freeing steps first (CLIP to the CPU, the VLM unload, a chat yield), then a confirmation
   that the VRAM really came back (after every unload — invariant 4 — and before any allocating step relies on freed
   bytes), then allocating steps (VLM load, then CLIP to the GPU). A freeing step starts from a fresh reading, the
   baseline its confirmation is measured against.
4. Fit (invariant 12). An allocating step is planned only if its footprint fits in the estimated free VRAM minus
   the reserve. When it does not and the estimate is stale, the plan reads the VRAM again first; when it would fit
   with the chat model's bytes, the chat model is asked to yield them (a freeing step, confirmed like the others);
   otherwise the step is refused with the bytes needed, the bytes free and what could yield.
5. Chat. While a chat model load waits for the gate, freed bytes are confirmed first; while the chat agent waits
   on a figure a stale estimate cannot give, the VRAM is read again once the mode has nothing to send.
6. Blocks. A step whose part is unknown (not observed yet), down (degraded), backing off after a failure, or —
   for an unload — held by a lease, stays in the plan but is marked blocked. A blocked step holds back only what
   needs it: nothing is sent past a blocked step that frees bytes the plan counts on, or that allocates; a blocked
   step that frees nothing counted (CLIP not heard from yet: a fresh mover starts on the CPU, and readings show
   whatever a CLIP on the GPU holds) is passed. A part that is down and holds nothing on the GPU (CLIP whose model
   could not be created) needs no step at all; a VLM load that would fit only if a CLIP not heard from yet left
   the GPU waits for the mover's report rather than being refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from messages.errors import MaiError, Reason

VLM_STATES = ("unknown", "unloaded", "loading", "loaded", "unloading")
CLIP_PLACEMENTS = ("unknown", "cpu", "gpu")
VLM_POLICIES = ("loaded", "unloaded", "keep")
CLIP_POLICIES = ("gpu", "cpu", "keep")

# Step kinds, in the only order they may appear in a plan.
MOVE_CLIP_CPU = "move_clip_cpu"
UNLOAD_VLM = "unload_vlm"
YIELD_CHAT = "yield_chat"  # ChatYield: the conversation agent unloads its chat model for a step of the mode
CONFIRM_FREE = "confirm_free"  # WaitVramFree after freeing: the sampler confirms the bytes came back
READ_VRAM = "read_vram"  # WaitVramFree expecting nothing: a fresh reading before refusing on a stale estimate
LOAD_VLM = "load_vlm"
MOVE_CLIP_GPU = "move_clip_gpu"
FREEING_KINDS = (MOVE_CLIP_CPU, UNLOAD_VLM, YIELD_CHAT)
ALLOCATING_KINDS = (LOAD_VLM, MOVE_CLIP_GPU)
SAMPLER_KINDS = (CONFIRM_FREE, READ_VRAM)


def gib(nbytes: int | float) -> str:
    """Bytes as GiB for people: '5.6 GB' (GiB, as nvidia-smi and Ollama print them)."""
    return f"{nbytes / 2**30:.1f} GB"


@dataclass(frozen=True)
class ModePolicy:
    """One row of the configurable mode table (`config/default.yaml`, `modes:`)."""

    vlm: str  # "loaded" | "unloaded" | "keep"
    clip: str  # "gpu" | "cpu" | "keep"
    lease_drain_timeout_s: float = 10.0  # entering a vlm=unloaded mode waits this long for older leases, then revokes
    vlm_grace_s: float | None = None  # vlm=unloaded: keep an on-demand VLM this long after its last lease ended

    def __post_init__(self) -> None:
        problems = []
        if self.vlm not in VLM_POLICIES:
            problems.append(f"vlm: got {self.vlm!r}; accepted: {', '.join(VLM_POLICIES)}")
        if self.clip not in CLIP_POLICIES:
            problems.append(f"clip: got {self.clip!r}; accepted: {', '.join(CLIP_POLICIES)}")
        if not isinstance(self.lease_drain_timeout_s, (int, float)) or self.lease_drain_timeout_s < 0:
            problems.append(f"lease_drain_timeout_s: got {self.lease_drain_timeout_s!r}; accepted: a number >= 0")
        if self.vlm_grace_s is not None and (not isinstance(self.vlm_grace_s, (int, float)) or self.vlm_grace_s < 0):
            problems.append(f"vlm_grace_s: got {self.vlm_grace_s!r}; accepted: a number >= 0 or None")
        if problems:
            raise MaiError("ModePolicy " + "; ".join(problems), reason=Reason.INVALID_CONFIG)


@dataclass(frozen=True)
class World:
    """What the coordinator believes about the GPU and its tenants, projected past the step in flight."""

    vlm_model: str
    vlm_state: str  # VLM_STATES
    vlm_footprint_bytes: int  # learned (measured) or declared
    clip_placement: str  # CLIP_PLACEMENTS
    clip_footprint_bytes: int
    reserve_bytes: int
    gpu: bool | None  # True: plan on a GPU; False: none (no fit checks, CLIP on the CPU); None: no reading yet
    free_bytes: int | None  # estimated free VRAM now; None without a reading
    uncertain_bytes: int = 0  # free VRAM the estimate may miss (allocations since a reading that may show them)
    unconfirmed_bytes: int = 0  # freed by finished steps, not yet seen back by the sampler
    unconfirmed_vlm: bool = False  # ...and those include a VLM unload (always confirmed: invariant 4)
    down: Mapping[str, str] = field(default_factory=dict)  # part ("vlm", "clip") -> why it cannot take steps
    retry_wait: Mapping[str, str] = field(default_factory=dict)  # step kind -> why it waits before a retry
    chat_model: str | None = None  # the conversation agent's model, if it holds one
    chat_bytes: int = 0  # VRAM that chat model holds: what a chat yield gives back (0: unknown or none)
    vlm_idle: bool = False  # the VLM is loaded with no lease held or asked for: it may give its place to chat
    chat_min_bytes: int = 0  # the smallest chat model's footprint: below this, chat counts an idle VLM's bytes
    chat_leaves_room: bool = False  # a chat model leaves the VLM and CLIP their room while one still fits beside


@dataclass(frozen=True)
class Demand:
    """What clients want right now, as counts and flags the coordinator derives from its waiters and timers."""

    leases_held: int = 0  # every held lease: the VLM is never unloaded while one is held (invariant 8)
    on_demand: int = 0  # leases held since the target was set + lease requests queued + EnsureVlm(loaded) waiting
    ensure_unloaded: int = 0  # EnsureVlm(loaded=False) waiting
    idle_due: bool = False  # the idle timer ran out: unload
    policy_suspended: bool = False  # after an idle unload, a "loaded" policy waits for new demand or a new SetMode
    grace: bool = False  # an on-demand VLM is within its grace period after the last lease ended
    grace_ended: bool = False  # ...and that grace has run out (the unload says so, rather than "mode")
    clip_pin: str | None = None  # manual PlaceClip placement, until the next SetMode
    chat_load_waiting: bool = False  # a chat model load waits for the gate: freed bytes are confirmed first
    chat_needs_reading: bool = False  # the chat agent waits on a figure a stale estimate cannot give: read again
    chat_load_bytes: int = 0  # the largest chat load waiting (0: none, or chat may not take an idle VLM's place)
    entering: bool = False  # the target mode is not reached yet: a vlm=loaded mode's VLM gives chat no place yet


@dataclass(frozen=True)
class Goal:
    state: str  # VLM: loaded/unloaded/keep; CLIP: gpu/cpu/keep
    reason: str  # mode, demand, ensure, idle, grace, grace_ended, pin, yield, no_gpu, chat


@dataclass(frozen=True)
class PlannedStep:
    kind: str
    description: str  # for people: "unload qwen2.5vl:7b", "confirm VRAM recovered", "move CLIP to gpu"
    nbytes: int  # VRAM the step frees or claims (0 for sampler steps and without a GPU)
    cause: str  # the goal's reason: why this step is in the plan
    blocked: str | None = None  # why it cannot be sent yet
    short_bytes: int = 0  # a chat yield: how many bytes the step it makes room for lacks without it

    def describe(self) -> str:
        return f"{self.description} ({self.blocked})" if self.blocked else self.description


@dataclass(frozen=True)
class Refusal:
    """An allocating step left out because it would not fit (invariant 12): never attempted blind."""

    kind: str
    description: str
    needed_bytes: int
    free_bytes: int
    reserve_bytes: int
    evictable: tuple[str, ...]
    cause: str

    @property
    def message(self) -> str:
        text = (
            f"{self.description} needs {gib(self.needed_bytes)}, {gib(self.free_bytes)} free "
            f"with {gib(self.reserve_bytes)} reserved"
        )
        return text + (f"; could yield: {', '.join(self.evictable)}" if self.evictable else "; nothing Mai holds could yield")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.needed_bytes, self.free_bytes)


@dataclass(frozen=True)
class Plan:
    vlm_goal: Goal
    clip_goal: Goal
    steps: tuple[PlannedStep, ...]
    refusals: tuple[Refusal, ...] = ()
    notes: tuple[str, ...] = ()  # decisions worth a log line (why CLIP yields)

    @property
    def next_step(self) -> PlannedStep | None:
        """The step to send now, if any: the first one not blocked, unless a blocked step before it holds it back."""
        step = self._first_holding()
        return step if step is not None and step.blocked is None else None

    @property
    def holding_step(self) -> PlannedStep | None:
        """The blocked step that keeps the plan from going on (None when a step can be sent, or none is left)."""
        step = self._first_holding()
        return step if step is not None and step.blocked is not None else None

    def _first_holding(self) -> PlannedStep | None:
        """Rule 6: a blocked step that frees nothing the plan counts on holds nothing back."""
        return next((s for s in self.steps if not (s.blocked and s.kind in FREEING_KINDS and s.nbytes == 0)), None)

    @property
    def done(self) -> bool:
        return not self.steps and not self.refusals

    def describe(self) -> tuple[str, ...]:
        return tuple(s.describe() for s in self.steps) + tuple(f"refused: {r.message}" for r in self.refusals)


def resolve_vlm(policy: ModePolicy, demand: Demand) -> Goal:
    """Where the VLM should be. On demand beats everything (a lease asked in AUTOPILOT loads it); a held lease
    keeps it (it counts as demand only if granted since the target was set — older ones drain)."""
    if demand.on_demand:
        return Goal("loaded", "demand")
    if demand.ensure_unloaded:
        return Goal("unloaded", "ensure")
    if demand.idle_due:
        return Goal("unloaded", "idle")
    if demand.grace:
        return Goal("keep", "grace")
    if demand.grace_ended and policy.vlm == "unloaded":
        return Goal("unloaded", "grace_ended")
    if policy.vlm == "loaded" and demand.policy_suspended:
        return Goal("keep", "idle")
    return Goal(policy.vlm, "mode")


def resolve_clip(policy: ModePolicy, demand: Demand, world: World) -> Goal:
    """Where CLIP should be, before the yield rule. Without a GPU there is only the CPU."""
    if world.gpu is False:
        return Goal("cpu", "no_gpu")
    if demand.clip_pin is not None:
        return Goal(demand.clip_pin, "pin")
    return Goal(policy.clip, "mode")


def vlm_yields_to_chat(world: World, clip_goal: Goal, demand: Demand) -> bool:
    """A chat load waits that would fit in the VLM's place, not even the smallest chat model fits beside it, and
    nobody uses the VLM: it goes (and stays off while that load waits). The room counts what CLIP still has to claim
    (the mode's part wins)."""
    if not demand.chat_load_bytes or not world.chat_min_bytes or demand.on_demand or demand.leases_held \
            or not world.gpu or world.free_bytes is None:
        return False  # chat_min_bytes 0 (no catalog figure): the rule is off
    vlm_on = world.vlm_state in ("loaded", "loading")
    if vlm_on and not world.vlm_idle:
        return False
    clip_claim = world.clip_footprint_bytes if clip_goal.state == "gpu" and world.clip_placement != "gpu" else 0
    room = world.free_bytes + world.unconfirmed_bytes - world.reserve_bytes + world.chat_bytes - clip_claim
    beside_vlm = room - (0 if vlm_on else world.vlm_footprint_bytes)
    return beside_vlm < min(demand.chat_load_bytes, world.chat_min_bytes) \
        and demand.chat_load_bytes <= beside_vlm + world.vlm_footprint_bytes


def plan_steps(world: World, policy: ModePolicy, demand: Demand) -> Plan:
    """The ordered steps from `world` to what `policy` and `demand` want (see the module docstring)."""
    vlm_goal = resolve_vlm(policy, demand)
    clip_goal = resolve_clip(policy, demand, world)
    # Invariant 1 holds when a mode is entered: a VLM the mode loads gives chat its place only once the mode is reached.
    entering_with_vlm = demand.entering and policy.vlm == "loaded"
    if vlm_goal.reason not in ("demand", "ensure", "idle") and not entering_with_vlm \
            and vlm_yields_to_chat(world, clip_goal, demand):
        vlm_goal = Goal("unloaded", "chat")
    notes: list[str] = []
    vlm_fp, clip_fp, reserve = world.vlm_footprint_bytes, world.clip_footprint_bytes, world.reserve_bytes
    vlm_on = world.vlm_state in ("loaded", "loading")
    vlm_off = world.vlm_state in ("unloaded", "unloading")
    clip_on_gpu = world.clip_placement == "gpu"
    clip_wants_gpu = clip_goal.state == "gpu" or (clip_goal.state == "keep" and clip_on_gpu)

    unsure = world.uncertain_bytes
    chat_left = world.chat_bytes if world.gpu else 0  # what a chat yield would still give back
    read_first = False  # a fresh reading could change the decision: read the VRAM again (or confirm) first
    vlm_kept = vlm_goal.state == "loaded" or (vlm_goal.state == "keep" and vlm_on)
    # A VLM that is down cannot take the room CLIP would give it (rule 6): CLIP keeps its place.
    if world.gpu and world.free_bytes is not None and vlm_kept and clip_wants_gpu and clip_goal.reason != "pin" \
            and "vlm" not in world.down:
        room = world.free_bytes + world.unconfirmed_bytes - reserve
        need = (0 if vlm_on else vlm_fp) + (0 if clip_on_gpu else clip_fp)  # besides what is on the GPU now
        room_alone = room + (clip_fp if clip_on_gpu else 0)  # if CLIP leaves, the VLM alone has this
        # Cheapest first: a fresh reading, then the chat model's bytes, then CLIP's place; read again whenever a
        # reading could spare an eviction.
        if need > room:
            if need <= room + unsure:
                read_first = True
            elif need <= room + chat_left:
                pass  # the chat model yields (below) and both fit: CLIP keeps its place
            elif need <= room + chat_left + unsure:
                read_first = True
            elif vlm_on or vlm_fp <= room_alone + chat_left:
                clip_goal = Goal("cpu", "yield")
                notes.append(
                    f"CLIP yields to the CPU: VLM {gib(vlm_fp)} + CLIP {gib(clip_fp)} do not both fit "
                    f"(free {gib(world.free_bytes)}, reserve {gib(reserve)})"
                )
            elif vlm_fp <= room_alone + chat_left + unsure:
                read_first = True
    clip_wants_gpu = clip_goal.state == "gpu" or (clip_goal.state == "keep" and clip_on_gpu)

    freeing: list[PlannedStep] = []
    planned_freed = 0
    clip_unheard = world.clip_placement == "unknown" and "clip" not in world.down  # may yet report the GPU
    if clip_goal.state == "cpu" and world.clip_placement == "unknown" and "clip" in world.down:
        notes.append(f"no CLIP move to the CPU: CLIP is down and holds nothing on the GPU ({world.down['clip']})")
    elif clip_goal.state == "cpu" and world.clip_placement in ("gpu", "unknown"):
        nbytes = clip_fp if (world.gpu and clip_on_gpu) else 0
        freeing.append(PlannedStep(MOVE_CLIP_CPU, "move CLIP to cpu", nbytes, clip_goal.reason))
        planned_freed += nbytes
    # Ollama down since before anything was seen: nothing is known to unload, and nothing could be; the mode goes on
    # without it (CLIP is fitted against real readings, which show whatever Ollama may still hold). A VLM known to
    # be loaded stays a blocked unload: its bytes are Mai's to give back once Ollama answers.
    vlm_unreachable_unknown = world.vlm_state == "unknown" and "vlm" in world.down
    if vlm_goal.state == "unloaded" and vlm_unreachable_unknown:
        notes.append(f"no VLM unload: {world.vlm_model} was never seen and the VLM is down ({world.down['vlm']})")
    elif vlm_goal.state == "unloaded" and not vlm_off:
        nbytes = vlm_fp if world.gpu else 0
        freeing.append(PlannedStep(UNLOAD_VLM, f"unload {world.vlm_model}", nbytes, vlm_goal.reason))
        planned_freed += nbytes

    allocating: list[PlannedStep] = []
    refusals: list[Refusal] = []
    avail = None
    if world.free_bytes is not None:
        avail = world.free_bytes + world.unconfirmed_bytes + planned_freed - reserve

    def fits(kind: str, description: str, needed: int, cause: str, evictable: tuple[str, ...]) -> bool:
        nonlocal avail, read_first, chat_left
        if not world.gpu or avail is None:
            return True  # no GPU: nothing to fit; no reading yet: the step is blocked until one arrives
        if needed <= avail:
            avail -= needed
            return True
        if needed <= avail + unsure:
            read_first = True  # never refuse (or evict) on a guess: read again (or confirm) first
        elif chat_left and needed <= avail + chat_left:
            freeing.append(PlannedStep(YIELD_CHAT, f"yield chat {world.chat_model} for {description}", chat_left,
                                       cause, short_bytes=needed - avail))
            avail, chat_left = avail + chat_left - needed, 0
            return True
        elif needed <= avail + chat_left + unsure:
            read_first = True  # a reading may show enough room for the yield to make up the rest
        else:
            if chat_left:
                evictable += (f"chat {world.chat_model}",)
            refusals.append(Refusal(kind, description, needed, max(0, avail + reserve), reserve, evictable, cause))
        return False

    if vlm_goal.state == "loaded" and not vlm_on and not read_first:
        evictable = ("clip",) if clip_on_gpu and clip_wants_gpu else ()
        description = f"load {world.vlm_model}"
        # Unknown (a restarted coordinator): it may be loaded, its bytes in the reading. Unknown or down: blocked
        # (rule 6), and nothing yields, is refused or is read again for it until then. CLIP not heard from yet may
        # be on the GPU (a restarted coordinator): a load short of room waits for it.
        waits_for_clip = clip_unheard and clip_goal.state == "cpu" and world.gpu and avail is not None \
            and vlm_fp > avail + unsure
        if waits_for_clip:
            allocating.append(PlannedStep(LOAD_VLM, description, vlm_fp, vlm_goal.reason,
                                          blocked="CLIP placement unknown: the load fits only if CLIP leaves the GPU"))
        elif world.vlm_state == "unknown" or "vlm" in world.down \
                or fits(LOAD_VLM, description, vlm_fp, vlm_goal.reason, evictable):
            allocating.append(PlannedStep(LOAD_VLM, description, vlm_fp if world.gpu else 0, vlm_goal.reason))
    if clip_wants_gpu and world.clip_placement in ("cpu", "unknown") and world.gpu is not False and not read_first:
        will_have_vlm = (vlm_on and vlm_goal.state != "unloaded") or any(s.kind == LOAD_VLM for s in allocating)
        evictable = ("vlm",) if will_have_vlm else ()
        if world.clip_placement == "unknown" or "clip" in world.down or fits(
                MOVE_CLIP_GPU, "move CLIP to gpu", clip_fp, clip_goal.reason, evictable):
            allocating.append(PlannedStep(MOVE_CLIP_GPU, "move CLIP to gpu", clip_fp, clip_goal.reason))

    relies_on_freed = bool(allocating) or read_first or demand.chat_load_waiting
    steps = [_block(s, world, demand) for s in _order(world, freeing, allocating, read_first, relies_on_freed)]
    reads_back_off = READ_VRAM in world.retry_wait  # the sampler cannot read: freeing steps go on without one
    if steps and steps[0].kind in FREEING_KINDS and steps[0].blocked is None and world.gpu and unsure \
            and not reads_back_off:
        # The sampler confirms a freeing step against the free VRAM before it: make that a real reading.
        steps.insert(0, PlannedStep(READ_VRAM, "read VRAM again", 0, "baseline"))
    elif demand.chat_needs_reading and world.gpu and unsure and all(s.blocked for s in steps):
        # The chat agent is answered on a reading, never on a guess; the mode's own steps go first.
        steps.insert(0, _block(PlannedStep(READ_VRAM, "read VRAM again", 0, "chat"), world, demand))
    return Plan(vlm_goal, clip_goal, tuple(steps), tuple(refusals), tuple(notes))


def _order(world: World, freeing: list[PlannedStep], allocating: list[PlannedStep], read_first: bool,
           relies_on_freed: bool) -> list[PlannedStep]:
    """Freeing, confirm, allocating. A finished VLM unload is confirmed before anything else happens (invariant 4);
    other freed bytes are confirmed only when an allocation (the mode's, or a chat load waiting) will rely on them."""
    if world.gpu is False:
        return freeing + allocating  # no VRAM to confirm or to fit
    confirm = PlannedStep(CONFIRM_FREE, "confirm VRAM recovered", 0, "order")
    steps: list[PlannedStep] = [confirm] if world.unconfirmed_vlm else []
    # A step that frees nothing counted (CLIP not heard from yet) leaves nothing to confirm.
    pending_freed = any(s.nbytes or s.kind == UNLOAD_VLM for s in freeing) or (
        world.unconfirmed_bytes > 0 and not world.unconfirmed_vlm)
    steps += freeing
    if pending_freed and (any(s.kind == UNLOAD_VLM for s in freeing) or relies_on_freed):
        steps.append(confirm)
    elif read_first and not steps:
        steps.append(PlannedStep(READ_VRAM, "read VRAM again", 0, "fit"))
    return steps + allocating


def _block(step: PlannedStep, world: World, demand: Demand) -> PlannedStep:
    """Mark why a step cannot be sent yet; the plan keeps it so status and ModeAccepted show what is pending."""
    reason = None
    part = "vlm" if step.kind in (LOAD_VLM, UNLOAD_VLM) else "clip" if step.kind in (MOVE_CLIP_CPU, MOVE_CLIP_GPU) else None
    if part is not None and part in world.down:  # the cause the user can act on (start Ollama) comes first
        reason = f"{part} unavailable: {world.down[part]}"
    elif part == "vlm" and world.vlm_state == "unknown":
        reason = "VLM state unknown: waiting for the loader's observation"
    elif part == "clip" and world.clip_placement == "unknown":
        reason = "CLIP placement unknown: waiting for the mover's observation"
    elif step.kind in world.retry_wait:
        reason = world.retry_wait[step.kind]
    elif step.kind == UNLOAD_VLM and demand.leases_held:
        reason = f"waiting for {demand.leases_held} lease(s) to end"
    elif world.gpu is None:
        reason = "waiting for the first VRAM reading"
    if reason is None:
        return step
    return replace(step, blocked=reason)
