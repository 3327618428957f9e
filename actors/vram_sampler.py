"""VramSampler: owns the NVML handle (psutil fallback, or the simulated ledger), samples on a timer, publishes
ResourceChanged to watchers, answers readings and wait-until-free. Never initialises CUDA."""

from __future__ import annotations

import datetime
import time
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from bootstrap.paths import ledger_path
from mai.core.sampler import SamplerCore
from messages.failure import Failure
from messages.steps import GetVram, PartHealth, StepFailed, VramReading, WaitVramFree, WatchVram
from messages.system import Init


class VramSampler(MaiActor):
    role = "sampler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe: Any = None
        self.degraded_reason: str | None = None
        self.core = SamplerCore(threshold_bytes=100 * 2**20)
        self.watchers: list[Any] = []
        self.ticking = False
        self.poll_at: float | None = None  # the pending poll wakeup for waits (Thespian cannot cancel one)

    def on_init(self, init: Init) -> None:
        from backends.vram import open_vram_probe

        cfg = init.config
        if self.probe is not None:
            self.probe.close()
        self.core = SamplerCore(threshold_bytes=cfg.gpu.change_threshold_mb * 2**20,
                                max_poll_s=cfg.ollama.vram_recovery_poll_s)
        self.probe, self.degraded_reason = open_vram_probe(cfg.gpu.backend, cfg.gpu.device_index, ledger_path(cfg))
        self.log.info("sampler.probe", source=self.probe.source, degraded=self.degraded_reason or "")
        self._sample()
        if not self.ticking:
            self.ticking = True
            self.wakeupAfter(datetime.timedelta(seconds=cfg.gpu.sample_interval_s))

    def _health(self) -> PartHealth:
        return PartHealth("gpu", self.degraded_reason is None, self.degraded_reason or "")

    def _sample(self) -> Any:
        snapshot = self.probe.snapshot()
        event, answers = self.core.observe(snapshot, time.time())
        # Answers first: a step waits on each one, while the same change's ResourceChanged is news that can come
        # second (sent first, the coordinator would handle it before the answer the next step waits for).
        for reply_to, answer in answers:
            self.send(reply_to, answer)
        if event is not None:
            for watcher in self.watchers:
                self.send(watcher, event)
        return snapshot

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == "poll":
            self.poll_at = None
            self.guarded("", None, self._sample)
        else:  # the periodic sample
            self.guarded("", None, self._sample)
            self.wakeupAfter(datetime.timedelta(seconds=self.config.gpu.sample_interval_s))
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        """One poll wakeup at a time, at the earliest reading a pending wait wants."""
        due = self.core.next_poll()
        if due is None or (self.poll_at is not None and self.poll_at <= due):
            return
        self.poll_at = due
        self.wakeupAfter(datetime.timedelta(seconds=max(0.0, due - time.time())), payload="poll")

    def receiveMsg_WatchVram(self, msg: WatchVram, sender: Any) -> None:
        if sender not in self.watchers:
            self.watchers.append(sender)
        self.send(sender, self._health())
        self._reply_reading(msg.request_id, sender)

    def receiveMsg_GetVram(self, msg: GetVram, sender: Any) -> None:
        self._reply_reading(msg.request_id, sender)

    def _reply_reading(self, request_id: str, sender: Any) -> None:
        snapshot = self.guarded(request_id, sender, self._sample)
        if snapshot is not None:
            self.send(sender, VramReading(request_id, snapshot, self.degraded_reason))

    def receiveMsg_WaitVramFree(self, msg: WaitVramFree, sender: Any) -> None:
        self.core.wait(msg, sender, time.time())
        if self.guarded("", None, self._sample) is None:
            self.core.waits = [w for w in self.core.waits if w.request is not msg]
            self.send(sender, StepFailed(msg.step_id, Failure(msg.step_id, "internal", "VRAM could not be read")))
        self._schedule_poll()
