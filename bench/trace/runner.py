"""Replays a trace against a policy in virtual time, and keeps what each request went through.

The runner plays the clients (see `bench.trace.trace`): it sends each stream's requests in order, one at a time,
and measures every request the same way whatever the policy. A policy gets `serve(job)` and answers, now or later,
with `runner.begin(job, slowdown, model)` when the request's model is where it needs it (the request then runs for
its service time times `slowdown`), or `runner.refused(job, why)` (the client asks again `retry_s` later, until it
has waited `give_up_s`). When the service time is over the runner calls `policy.done(job)`.

**Stall** (the headline figure): the time a request waits beyond its service time because its model is not where
it needs it, measured from when the client first sent it: waiting for a load, a move, an unload of something else, the
gate, VRAM to come back, a retry after a refusal or a failed load; plus the extra run time of a model that is not
(all) on the GPU: CLIP embedding on the CPU (`clip_embed_cpu_s` instead of `clip_embed_gpu_s`), a llama.cpp model
partially offloaded (`Params.offload_slowdown`). A request given up counts all the time it waited. Stall is never
negative and never counts the service time itself, nor the time a request waits for its own client's previous
request (that one's stall already counts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from bench.trace.params import Params
from bench.trace.trace import STREAMS, Request, Trace
from mai.sim.world import VramLedger


class Clock(Protocol):
    now: float

    def at(self, when: float, action: Callable[[], None]) -> None: ...

    def run_until(self, t: float) -> None: ...


@dataclass(eq=False)
class Job:
    """One request on its way: sent, maybe refused and sent again, begun, done (or given up)."""

    request: Request
    job_id: str
    sent_s: float  # when the client first sent it
    attempts: int = 1
    begun_s: float | None = None
    done_s: float | None = None
    gave_up_s: float | None = None
    slowdown: float = 1.0
    model: str = ""  # what served it (a chat model's key)
    unfinished: bool = False  # still waiting (or running) when the replay ended

    @property
    def stall_s(self) -> float:
        if self.begun_s is None or (self.unfinished and self.done_s is None):
            end = self.gave_up_s if self.gave_up_s is not None else self.sent_s
            return max(0.0, end - self.sent_s - (0.0 if self.begun_s is None else self.request.service_s))
        return (self.begun_s - self.sent_s) + self.request.service_s * (self.slowdown - 1.0)

    @property
    def finished(self) -> bool:
        return self.done_s is not None or self.gave_up_s is not None


class Policy(Protocol):
    """What the runner needs from a policy (see the module docstring)."""

    name: str
    clock: Clock
    ledger: VramLedger

    def attach(self, runner: "Runner") -> None: ...

    def set_mode(self, mode: str) -> None: ...

    def serve(self, job: Job) -> None: ...

    def done(self, job: Job) -> None: ...


class Runner:
    def __init__(self, trace: Trace, policy: Policy, params: Params) -> None:
        self.trace, self.policy, self.params = trace, policy, params
        self.clock = policy.clock
        self.t0 = self.clock.now
        self.jobs: list[Job] = []
        self._pending = {name: list(reversed(trace.stream(name))) for name in STREAMS}
        self._seq = 0
        policy.attach(self)

    def run(self) -> list[Job]:
        """Replay the whole trace, then let what is still in flight finish (a request still waiting when the last one
        gave up for sure counts as unfinished, all its waiting as stall)."""
        for name in STREAMS:
            self._next(name)
        end = self.t0 + self.trace.duration_s
        self.clock.run_until(end)
        limit = end + self.params.give_up_s + 600.0
        step = 60.0
        while self.clock.now < limit and (any(self._pending.values()) or not all(j.finished for j in self.jobs)):
            self.clock.run_until(min(limit, self.clock.now + step))
        for job in self.jobs:  # still waiting at the end: all that waiting counts
            if not job.finished:
                job.gave_up_s, job.unfinished = self.clock.now, True
        return self.jobs

    # --- what policies call -----------------------------------------------------------------------------------------

    def begin(self, job: Job, slowdown: float = 1.0, model: str = "") -> None:
        if job.begun_s is not None or job.gave_up_s is not None:
            raise RuntimeError(f"{job.job_id} begun twice")
        job.begun_s, job.slowdown, job.model = self.clock.now, max(1.0, slowdown), model
        self.clock.at(self.clock.now + job.request.service_s * job.slowdown, lambda: self._done(job))

    def refused(self, job: Job, why: str = "") -> None:
        """The policy could not serve it now: the client asks again later, or gives up."""
        now = self.clock.now
        if now + self.params.retry_s - job.sent_s > self.params.give_up_s:
            job.gave_up_s = now
            self._after(job)
            return
        job.attempts += 1
        self.clock.at(now + self.params.retry_s, lambda: self.policy.serve(job))

    # --- the clients --------------------------------------------------------------------------------------------------

    def _next(self, stream: str) -> None:
        pending = self._pending[stream]
        if not pending:
            return
        request = pending.pop()
        self.clock.at(max(self.clock.now, self.t0 + request.at_s), lambda: self._send(request))

    def _send(self, request: Request) -> None:
        self._seq += 1
        job = Job(request, f"{request.stream}-{self._seq}", self.clock.now)
        if request.kind == "mode":
            job.begun_s = job.done_s = self.clock.now
            self.jobs.append(job)
            self.policy.set_mode(request.mode)
            self._next(request.stream)
            return
        self.jobs.append(job)
        self.policy.serve(job)

    def _done(self, job: Job) -> None:
        job.done_s = self.clock.now
        self.policy.done(job)
        self._after(job)

    def _after(self, job: Job) -> None:
        self._next(job.request.stream)
