"""The simulated GPU the baseline schedulers and the oracle run on: virtual time, the same ledger as Mai's simulated
world, and executors with the same timings and the same physics.

What the executors do, as `mai.sim.world` does for Mai (so a stall costs the same whoever causes it):
- A llama.cpp model (the VLM, a chat model) claims its VRAM when its load starts and is ready `vlm_load_s` /
  `chat_load_s` later. If it does not fit what is free, it loads partially offloaded (what fits on the GPU, the rest
  on the CPU), as Ollama's and LM Studio's llama.cpp do; it then runs `Params.offload_slowdown` times slower.
- An unload returns after `vlm_unload_s` / `chat_unload_s`; a VLM's bytes come back `vlm_release_lag_s` after that
  (Ollama's runner exits after replying), a chat model's at once.
- CLIP moves to the GPU in `clip_move_s`, claiming its bytes as the move starts; if they do not fit, the move fails
  with CUDA out of memory (an OOM, recorded in the ledger) and CLIP stays on the CPU. Moving back frees them.
- One VRAM-changing operation at a time, for every policy (Mai's gate does the same; Ollama loads one model at a
  time; loads are disk-bound, so running two at once would not make either faster).

`Scheduler` is the common shell of a baseline: it queues jobs, starts those whose model is ready, and asks its
subclass to `decide` the next operation whenever the GPU is free and something changed (a level-triggered loop,
like Mai's coordinator).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from bench.trace.params import Params
from mai.sim.world import Allocation, VramLedger

if TYPE_CHECKING:
    from bench.trace.runner import Job, Runner
    from bench.trace.trace import Trace


@dataclass(eq=False)
class Slot:
    """One llama.cpp model."""

    key: str
    kind: str  # "vlm" | "chat"
    true_bytes: int
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    gpu_bytes: int = 0
    alloc: Allocation | None = None
    users: int = 0  # jobs running on it now
    last_used_s: float = -math.inf

    @property
    def resident(self) -> bool:
        return self.state in ("loading", "loaded")


class Engine:
    """Virtual time, the ledger, the models and the executors (see the module docstring)."""

    def __init__(self, params: Params, on_change: Callable[[], None]) -> None:
        self.params = params
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wakes: set[float] = set()
        self.on_change = on_change
        self.ledger = VramLedger(params.gpu_total_bytes)
        if params.external_bytes:
            self.ledger.allocate("external", params.external_bytes, 0.0)
        self.vlm = Slot(params.vlm_model, "vlm", params.vlm_true_bytes)
        self.chats = {m.key: Slot(m.key, "chat", m.true_bytes) for m in params.chat_models}
        self.clip_placement = "cpu"  # cpu | gpu
        self.clip_moving: str | None = None  # the device CLIP is moving to
        self.clip_alloc: Allocation | None = None
        self.clip_users = 0
        self.busy = False  # a VRAM-changing operation is in flight
        self.releasing_bytes = 0  # unloaded, not back yet

    # --- clock -------------------------------------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), action))

    def run_until(self, t: float) -> None:
        while self._queue and self._queue[0][0] <= t:
            when, _, action = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            action()
        self.now = max(self.now, t)

    def wake_at(self, when: float) -> None:
        """Call `on_change` at `when` (a timer: keep-alive, idle timeout)."""
        if when > self.now and when not in self._wakes:
            self._wakes.add(when)
            self.at(when, lambda: (self._wakes.discard(when), self.on_change()))

    # --- what is where -----------------------------------------------------------------------------------------------

    @property
    def slots(self) -> list[Slot]:
        return [self.vlm, *self.chats.values()]

    @property
    def free_bytes(self) -> int:
        return self.ledger.free_bytes

    def chat_loaded(self) -> Slot | None:
        return next((s for s in self.chats.values() if s.resident), None)

    def slowdown(self, slot: Slot) -> float:
        return self.params.offload_slowdown(slot.gpu_bytes, slot.true_bytes)

    def clip_slowdown(self) -> float:
        p = self.params
        return 1.0 if self.clip_placement == "gpu" else p.clip_embed_cpu_s / p.clip_embed_gpu_s

    # --- executors (one at a time) -----------------------------------------------------------------------------------

    def load(self, slot: Slot) -> None:
        if slot.state != "unloaded":
            raise RuntimeError(f"load of {slot.key} while it is {slot.state}")
        self._claim_gate()
        slot.state = "loading"
        slot.gpu_bytes = max(0, min(slot.true_bytes, self.free_bytes))
        slot.alloc = self.ledger.allocate(slot.kind, slot.gpu_bytes, self.now, slot.key)
        t = self.params.timings
        load_s = t.vlm_load_s if slot.kind == "vlm" else t.chat_load_s

        def loaded() -> None:
            slot.state, slot.last_used_s = "loaded", max(slot.last_used_s, self.now)  # idle timers count from here
            self._release_gate()

        self.at(self.now + load_s, loaded)

    def unload(self, slot: Slot) -> None:
        if slot.users:
            raise RuntimeError(f"unload of {slot.key} while {slot.users} request(s) use it")
        self._claim_gate()
        slot.state = "unloading"
        t = self.params.timings
        vlm = slot.kind == "vlm"

        def unloaded() -> None:
            slot.state, slot.gpu_bytes = "unloaded", 0
            alloc, slot.alloc = slot.alloc, None
            if alloc is not None and vlm and t.vlm_release_lag_s > 0:
                self.releasing_bytes += alloc.nbytes

                def back() -> None:
                    self.releasing_bytes -= alloc.nbytes
                    self.ledger.release(alloc, self.now)
                    self.on_change()

                self.at(self.now + t.vlm_release_lag_s, back)
            elif alloc is not None:
                self.ledger.release(alloc, self.now)
            self._release_gate()

        self.at(self.now + (t.vlm_unload_s if vlm else t.chat_unload_s), unloaded)

    def move_clip(self, device: str) -> None:
        if device == self.clip_placement or self.clip_moving:
            raise RuntimeError(f"CLIP move to {device} from {self.clip_placement} (moving: {self.clip_moving})")
        if device == "cpu" and self.clip_users:
            raise RuntimeError("CLIP moved to the CPU while embedding on the GPU")
        self._claim_gate()
        t, nbytes = self.params.timings, self.params.clip_bytes
        if device == "gpu" and self.free_bytes < nbytes:
            self.ledger.refuse("clip", nbytes, self.now)  # torch: CUDA out of memory; CLIP stays on the CPU
            self.at(self.now + t.fail_s, self._release_gate)
            return
        self.clip_moving = device
        if device == "gpu":
            self.clip_alloc = self.ledger.allocate("clip", nbytes, self.now, "clip")

        def moved() -> None:
            self.clip_placement, self.clip_moving = device, None
            if device == "cpu" and self.clip_alloc is not None:
                self.ledger.release(self.clip_alloc, self.now)
                self.clip_alloc = None
            self._release_gate()

        self.at(self.now + t.clip_move_s, moved)

    def _claim_gate(self) -> None:
        if self.busy:
            raise RuntimeError("two VRAM-changing operations at once")
        self.busy = True

    def _release_gate(self) -> None:
        self.busy = False
        self.on_change()


class Scheduler:
    """A baseline's shell: jobs in, the model each needs, start what is ready, `decide` the next operation."""

    name = "scheduler"

    def __init__(self, params: Params, trace: "Trace | None" = None) -> None:
        self.params = params
        self.trace = trace
        self.engine = Engine(params, self.pump)
        self.clock = self.engine
        self.ledger = self.engine.ledger
        self.runner: Runner | None = None
        self.mode = "idle"
        self.mode_set_s = 0.0
        self.waiting: list[Job] = []
        self.running: dict[Job, object] = {}  # job -> the Slot it runs on, or "clip"
        self._pumping = False

    def attach(self, runner: "Runner") -> None:
        self.runner = runner

    # --- the runner's calls ------------------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self.mode, self.mode_set_s = mode, self.engine.now
        self.pump()

    def serve(self, job: "Job") -> None:
        self.waiting.append(job)
        self.pump()

    def done(self, job: "Job") -> None:
        what = self.running.pop(job)
        now = self.engine.now
        if what == "clip":
            self.engine.clip_users -= 1
        else:
            what.users -= 1
            what.last_used_s = now
        self.finished(job)
        self.pump()

    # --- the loop ----------------------------------------------------------------------------------------------------

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            self._start_ready()  # first, so a model a request waits for counts as in use when `decide` looks
            if not self.engine.busy and self.decide():
                self._start_ready()
        finally:
            self._pumping = False

    def _start_ready(self) -> None:
        engine = self.engine
        for job in list(self.waiting):
            kind = job.request.kind
            if kind == "clip":
                if engine.clip_moving or self.clip_waits(job):
                    continue
                self.waiting.remove(job)
                engine.clip_users += 1
                self.running[job] = "clip"
                self.runner.begin(job, engine.clip_slowdown(), "clip")
                continue
            slot = self.slot_for(job)
            if slot is not None and slot.state == "loaded":
                self.waiting.remove(job)
                slot.users += 1
                self.running[job] = slot
                self.runner.begin(job, engine.slowdown(slot), slot.key)

    # --- what subclasses say -----------------------------------------------------------------------------------------

    def slot_for(self, job: "Job") -> Slot | None:
        """The model a VLM or chat job runs on (None: not chosen yet)."""
        return self.engine.vlm if job.request.kind == "vlm" else self.chat_slot(job)

    def chat_slot(self, job: "Job") -> Slot | None:
        raise NotImplementedError

    def clip_waits(self, job: "Job") -> bool:
        """True: this embedding waits for CLIP to reach the GPU; False: it runs where CLIP is."""
        return False

    def decide(self) -> bool:
        """Start at most one operation (the GPU is free). True when one was started."""
        raise NotImplementedError

    def finished(self, job: "Job") -> None:
        """A job is done (timers to set)."""

    # --- helpers -----------------------------------------------------------------------------------------------------

    def wanted(self, slot: Slot) -> bool:
        """A job waits for it or runs on it."""
        return slot.users > 0 or any(self.slot_for(j) is slot for j in self.waiting if j.request.kind != "clip")

    def clip_wanted(self) -> bool:
        return self.engine.clip_users > 0 or any(j.request.kind == "clip" for j in self.waiting)

    def load_or_wait(self, slot: Slot) -> bool:
        """Load `slot` now — whole if it fits, else partially offloaded (the caller has nothing left to evict) — but
        not while an unload's bytes are still coming back: those are waited for first (False)."""
        if self.engine.releasing_bytes:
            return False  # Ollama waits for VRAM recovery after every unload; so does a plain load
        self.engine.load(slot)
        return True
