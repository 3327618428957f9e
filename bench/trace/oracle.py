"""The offline oracle: a scheduler that knows the whole trace in advance, as the lower bound to measure against.

What it may do, that no online policy can:
- Know when every future request will be sent (its nominal time in the trace; a request sent later because its
  client was still busy is only easier) and so prefetch: load a model, or move CLIP, ahead of its next use.
- Evict Belady-style: the models it keeps are those whose next use (less the time it takes to bring them back) is
  soonest, as many as fit; what it evicts is what is needed furthest in the future.
- Use the whole GPU: no reserve (it knows every footprint exactly), only what the desktop really holds.
- Serve a chat turn with whatever chat model is loaded (no switch for quality); when it loads one, the best of the
  chain that fits beside the models needed sooner, else the smallest.
- With `squeeze=True`: run a chat turn that would have to evict a model needed before the turn ends squeezed beside
  it instead (CLIP still yields its place): the smallest chat model, partially offloaded, as llama.cpp allows anyone.
What it may not do: anything the physics forbid the others — the same load, unload, move and release times, one
VRAM-changing operation at a time, no model evicted while a request runs on it, nothing over capacity; without
`squeeze` it never loads a model partially offloaded (it waits for room).

Whether squeezing pays depends on the whole day, so an oracle row of the table is the better of both schedules
(`bench.trace.report.BestOf`), and the unconstrained oracle's row also counts the schedule held to Mai's rules (one
it may follow too). It is a heuristic, not a proof of optimality (the exact offline problem with sizes, load times
and prefetch is a hard scheduling problem): every run checks that no policy beats it and says so in the table if one
does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bench.trace.engine import Scheduler, Slot
from bench.trace.params import Params

if TYPE_CHECKING:
    from bench.trace.runner import Job
    from bench.trace.trace import Trace

ITEMS = ("vlm", "clip", "chat")


class Oracle(Scheduler):
    name = "oracle (offline)"

    def __init__(self, params: Params, trace: "Trace", squeeze: bool = False) -> None:
        super().__init__(params, trace)
        self.squeeze = squeeze
        self._times: dict[str, list[float]] = {k: [] for k in ITEMS}
        self._index: dict[int, tuple[str, int]] = {}
        for request in trace.requests:
            if request.kind in ITEMS:
                self._index[id(request)] = (request.kind, len(self._times[request.kind]))
                self._times[request.kind].append(request.at_s)
        self._next = {k: 0 for k in ITEMS}  # the next request of each kind not sent yet
        self.chat_target: Slot | None = None
        self.committed: str | None = None  # the item evictions were made for, until it is on the GPU
        t = params.timings
        self.lead_s = {"vlm": t.vlm_load_s + t.vlm_unload_s + t.vlm_release_lag_s,
                       "chat": t.chat_load_s + t.chat_unload_s, "clip": t.clip_move_s}
        self.capacity = params.gpu_total_bytes - params.external_bytes

    def serve(self, job: "Job") -> None:
        kind, i = self._index.get(id(job.request), (job.request.kind, -1))
        self._next[kind] = max(self._next[kind], i + 1)
        super().serve(job)

    # --- the future ---------------------------------------------------------------------------------------------------

    def next_use(self, kind: str) -> float:
        if any(j.request.kind == kind for j in self.waiting):
            return self.engine.now
        times, i = self._times[kind], self._next[kind]
        if i >= len(times):
            return math.inf
        return max(self.engine.now, self.runner.t0 + times[i] if self.runner else times[i])

    def resident(self, kind: str) -> bool:
        e = self.engine
        if kind == "vlm":
            return e.vlm.resident
        if kind == "clip":
            return e.clip_placement == "gpu" or e.clip_moving == "gpu"
        return e.chat_loaded() is not None

    def size(self, kind: str, room: int) -> int:
        """Bytes the item takes; for the chat item, the model loaded or else the one it would load into `room`
        (remembered as `chat_target`)."""
        e, p = self.engine, self.params
        if kind == "vlm":
            return p.vlm_true_bytes
        if kind == "clip":
            return p.clip_bytes
        chat = e.chat_loaded()
        if chat is not None:
            return chat.true_bytes
        beside = room - sum(self.size(k, 0) for k in ("vlm", "clip") if self.next_use(k) < math.inf)
        fitting = [m for m in p.chat_models if m.true_bytes <= beside]  # the best that leaves room for the rest
        self.chat_target = e.chats[(fitting[0] if fitting else p.chat_models[-1]).key]
        return self.chat_target.true_bytes

    def urgency(self, kind: str) -> tuple[int, float]:
        """Smaller is more urgent: the item being brought in (evictions were made for it), then items a request waits
        for (the oldest first), then by next use less the time it takes to bring the item back."""
        if kind == self.committed:
            return (0, 0.0)
        waited = [j.sent_s for j in self.waiting if j.request.kind == kind]
        if waited:
            return (1, min(waited))
        return (2, self.next_use(kind) - self.lead_s[kind])

    def allowed(self, kind: str) -> bool:
        """Whether the item may be brought to the GPU now (the unconstrained oracle: always)."""
        return True

    def forced(self) -> bool:
        """Start an operation a rule requires now, if any (the unconstrained oracle has no rules)."""
        return False

    def keep_set(self) -> list[tuple[str, int]]:
        """The items to have on the GPU now with their bytes, most urgent first, as many as fit."""
        if self.committed is not None and (self.resident(self.committed) or not self.allowed(self.committed)):
            self.committed = None
        order = sorted((k for k in ITEMS if self.next_use(k) < math.inf and self.allowed(k)), key=self.urgency)
        left, keep = self.capacity, []
        for kind in order:
            nbytes = self.size(kind, left)
            if nbytes <= left:
                keep.append((kind, nbytes))
                left -= nbytes
        return keep

    # --- the scheduler's side ---------------------------------------------------------------------------------------

    def chat_slot(self, job: "Job") -> Slot | None:
        return self.engine.chat_loaded() or self.chat_target

    def clip_waits(self, job: "Job") -> bool:
        """Wait for CLIP to reach the GPU when it is on its way or can start now (30 ms, not 300 on the CPU)."""
        e = self.engine
        return e.clip_moving == "gpu" or (e.clip_placement == "cpu" and not e.busy and self.allowed("clip")
                                          and e.free_bytes >= self.params.clip_bytes)

    def decide(self) -> bool:
        e = self.engine
        if self.forced():
            return True
        if self.squeeze and self._squeeze_chat():
            return True
        if e.clip_placement == "cpu" and e.free_bytes >= self.params.clip_bytes and self.allowed("clip") \
                and any(j.request.kind == "clip" for j in self.waiting):
            e.move_clip("gpu")  # an embedding waits for it (see clip_waits)
            return True
        keep = self.keep_set()
        kept = [k for k, _ in keep]
        for kind, nbytes in keep:
            if self.resident(kind):
                continue
            if kind == "vlm" and e.vlm.state == "unloading":
                return False
            if kind == "chat" and self.chat_target.state != "unloaded":
                return False
            if nbytes <= e.free_bytes:
                if kind == "clip":
                    e.move_clip("gpu")
                else:
                    e.load(e.vlm if kind == "vlm" else self.chat_target)
                return True
            turn_end = self._turn_end() if kind == "chat" and self.squeeze else None
            victim = self._evictable(kept, turn_end)
            if victim is not None:
                self._evict(victim)
                self.committed = kind  # no second thoughts until it is in: flip-flopping only wastes the eviction
                return True
            # Room is coming (an unload's bytes, a request still running): meanwhile, what fits may go ahead.
        return False

    def _squeeze_chat(self) -> bool:
        """A chat turn waits, and its model fits only in the place of a model needed before the turn ends: CLIP
        yields, then the smallest chat model loads partially offloaded beside the rest."""
        e = self.engine
        turn_end = self._turn_end()
        smallest = e.chats[self.params.chat_models[-1].key]
        if turn_end is None or e.chat_loaded() is not None or smallest.state != "unloaded" or e.releasing_bytes:
            return False
        room = e.free_bytes
        vlm = e.vlm
        if vlm.state == "loaded" and not vlm.users and self.next_use("vlm") >= turn_end:
            room += vlm.gpu_bytes
        clip_out = e.clip_placement == "gpu" and not e.clip_users and not e.clip_moving
        if room + (self.params.clip_bytes if clip_out else 0) >= smallest.true_bytes:
            return False  # no squeeze needed: evictions make room
        if clip_out:
            e.move_clip("cpu")
            return True
        if e.free_bytes <= 0:
            return False
        self.chat_target = smallest
        e.load(smallest)
        return True

    def _turn_end(self) -> float | None:
        """When the chat turn waiting now would end if its model were loaded now (None: no turn waits)."""
        replies = [j.request.service_s for j in self.waiting if j.request.kind == "chat"]
        if not replies:
            return None
        return self.engine.now + self.params.timings.chat_load_s + max(replies)

    def _evictable(self, keep: list[str], not_needed_before: float | None = None) -> str | None:
        e = self.engine
        candidates = []
        for kind in ITEMS:
            if kind in keep or not self.resident(kind):
                continue
            if not_needed_before is not None and kind != "clip" and self.next_use(kind) < not_needed_before:
                continue  # (CLIP may go: it comes back in milliseconds and meanwhile embeds on the CPU)
            if kind == "clip" and (e.clip_users or e.clip_moving):
                continue
            if kind == "vlm" and (e.vlm.users or e.vlm.state != "loaded"):
                continue
            chat = e.chat_loaded()
            if kind == "chat" and (chat is None or chat.users or chat.state != "loaded"):
                continue
            candidates.append(kind)
        return max(candidates, key=self.next_use, default=None)

    def _evict(self, kind: str) -> None:
        e = self.engine
        if kind == "clip":
            e.move_clip("cpu")
        elif kind == "vlm":
            e.unload(e.vlm)
        else:
            e.unload(e.chat_loaded())


class ModesOracle(Oracle):
    """The same clairvoyant scheduler, held to the rules Mai must keep (DESIGN §4 invariants 1, 3, 8 and 12, with the
    mode table of `config/default.yaml`): the lower bound for a policy that keeps them, as Mai and the strict policy do.

    - Entering AUTOPILOT unloads the VLM (once the calls running on it end); in that run it is loaded again only
      after a VLM request has been sent (on demand), and is then kept or evicted as the oracle sees fit.
    - In RECORDING CLIP is on the CPU (moved there before the VLM loads); the VLM may be loaded at any time.
    - In IDLE the VLM is not loaded unless a request asks for it (it may stay), and CLIP does not move to the GPU.
    - The VLM is unloaded after `idle_timeout_s` without a request (invariant 8).
    - It plans within capacity minus Mai's reserve (invariant 12), the chat model included (the chat gate's rule) —
      except that, like the unconstrained oracle, it may squeeze a chat model in partially offloaded, a freedom
      Mai's gate does not take (the strict policy's LM Studio does).
    Chat is not a mode's business: it keeps every freedom of the unconstrained oracle.
    """

    name = "oracle (modes)"

    def __init__(self, params: Params, trace: "Trace", squeeze: bool = False) -> None:
        super().__init__(params, trace, squeeze)
        self.demand_since_mode = False
        self.capacity -= params.reserve_bytes  # invariant 12: Mai plans within capacity minus the reserve

    def set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self.demand_since_mode = False
        super().set_mode(mode)
        self.engine.wake_at(self.engine.now + self.params.idle_timeout_s)

    def serve(self, job: "Job") -> None:
        if job.request.kind == "vlm":
            self.demand_since_mode = True
        super().serve(job)

    def finished(self, job: "Job") -> None:
        self.engine.wake_at(self.engine.now + self.params.idle_timeout_s)

    def allowed(self, kind: str) -> bool:
        if kind == "vlm":
            return self.mode == "recording" or self.demand_since_mode or (
                self.mode == "idle" and self.engine.vlm.resident)
        if kind == "clip":
            return self.mode == "autopilot" or (self.mode == "idle" and self.engine.clip_placement == "gpu")
        return True

    def forced(self) -> bool:
        e, vlm = self.engine, self.engine.vlm
        idle_out = vlm.state == "loaded" and not self.wanted(vlm) \
            and e.now - max(vlm.last_used_s, self.mode_set_s) >= self.params.idle_timeout_s
        entered_autopilot = self.mode == "autopilot" and not self.demand_since_mode
        if vlm.state == "loaded" and not vlm.users and (idle_out or entered_autopilot):
            e.unload(vlm)
            return True
        if self.mode == "recording" and e.clip_placement == "gpu" and not e.clip_users and not e.clip_moving:
            e.move_clip("cpu")
            return True
        return False
