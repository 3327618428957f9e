"""What the table shows, computed the same way for every policy from the runner's jobs and the GPU ledger.

- stall-s/h: stall seconds (defined in `bench.trace.runner`) per hour of trace.
- stalls>1s/h: requests that stalled more than one second, per hour.
- peak VRAM: the most the ledger ever held (the desktop's bytes included).
- OOMs: allocations refused because they did not fit what was free — CUDA's out-of-memory for a CLIP move or a chat
  load (llama.cpp's partial offload of a model that does not fit is not one: it is counted as slowdown).
- loads/h: VLM and chat model loads per hour (CLIP moves are counted apart: they take milliseconds).
- thrash/h: loads of a model that had been evicted less than 60 s before.
- gave up: requests still not served after `give_up_s` (their waiting counts as stall).
- best chat: the share of chat turns answered by the best model of the chain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from bench.trace.runner import Job
from mai.sim.world import GIB, VramLedger

THRASH_WINDOW_S = 60.0
STALL_OVER_S = 1.0


@dataclass(frozen=True)
class Metrics:
    policy: str
    gpu_gib: float
    hours: float
    requests: int
    stall_s: float
    stalls_over_1s: int
    peak_bytes: int
    ooms: int
    loads: int
    thrash: int
    clip_moves: int
    gave_up: int
    unfinished: int
    chat_best_share: float | None
    stall_by_kind_s: dict[str, float] = field(default_factory=dict)

    @property
    def stall_s_per_h(self) -> float:
        return self.stall_s / self.hours

    @property
    def stalls_over_1s_per_h(self) -> float:
        return self.stalls_over_1s / self.hours

    @property
    def loads_per_h(self) -> float:
        return self.loads / self.hours

    @property
    def thrash_per_h(self) -> float:
        return self.thrash / self.hours

    @property
    def clip_moves_per_h(self) -> float:
        return self.clip_moves / self.hours

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(stall_s_per_h=self.stall_s_per_h, stalls_over_1s_per_h=self.stalls_over_1s_per_h,
                   peak_gib=self.peak_bytes / GIB, loads_per_h=self.loads_per_h, thrash_per_h=self.thrash_per_h,
                   clip_moves_per_h=self.clip_moves_per_h)
        return out


def measure(policy: str, gpu_gib: float, hours: float, jobs: Iterable[Job], ledger: VramLedger,
            best_chat: str) -> Metrics:
    served = [j for j in jobs if j.request.kind != "mode"]
    by_kind: dict[str, float] = {}
    for job in served:
        by_kind[job.request.kind] = by_kind.get(job.request.kind, 0.0) + job.stall_s
    chats = [j for j in served if j.request.kind == "chat" and j.begun_s is not None]
    loads, thrash = count_loads(ledger)
    return Metrics(
        policy=policy,
        gpu_gib=gpu_gib,
        hours=hours,
        requests=len(served),
        stall_s=sum(j.stall_s for j in served),
        stalls_over_1s=sum(1 for j in served if j.stall_s > STALL_OVER_S),
        peak_bytes=ledger.peak_bytes,
        ooms=len(ledger.out_of_memory),
        loads=loads,
        thrash=thrash,
        clip_moves=sum(1 for a in ledger.allocations if a.owner == "clip"),
        gave_up=sum(1 for j in served if j.gave_up_s is not None and not j.unfinished),
        unfinished=sum(1 for j in served if j.unfinished),
        chat_best_share=(sum(1 for j in chats if j.model == best_chat) / len(chats)) if chats else None,
        stall_by_kind_s=by_kind,
    )


def count_loads(ledger: VramLedger) -> tuple[int, int]:
    """(loads, thrash): VLM and chat model allocations, and those that began within THRASH_WINDOW_S of the end of the
    same model's previous one."""
    last_end: dict[tuple[str, str], float | None] = {}
    loads = thrash = 0
    for alloc in sorted((a for a in ledger.allocations if a.owner in ("vlm", "chat")), key=lambda a: a.begin):
        key = (alloc.owner, alloc.model if alloc.owner == "chat" else "")
        loads += 1
        ended = last_end.get(key)
        if ended is not None and alloc.begin - ended <= THRASH_WINDOW_S:
            thrash += 1
        last_end[key] = alloc.end
    return loads, thrash
