"""VramSampler: owns the NVML handle (psutil fallback, or the simulated ledger), samples on a timer, publishes
ResourceChanged to watchers, answers readings and wait-until-free. Never initialises CUDA.

When NVML is unusable it is opened again with backoff (only a missing library is final), and meanwhile the CLIP
process, which holds a CUDA context anyway, reads the GPU with `torch.cuda.mem_get_info`: this actor asks for a
reading on each sample and relays what comes back (CudaMemory). Host memory stands in only when CUDA fails too."""

from __future__ import annotations

import datetime
import time
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from bootstrap.paths import ledger_path
from mai.core.retry import Backoff
from mai.core.sampler import NvmlRecovery, SamplerCore, fallback_reason
from messages.base import new_request_id
from messages.errors import NoGpu
from messages.failure import Failure
from messages.resources import CudaMemory, ReadCudaMemory, VramSnapshot
from messages.steps import GetVram, PartHealth, StepFailed, VramReading, WaitVramFree, WatchVram
from messages.system import Init

NVML_RETRY = Backoff(initial_s=1.0, max_s=60.0)  # a driver loading at boot takes seconds; a reset, a minute


class VramSampler(MaiActor):
    role = "sampler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe: Any = None  # NVML, the simulated ledger, or psutil standing in while NVML is unusable
        self.nvml_failure: NoGpu | None = None  # why NVML is not the probe (backend nvml only)
        self.recovery = NvmlRecovery(NVML_RETRY)
        self.torch_reading: VramSnapshot | None = None  # the CLIP process's latest reading, while NVML fails
        self.cuda_cause: str | None = None  # CLIP's answer that CUDA is unusable too
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
        self.probe, failure = open_vram_probe(cfg.gpu.backend, cfg.gpu.device, ledger_path(cfg))
        if failure is None:
            self._nvml_ok()
        else:
            self._nvml_failed(failure)
        self._sample()
        if not self.ticking:
            self.ticking = True
            self.wakeupAfter(datetime.timedelta(seconds=cfg.gpu.sample_interval_s))

    # --- where readings come from ------------------------------------------------------------------------
    def _nvml_ok(self) -> None:
        self.nvml_failure, self.torch_reading, self.cuda_cause = None, None, None
        self.recovery.recovered()
        self.log.info("sampler.probe", source=self.probe.source, device=getattr(self.probe, "device_name", ""),
                      uuid=getattr(self.probe, "device_uuid", ""), reason="opened")
        self._set_degraded(None)

    def _nvml_failed(self, failure: NoGpu) -> None:
        from backends.vram import PsutilProbe

        if self.probe is not None and self.probe.source == "nvml":
            self.probe.close()
            self.probe = PsutilProbe()
        self.nvml_failure = failure
        permanent = bool(failure.details.get("permanent"))
        retry_at = self.recovery.failed(time.time(), permanent)
        self.log.warning("sampler.nvml_unavailable", reason=str(failure.details.get("cause", failure.message)),
                         permanent=permanent, retry_in_s=round(retry_at - time.time(), 1) if retry_at else None)
        self.cuda_cause = None  # ask CLIP afresh: CUDA may work where NVML does not
        self._ask_clip()
        self._update_fallback_reason()

    def _update_fallback_reason(self) -> None:
        failure = self.nvml_failure
        assert failure is not None
        self._set_degraded(fallback_reason(str(failure.details.get("cause", failure.message)),
                                           bool(failure.details.get("permanent")), self.torch_reading is not None,
                                           self.cuda_cause))

    def _set_degraded(self, reason: str | None) -> None:
        if reason == self.degraded_reason:
            return
        self.degraded_reason = reason
        self.log.info("sampler.health", degraded=reason or "", reason="source_changed")
        for watcher in self.watchers:
            self.send(watcher, self._health())

    def _ask_clip(self) -> None:
        clip = self.peers.get("clip")
        if clip is not None and self.cuda_cause is None:
            self.send(clip, ReadCudaMemory(new_request_id()))

    def _try_nvml_again(self) -> None:
        from backends.vram import NvmlProbe

        try:
            probe = NvmlProbe(self.config.gpu.device)
        except NoGpu as failure:
            self._nvml_failed(failure)
            return
        try:  # a lost GPU often lets NVML open but not read: recovered only once it reads (no health flapping)
            probe.snapshot()
        except NoGpu as failure:
            probe.close()
            self._nvml_failed(failure)
            return
        self.probe.close()
        self.probe = probe
        self._nvml_ok()

    def _health(self) -> PartHealth:
        return PartHealth("gpu", self.degraded_reason is None, self.degraded_reason or "")

    # --- sampling ----------------------------------------------------------------------------------------
    def _read(self) -> VramSnapshot:
        if self.nvml_failure is not None and self.recovery.due(time.time()):
            self._try_nvml_again()
        if self.nvml_failure is None:
            try:
                return self.probe.snapshot()
            except NoGpu as failure:
                if self.probe.source != "nvml":
                    raise
                self._nvml_failed(failure)  # mid-run: GPU lost, driver reloaded
        self._ask_clip()
        return self.torch_reading if self.torch_reading is not None else self.probe.snapshot()

    def _sample(self) -> Any:
        return self._observe(self._read())

    def _observe(self, snapshot: VramSnapshot) -> VramSnapshot:
        event, answers = self.core.observe(snapshot, time.time())
        # Answers first: a step waits on each one, while the same change's ResourceChanged is news that can come
        # second (sent first, the coordinator would handle it before the answer the next step waits for).
        for reply_to, answer in answers:
            self.send(reply_to, answer)
        if event is not None:
            for watcher in self.watchers:
                self.send(watcher, event)
        return snapshot

    def receiveMsg_CudaMemory(self, msg: CudaMemory, sender: Any) -> None:
        """The CLIP process's torch reading (asked for, or pushed after a move); used only while NVML fails."""
        if self.nvml_failure is None:
            return
        if msg.snapshot is None:
            self.torch_reading, self.cuda_cause = None, msg.reason or "CUDA unusable in the CLIP process"
        else:
            self.torch_reading, self.cuda_cause = msg.snapshot, None
        self._update_fallback_reason()
        self.guarded("", None, self._observe, self.torch_reading or self.probe.snapshot())
        self._schedule_poll()

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
