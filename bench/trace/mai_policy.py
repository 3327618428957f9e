"""Mai's row: the real coordinator core (`mai.core.coordinator.Coordinator`) in the simulated world (`mai.sim.world`),
driven by the messages Mai's clients send. Nothing here decides anything: it translates requests into messages and
replies into the runner's calls.

- A mode request is `SetMode(mode, wait=False)` from the agent, as `client.set_mode` sends it.
- A VLM call is `AcquireLease` (the client's `vlm()` lease); when `LeaseGranted` comes back the call runs against
  Ollama (slower if the VLM was loaded partially offloaded), then `ReleaseLease`. A `Failure` (a refusal, a timeout)
  is a refusal: the client asks again later.
- An embedding goes to the CLIP mover, which serves it where CLIP is (on the CPU it is slower) once a move in
  progress is done (the mover handles one message at a time).
- A chat turn is the conversation agent's turn in the simulated world (`SimWorld.chat_turn`: GetGrantable, the best
  model of the chain that fits, ChatNeeds, the grant, the load, the reply). A turn that ends without a reply
  ("no chat model fits", a load that failed) is a refusal: the user asks again later.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from bench.trace.params import Params
from mai.core.coordinator import CoordinatorSettings, ModePolicy, Reply, SendStep
from mai.sim.world import ChatTurn, Delivery, SimWorld
from messages.failure import Failure
from messages.requests import AcquireLease, LeaseGranted, ReleaseLease, SetMode
from messages.steps import ClipMoved, MoveClip, StepFailed

if TYPE_CHECKING:
    from bench.trace.runner import Job, Runner
    from bench.trace.trace import Trace

_CONFIG: Any = None


def mai_settings(params: Params, modes: Mapping[str, ModePolicy] | None = None, **changes: Any) -> CoordinatorSettings:
    """Mai's settings from its default configuration, with the run's footprints (`modes` and `changes` make the
    variants shown beside it)."""
    global _CONFIG
    if _CONFIG is None:
        from config.loader import load_config

        _CONFIG = load_config(env={})
    base = CoordinatorSettings.from_config(_CONFIG)
    table = dict(base.modes)
    table.update(modes or {})
    return replace(base, modes=table, vlm_model=params.vlm_model, vlm_declared_bytes=params.vlm_declared_bytes,
                   clip_declared_bytes=params.clip_bytes, reserve_bytes=params.reserve_bytes,
                   idle_timeout_s=params.idle_timeout_s, **changes)


class MaiPolicy:
    def __init__(self, params: Params, trace: "Trace | None" = None, *, name: str = "mai",
                 settings: CoordinatorSettings | None = None) -> None:
        self.name = name
        self.params = params
        self.settings = settings or mai_settings(params)
        self.world = SimWorld(
            self.settings, gpu_total_bytes=params.gpu_total_bytes, external_bytes=params.external_bytes,
            vlm_true_bytes=params.vlm_true_bytes, clip_true_bytes=params.clip_bytes, timings=params.timings,
            chat_models=params.chat_models, start_at=0.0,
        )
        self.clock = self.world
        self.ledger = self.world.ledger
        self.runner: Runner | None = None
        self._ids = itertools.count(1)
        self._asked: dict[str, Job] = {}  # AcquireLease request id -> job
        self._leases: dict[Job, str] = {}
        self._clip_step: str | None = None  # the MoveClip in flight
        self._clip_waiting: list[Job] = []
        self._chat_job: Job | None = None
        self.world.observers.append(self._observe)
        self.world.turn_observers.append(self._turn)

    def attach(self, runner: "Runner") -> None:
        self.runner = runner

    # --- requests -> messages ----------------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        self._deliver(SetMode(f"mode-{next(self._ids)}", mode))

    def serve(self, job: "Job") -> None:
        kind = job.request.kind
        if kind == "vlm":
            request_id = f"lease-{next(self._ids)}"
            self._asked[request_id] = job
            self._deliver(AcquireLease(request_id, "agent", ttl_s=self.settings.default_lease_ttl_s, timeout_s=120.0))
        elif kind == "clip":
            if self._clip_step is None:
                self._embed(job)
            else:
                self._clip_waiting.append(job)
        elif self.world.chat.turn is not None:  # the previous turn's end is due at this very instant
            self.world.at(self.world.now, lambda: self.serve(job))
        else:
            self._chat_job = job
            self.world.chat_turn(0, reply_s=job.request.service_s, timeout_s=120.0)

    def done(self, job: "Job") -> None:
        lease_id = self._leases.pop(job, None)
        if lease_id is not None:
            self._deliver(ReleaseLease(f"release-{next(self._ids)}", lease_id))

    def _deliver(self, message: Any) -> None:
        self.world.at(self.world.now, lambda: self.world.deliver(message, "agent"))

    def _embed(self, job: "Job") -> None:
        on_gpu = self.world.clip.placement == "gpu"
        p = self.params
        self.runner.begin(job, 1.0 if on_gpu else p.clip_embed_cpu_s / p.clip_embed_gpu_s, "clip")

    # --- replies -> the runner ---------------------------------------------------------------------------------------

    def _observe(self, world: SimWorld, seen: Any) -> None:
        if isinstance(seen, Reply) and seen.to == "agent":
            job = self._asked.pop(getattr(seen.message, "request_id", ""), None)
            if job is None:
                return
            if isinstance(seen.message, LeaseGranted):
                self._leases[job] = seen.message.lease_id
                vlm = world.vlm
                self.runner.begin(job, self.params.offload_slowdown(vlm.size_vram_bytes, vlm.true_bytes), vlm.model)
            elif isinstance(seen.message, Failure):
                self.runner.refused(job, seen.message.message)
        elif isinstance(seen, SendStep) and isinstance(seen.message, MoveClip):
            self._clip_step = seen.message.step_id
        elif isinstance(seen, Delivery) and isinstance(seen.message, (ClipMoved, StepFailed)) \
                and seen.message.step_id == self._clip_step:
            self._clip_step = None  # the mover is free: embeddings that waited run where CLIP is now
            waiting, self._clip_waiting = self._clip_waiting, []
            for job in waiting:
                self._embed(job)

    def _turn(self, world: SimWorld, turn: ChatTurn, how: str) -> None:
        job = self._chat_job
        if job is None:
            return
        if how == "stream":
            self.runner.begin(job, 1.0, world.chat.current.key if world.chat.current else "")
        elif job.begun_s is None:
            self._chat_job = None
            self.runner.refused(job, how)
        else:
            self._chat_job = None
