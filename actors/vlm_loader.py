"""VlmLoader: owns the Ollama adapter. Executes the load/unload steps the coordinator grants (retried with
backoff, timed out, idempotent, verified against /api/ps), probes Ollama while it is unreachable, and reports
what it observes. It blocks only its own mailbox while a load runs; status lives in the coordinator.

A load is always sent, never skipped because /api/ps lists the name: Ollama answers it at once for a loaded model
and re-pins it, and the row may be someone else's load or a stopping runner (real-servers.md O17). A load whose
read timeout expired is not retried: the hang-up aborted Ollama's load, and the same timeout would cut the next
one short again (O4)."""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from mai.core.retry import Backoff, is_retryable
from messages.errors import MaiError, Reason
from messages.failure import Failure
from messages.steps import LoadVlm, PartHealth, Reobserve, StepFailed, UnloadVlm, VlmLoaded, VlmObserved, VlmUnloaded
from messages.system import Init

RECONCILE_EVERY_S = 10.0  # notice external changes (another client's keep_alive, an Ollama restart)


class VlmLoader(MaiActor):
    role = "vlm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter: Any = None
        self.healthy: bool | None = None
        self.observed: VlmObserved | None = None
        self.probe_failures = 0
        self.timer_running = False

    def on_init(self, init: Init) -> None:
        from backends.ollama import OllamaAdapter

        o = init.config.ollama
        if self.adapter is not None:
            self.adapter.close()
        self.adapter = OllamaAdapter(o.host, num_ctx=o.num_ctx, request_timeout_s=o.request_timeout_s, load_timeout_s=o.load_timeout_s)
        self._probe()
        if not self.timer_running:
            self.timer_running = True
            self.wakeupAfter(datetime.timedelta(seconds=self._next_probe_s()))

    # --- observing Ollama ---------------------------------------------------------------------------------------
    def _coordinator(self) -> Any:
        return self.peers.get("coordinator")

    def _report(self, message: Any) -> None:
        if self._coordinator() is not None:
            self.send(self._coordinator(), message)

    def _probe(self) -> None:
        model = self.config.ollama.vlm_model
        read_at = time.time()
        try:
            self.adapter.version()
            state = self.adapter.state_of(model)
        except MaiError as err:
            self.probe_failures += 1
            if self.healthy is not False:
                self.log.warning("vlm.degraded", reason=str(err), host=self.config.ollama.host)
            self.healthy = False
            self._report(PartHealth("vlm", False, str(err)))  # names the host and what failed: refused, 500, hang
            return
        if self.healthy is not True:
            self.log.info("vlm.reachable", host=self.config.ollama.host)
            self._report(PartHealth("vlm", True))
        self.healthy, self.probe_failures = True, 0
        observed = VlmObserved(model, state is not None, state.size_bytes if state else 0,
                               state.size_vram_bytes if state else 0, pinned=state is None or state.pinned,
                               observed_at=read_at)
        if observed != self.observed:
            self.observed = observed
            self._report(observed)

    def _next_probe_s(self) -> float:
        o = self.config.ollama
        if self.healthy:
            return RECONCILE_EVERY_S
        return Backoff(o.probe_backoff_initial_s, o.probe_backoff_max_s).delay(self.probe_failures + 1)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        self.guarded("", None, self._probe)
        self.wakeupAfter(datetime.timedelta(seconds=max(0.1, self._next_probe_s())))

    def receiveMsg_Reobserve(self, msg: Reobserve, sender: Any) -> None:
        self._reobserve()

    def on_peers(self, restarted: frozenset[str]) -> None:
        """A new coordinator: report to it, even if its Reobserve overtook this news and was answered to its dead
        predecessor."""
        if "coordinator" in restarted:
            self._reobserve()

    def _reobserve(self) -> None:
        self.observed = None
        self.healthy = None
        self.guarded("", None, self._probe)

    # --- steps ------------------------------------------------------------------------------------------------
    def _with_retries(self, what: str, fn: Callable[[], Any]) -> tuple[Any, int]:
        o = self.config.ollama
        backoff = Backoff(o.retry_backoff_s, max(o.retry_backoff_s, 10.0))
        attempts = o.retries + 1  # `retries` counts the attempts after the first (the step timeout assumes so)
        for attempt in range(1, attempts + 1):
            time.sleep(backoff.delay(attempt))
            try:
                return fn(), attempt
            except MaiError as err:
                self.log.warning(f"vlm.{what}.attempt_failed", attempt=attempt, of=attempts, reason=err.reason.value, error=str(err))
                if attempt == attempts or not is_retryable(err) or _load_timed_out(err):
                    raise
        raise AssertionError("unreachable")

    def receiveMsg_LoadVlm(self, msg: LoadVlm, sender: Any) -> None:
        began = time.monotonic()
        try:
            # Idempotent: a load step delivered twice loads nothing twice; Ollama answers at once and re-pins.
            state, attempts = self._with_retries("load", lambda: self.adapter.load(msg.model))
        except MaiError as err:
            self._step_failed(msg.step_id, sender, err)
            return
        load_s = time.monotonic() - began
        if state.partial_offload:
            self.log.warning("vlm.partial_offload", model=msg.model, size=state.size_bytes, size_vram=state.size_vram_bytes)
        self.log.debug("vlm.load_done", model=msg.model, load_s=round(load_s, 3), attempts=attempts, size_vram=state.size_vram_bytes)
        self.observed = VlmObserved(msg.model, True, state.size_bytes, state.size_vram_bytes, pinned=state.pinned)
        self.send(sender, VlmLoaded(msg.step_id, msg.model, state.size_bytes, state.size_vram_bytes, load_s, attempts))

    def receiveMsg_UnloadVlm(self, msg: UnloadVlm, sender: Any) -> None:
        began = time.monotonic()
        wait_s = self.config.ollama.unload_timeout_s
        try:
            _, attempts = self._with_retries("unload", lambda: self.adapter.unload(msg.model, wait_gone_s=wait_s))
        except MaiError as err:
            self._step_failed(msg.step_id, sender, err)
            return
        unload_s = time.monotonic() - began
        self.log.debug("vlm.unload_done", model=msg.model, unload_s=round(unload_s, 3), attempts=attempts)
        self.observed = VlmObserved(msg.model, False)
        self.send(sender, VlmUnloaded(msg.step_id, msg.model, unload_s, attempts))

    def _step_failed(self, step_id: str, sender: Any, err: MaiError) -> None:
        self.log.error("vlm.step_failed", step_id=step_id, reason=err.reason.value, error=str(err))
        self.send(sender, StepFailed(step_id, Failure.from_error(step_id, err)))
        # Look at Ollama again now, not at the next reconcile: down, hung or answering 500 makes the VLM degraded
        # with that reason at once, and what it holds after the failure is reported (after the step's end, so
        # the coordinator takes it).
        self.observed = None
        self.guarded("", None, self._probe)


def _load_timed_out(err: MaiError) -> bool:
    """The load's own read timeout expired: Ollama aborted the load when we hung up (O4); retrying with the same
    timeout starts it from zero and ends the same way."""
    return err.reason is Reason.TIMEOUT and err.details.get("op") == "load"
