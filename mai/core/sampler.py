"""The VRAM sampler's decisions: when a reading is worth publishing, and when a wait-until-free is answered.

Publishing every 250 ms sample would flood subscribers; a change of at least `threshold_bytes` since the last
publication is news. Waits follow Ollama's own recovery rule: done when free memory rose by `fraction` of the
expected bytes over the baseline, or at the deadline (answered incomplete, never left hanging). While one is
pending the VRAM is read FIRST_POLL_S after the last reading, then twice as long each time up to the poll
interval: VRAM usually comes back within a few hundred milliseconds of an unload, and a fixed 250 ms poll added
half of that on average to every mode switch (a reading costs microseconds with NVML).

Where the readings come from when NVML fails is decided here too (`NvmlRecovery`, `fallback_reason`): NVML is
opened again with backoff unless its library is missing (real-servers.md N4), and meanwhile the CLIP process reads
the GPU with torch (N3: containers with CUDA but no libnvidia-ml), or host memory stands in when CUDA fails too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mai.core.retry import Backoff
from messages.events import ResourceChanged
from messages.resources import VramSnapshot
from messages.steps import VramRecovered, WaitVramFree


FIRST_POLL_S = 0.01


@dataclass
class _Wait:
    request: WaitVramFree
    reply_to: Any
    started: float
    deadline: float
    poll_s: float = FIRST_POLL_S  # the gap to the next reading, doubling
    next_poll: float = 0.0


@dataclass
class SamplerCore:
    threshold_bytes: int
    max_poll_s: float = 0.25  # Ollama's own recovery poll: waits are read at least this often
    last: VramSnapshot | None = None
    last_published_used: int | None = None
    waits: list[_Wait] = field(default_factory=list)

    def observe(self, snapshot: VramSnapshot, now: float) -> tuple[ResourceChanged | None, list[tuple[Any, VramRecovered]]]:
        """Take a reading: maybe an event to publish, and the waits it answers."""
        self.last = snapshot
        event = None
        if self.last_published_used is None:
            self.last_published_used = snapshot.used_bytes
        elif abs(snapshot.used_bytes - self.last_published_used) >= self.threshold_bytes:
            event = ResourceChanged(snapshot, snapshot.used_bytes - self.last_published_used, at=now)
            self.last_published_used = snapshot.used_bytes
        return event, self._answer(snapshot, now)

    def wait(self, request: WaitVramFree, reply_to: Any, now: float) -> None:
        self.waits.append(_Wait(request, reply_to, now, now + request.timeout_s, next_poll=now))

    def _answer(self, snapshot: VramSnapshot, now: float) -> list[tuple[Any, VramRecovered]]:
        answered, pending = [], []
        for w in self.waits:
            # Host memory (NVML and CUDA unusable) says nothing of VRAM: such a reading never confirms a recovery; the
            # wait goes on until a GPU reading shows the bytes back, or its deadline (answered incomplete).
            recovered = max(0, snapshot.free_bytes - w.request.baseline_free_bytes) if snapshot.gpu_present else 0
            complete = recovered >= w.request.fraction * w.request.expected_bytes
            if complete or now >= w.deadline:
                answered.append((w.reply_to, VramRecovered(w.request.step_id, snapshot, recovered, now - w.started, complete)))
            else:
                if now >= w.next_poll:
                    w.next_poll = now + w.poll_s
                    w.poll_s = min(w.poll_s * 2, self.max_poll_s)
                pending.append(w)
        self.waits = pending
        return answered

    def next_poll(self) -> float | None:
        """When the pending waits want the next reading (None: no wait pending)."""
        return min((min(w.next_poll, w.deadline) for w in self.waits), default=None)


@dataclass
class NvmlRecovery:
    """When to open NVML again after it failed at init or mid-run: `backoff` after the first failure, doubling.
    A missing library is permanent (no retry); every other failure clears by itself (DriverNotLoaded at boot,
    LibRmVersionMismatch after a driver upgrade, a GPU reset)."""

    backoff: Backoff
    failures: int = 0
    next_at: float | None = None

    def failed(self, now: float, permanent: bool) -> float | None:
        """Record a failure; returns when to try again (None: never)."""
        self.failures += 1
        self.next_at = None if permanent else now + self.backoff.delay(self.failures + 1)
        return self.next_at

    def recovered(self) -> None:
        self.failures, self.next_at = 0, None

    def due(self, now: float) -> bool:
        return self.next_at is not None and now >= self.next_at


def fallback_reason(nvml_cause: str, permanent: bool, torch_reading: bool, cuda_cause: str | None) -> str:
    """The degraded reason while NVML is unusable, naming where the readings come from instead:
    1. the CLIP process reads the GPU with torch: a GPU is there, only NVML is missing;
    2. CLIP says CUDA is unusable too: no GPU, host memory stands in;
    3. CLIP has not answered yet."""
    retry = "" if permanent else "; retrying NVML with backoff"
    if torch_reading:  # (1)
        return f"NVML unavailable ({nvml_cause}); VRAM read by torch.cuda.mem_get_info in the CLIP process{retry}"
    if cuda_cause is not None:  # (2)
        return f"no GPU: {nvml_cause}; CUDA: {cuda_cause}; using host memory via psutil{retry}"
    return f"NVML unavailable ({nvml_cause}); asking the CLIP process to read the GPU through torch{retry}"  # (3)
