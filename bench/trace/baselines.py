"""The policies Mai is compared with, each a small scheduler on the shared engine (`bench.trace.engine`): same trace,
same timings, same footprints, same ledger, same stall and OOM accounting.

- `AlwaysUnload`: every model is loaded (CLIP moved to the GPU) right before a request and unloaded (moved back)
  right after, unless another request waits for it: `keep_alive: 0` for everything. A load waits until what it
  needs is free (the others are unloaded after their own use), or loads partially offloaded when nothing else is
  held. Chat turns use the best model of the chain (the user's choice; nothing picks a smaller one). Modes ignored.
- `Strict`: the mode table applied literally, as a plain implementation of the modes would. AUTOPILOT: on entry
  the VLM is unloaded (in-flight calls finish first), then CLIP goes to the GPU; a VLM call loads the VLM on demand,
  which stays until it has had no call for `autopilot_idle_s` — two rows: 5 s (the grace Mai's mode table had: the
  VLM is unloaded again soon after a call, as "AUTOPILOT: VLM unloaded" says; the row the target is checked
  against) and 300 s (the general idle timeout: the VLM stays for the whole run). RECORDING: CLIP to the CPU, then
  the VLM is loaded.
  IDLE: nothing changes. In every mode the VLM is unloaded after `idle_timeout_s` without a call (Mai's setting).
  To make room for the VLM it first unloads an idle chat model, then moves CLIP to the CPU; CLIP comes back to the
  GPU in AUTOPILOT once it fits. It plans with the true footprints and Mai's reserve, and never unloads a model in
  use. Chat, as LM Studio does it: a turn takes the best model of the chain that fits the free VRAM (less the
  reserve, plus what the chat model held already), switching if that is another one; if none fits, the smallest,
  partially offloaded; an idle chat model is unloaded after LM Studio's TTL (60 min).
- `OllamaDefaults`: the VLM and the chat models are Ollama runners with Ollama's defaults
  (reference/ollama.md §8): keep-alive 5 min after a model's last request; one load at a time; at most 3 models;
  a model that is not alone must fit in 80 % of the free VRAM, else a runner is evicted — shortest keep-alive first,
  then by name, the first idle one (if all are busy, the load waits); a lone model loads even if it does not fit
  (partially offloaded); after an unload, VRAM recovery is awaited before the next load. CLIP is moved to the GPU
  when the agent starts and stays there (Ollama sees it only as used VRAM). Modes are ignored. Chat turns use the
  best model of the chain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.trace.engine import Scheduler, Slot
from bench.trace.params import Params

if TYPE_CHECKING:
    from bench.trace.runner import Job
    from bench.trace.trace import Trace

LM_STUDIO_TTL_S = 3600.0  # reference/lmstudio.md: JIT models idle out after 60 min


class AlwaysUnload(Scheduler):
    name = "always-unload"

    def chat_slot(self, job: "Job") -> Slot:
        return self.engine.chats[self.params.chat_models[0].key]

    def clip_waits(self, job: "Job") -> bool:
        return self.engine.clip_placement != "gpu"

    def decide(self) -> bool:
        e = self.engine
        for slot in e.slots:
            if slot.state == "loaded" and not self.wanted(slot):
                e.unload(slot)
                return True
        if e.clip_placement == "gpu" and not self.clip_wanted():
            e.move_clip("cpu")
            return True
        for job in self.waiting:  # the oldest request first; the others wait their turn
            others_held = any(s.resident for s in e.slots) or e.clip_placement == "gpu"
            if job.request.kind == "clip":
                if e.clip_placement == "gpu":
                    continue
                if e.free_bytes >= self.params.clip_bytes or not others_held:
                    e.move_clip("gpu")
                    return True
                return False
            slot = self.slot_for(job)
            if slot.resident:
                continue
            if slot.state == "unloading":
                return False
            others_held = any(s.resident and s is not slot for s in e.slots) or e.clip_placement == "gpu"
            if slot.true_bytes <= e.free_bytes or not others_held:
                return self.load_or_wait(slot)
            return False
        return False


class Strict(Scheduler):
    name = "strict modes"

    def __init__(self, params: Params, trace: "Trace | None" = None, autopilot_idle_s: float | None = None,
                 name: str | None = None) -> None:
        super().__init__(params, trace)
        self.autopilot_idle_s = params.idle_timeout_s if autopilot_idle_s is None else autopilot_idle_s
        self.name = name or f"strict modes (idle {self.autopilot_idle_s:g} s)"
        self.chat_choice: dict[Job, Slot] = {}

    # --- what the modes want ------------------------------------------------------------------------------------

    def vlm_target(self) -> str:
        e, now = self.engine, self.engine.now
        vlm = e.vlm
        if self.wanted(vlm):
            return "loaded"
        last = vlm.last_used_s
        if now - max(last, self.mode_set_s) >= self.params.idle_timeout_s:
            return "unloaded"
        if self.mode == "autopilot":
            on_demand = last > self.mode_set_s and now - last < self.autopilot_idle_s  # a call of this run
            return "keep" if on_demand else "unloaded"
        return "loaded" if self.mode == "recording" else "keep"

    def room(self) -> int:
        return self.engine.free_bytes - self.params.reserve_bytes

    # --- chat: LM Studio's side ---------------------------------------------------------------------------------------

    def chat_slot(self, job: "Job") -> Slot:
        """Chosen when the turn is first looked at, and kept for the turn."""
        if job not in self.chat_choice:
            self.chat_choice[job] = self.choose_chat()
        return self.chat_choice[job]

    def choose_chat(self) -> Slot:
        e = self.engine
        current = e.chat_loaded()
        room = self.room() + (current.gpu_bytes if current is not None else 0)
        fitting = [m for m in self.params.chat_models if m.true_bytes <= room]
        key = fitting[0].key if fitting else self.params.chat_models[-1].key
        return e.chats[key]

    # --- decisions ---------------------------------------------------------------------------------------------------

    def decide(self) -> bool:
        e, p, now = self.engine, self.params, self.engine.now
        vlm, target = e.vlm, self.vlm_target()
        if target == "unloaded" and vlm.state == "loaded" and not vlm.users:
            e.unload(vlm)
            return True
        clip_gpu_ok = self.mode == "autopilot"
        if self.mode == "recording" and e.clip_placement == "gpu" and not e.clip_users:
            e.move_clip("cpu")
            return True
        if target == "loaded" and not vlm.resident:
            if vlm.state == "unloading":
                return False
            if vlm.true_bytes > self.room():
                chat = e.chat_loaded()
                if chat is not None and chat.state == "loaded" and not self.wanted(chat):
                    e.unload(chat)
                    return True
                if e.clip_placement == "gpu" and not e.clip_users:
                    e.move_clip("cpu")
                    return True
                if e.releasing_bytes or e.clip_users or (chat is not None and chat.resident):
                    return False  # the room is coming (an unload, a running embedding, a reply)
            return self.load_or_wait(vlm)
        for job in self.waiting:
            if job.request.kind != "chat":
                continue
            slot = self.chat_slot(job)
            if slot.resident:
                continue
            if slot.state == "unloading":
                return False
            current = e.chat_loaded()
            if current is not None:
                if current.state == "loaded" and not current.users:
                    e.unload(current)
                    return True
                return False
            return self.load_or_wait(slot)
        chat = e.chat_loaded()
        if chat is not None and chat.state == "loaded" and not self.wanted(chat) \
                and now - chat.last_used_s >= LM_STUDIO_TTL_S:
            e.unload(chat)
            return True
        if clip_gpu_ok and e.clip_placement == "cpu" and not e.clip_moving and p.clip_bytes <= self.room() \
                and not (target == "loaded" and not vlm.resident):
            e.move_clip("gpu")
            return True
        return False

    def finished(self, job: "Job") -> None:
        now = self.engine.now
        self.chat_choice.pop(job, None)
        self.engine.wake_at(now + self.autopilot_idle_s)
        self.engine.wake_at(now + self.params.idle_timeout_s)
        self.engine.wake_at(now + LM_STUDIO_TTL_S)

    def set_mode(self, mode: str) -> None:
        super().set_mode(mode)
        self.engine.wake_at(self.engine.now + self.params.idle_timeout_s)


class OllamaDefaults(Scheduler):
    name = "ollama defaults"
    keep_alive_s = 300.0
    max_loaded = 3
    fit_fraction = 0.8

    def __init__(self, params: Params, trace: "Trace | None" = None) -> None:
        super().__init__(params, trace)
        self.clip_started = False

    def chat_slot(self, job: "Job") -> Slot:
        return self.engine.chats[self.params.chat_models[0].key]

    def decide(self) -> bool:
        e, now = self.engine, self.engine.now
        if not self.clip_started:  # the agent puts CLIP on the GPU when it starts, and leaves it there
            self.clip_started = True
            if self.params.clip_bytes <= e.free_bytes:
                e.move_clip("gpu")
                return True
        for slot in e.slots:
            if slot.state == "loaded" and not slot.users and now >= slot.last_used_s + self.keep_alive_s:
                e.unload(slot)
                return True
        for job in self.waiting:
            if job.request.kind == "clip":
                continue
            slot = self.slot_for(job)
            if slot.state == "loaded":
                continue
            if slot.state != "unloaded" or e.releasing_bytes:
                return False  # one load at a time; after an unload, VRAM recovery first
            others = [s for s in e.slots if s is not slot and s.resident]
            if len(others) >= self.max_loaded or (others and slot.true_bytes > self.fit_fraction * e.free_bytes):
                order = sorted(others, key=lambda s: (self.keep_alive_s, s.key))
                victim = next((s for s in order if s.state == "loaded" and not s.users), None)
                if victim is None:
                    return False  # every runner is busy: wait for one to drain
                e.unload(victim)
                return True
            e.load(slot)
            return True
        return False

    def finished(self, job: "Job") -> None:
        self.engine.wake_at(self.engine.now + self.keep_alive_s)
