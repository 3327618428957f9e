"""The people in `mai demo`: the agent (an ExecutionLoop and a chat user, driving Mai through its public APIs, every
call timed), the watcher (live status lines and Mai's published events), and the record they write to.

Imports beyond the stdlib happen inside functions, so `mai.cli` stays fast.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from mai.demo_world import VLM_MODEL, DemoWorld


# --- the record ------------------------------------------------------------------------------------------------------
class Recorder:
    """Every record of the run, from any thread: `{"source", "type", "t", ...}`; `t` is Unix time."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, source: str, type_: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
        record = {"source": source, "type": type_, "t": time.time() if t is None else t, **fields}
        with self._lock:
            self._records.append(record)
        return record

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._records)
        for r in items:
            r["t_s"] = round(r["t"] - self.t0, 3)
        # In time order, except that the run's description opens the file and its outcome closes it.
        return sorted(items, key=lambda r: ({"DemoStarted": 0, "DemoEnded": 2}.get(r["type"], 1), r["t"], r.get("seq", 0)))


def event_fields(event: Any) -> dict[str, Any]:
    """A published event as plain JSON-able fields (its `at` becomes the record's `t`)."""
    data = asdict(event) if is_dataclass(event) else {"value": repr(event)}
    data.pop("at", None)
    return data


def write_events(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w") as out:
        for record in records:
            out.write(json.dumps(record, default=str) + "\n")


def read_events(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- live status ---------------------------------------------------------------------------------------------------------
class Console:
    """Lines for the person watching, from any thread (stderr when stdout carries the JSON summary)."""

    def __init__(self, stream: TextIO, t0: float) -> None:
        self.stream = stream
        self.t0 = t0
        self._lock = threading.Lock()

    def say(self, text: str, *, stamp: bool = True) -> None:
        prefix = f"t+{time.time() - self.t0:5.1f}s " if stamp else ""
        with self._lock:
            print(prefix + text, file=self.stream, flush=True)


def status_line(mode: str, target: str, usage: dict[str, int], total_bytes: int, reserve_bytes: int,
                step: str | None, vlm_model: str, width: int = 40) -> str:
    """`autopilot  [VVVVCC.....:::] 6.6/8.0 GB  now: load qwen2.5vl:7b`: one letter per owner, ':' the reserve."""
    from mai.demo_story import owner_letter

    cells: list[str] = []
    used = 0
    for owner in sorted(usage, key=lambda o: "VCLO?".index(owner_letter(o, vlm_model))):
        start = round(width * used / total_bytes)
        used += usage[owner]
        cells += owner_letter(owner, vlm_model) * max(0, round(width * used / total_bytes) - start)
    reserve_cells = max(1, round(width * reserve_bytes / total_bytes))
    free_cells = max(0, width - len(cells))
    bar = "".join(cells[:width]) + "." * max(0, free_cells - reserve_cells) + ":" * min(reserve_cells, free_cells)
    mode_text = mode if target == mode else f"{mode}->{target}"
    line = f"{mode_text:<20} [{bar}] {used / 2**30:4.1f}/{total_bytes / 2**30:.1f} GB"
    return line + (f"  now: {step}" if step else "")


class StatusWatcher:
    """Polls Mai's status and the GPU ledger; prints a line whenever either changes. Also subscribes to Mai's
    events and records them."""

    def __init__(self, world: DemoWorld, recorder: Recorder, console: Console) -> None:
        self.world = world
        self.recorder = recorder
        self.console = console
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._poll, name="demo-status", daemon=True),
                        threading.Thread(target=self._listen, name="demo-events", daemon=True)]
        self.subscribed = threading.Event()

    def start(self) -> None:
        """Start polling and listening; return once Mai has acknowledged the subscription (or after 15 s)."""
        for thread in self.threads:
            thread.start()
        self.subscribed.wait(15)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)

    def _listen(self) -> None:
        from mai.client import connect
        from messages.errors import MaiError

        try:
            with connect(config=self.world.cfg) as client:
                for event in client.subscribe(ttl_s=15.0, stop=self.stop_event, ready=self.subscribed):
                    self.recorder.add("mai", type(event).__name__, getattr(event, "at", None), **event_fields(event))
        except MaiError as err:
            self.recorder.add("demo", "SubscriptionLost", reason=str(err))
        finally:
            self.subscribed.set()

    def _poll(self) -> None:
        from mai.client import connect
        from mai.sim.gpu_ledger import GpuLedger
        from messages.errors import MaiError

        ledger = GpuLedger(self.world.ledger_path)
        total = ledger.total_bytes
        last = ""
        try:
            with connect(config=self.world.cfg) as client:
                while not self.stop_event.wait(0.1):
                    try:
                        status = client.get_status(2.0)
                    except MaiError:
                        continue
                    line = status_line(status.mode, status.target_mode, ledger.usage(), total, status.reserve_bytes,
                                       str(status.step_in_flight) if status.step_in_flight else None, VLM_MODEL)
                    if line != last:
                        self.console.say("  " + line)
                        last = line
        except MaiError as err:
            self.console.say(f"  (status unavailable: {err})")


# --- the agent: what an ExecutionLoop and a chat user do, each call timed ------------------------------------------------
class Agent:
    """Drives Mai through its public APIs (`mai.connect()`, `mai.Mai`) and records every call with how long the
    agent was blocked. A failed call is recorded and the session goes on, as a real agent would."""

    def __init__(self, world: DemoWorld, recorder: Recorder, console: Console) -> None:
        from mai.client import connect
        from mai.conversation import Mai

        self.world = world
        self.recorder = recorder
        self.console = console
        self.client = connect(config=world.cfg)
        self.chat = Mai(config=world.cfg)
        self.shots = 0

    def close(self) -> None:
        self.chat.shutdown()
        self.client.close()

    def _call(self, what: str, fn: Callable[[], Any], *, waits: bool) -> Any:
        """Run one call; `waits`: the call's duration is time the agent spent waiting for Mai to arrange the GPU."""
        began = time.time()
        try:
            detail = fn()
        except Exception as err:  # noqa: BLE001 - Mai's typed errors, Ollama's, a timeout: recorded, and the session goes on
            ended = time.time()
            self.recorder.add("agent", "Call", began, what=what, t_end=ended, duration_s=round(ended - began, 3),
                              wait_s=round(ended - began, 3) if waits else None, ok=False, error=str(err))
            self.console.say(f"    {what} failed after {ended - began:.1f} s: {err}")
            return None
        ended = time.time()
        fields = detail if isinstance(detail, dict) else {}
        wait_s = fields.pop("wait_s", ended - began if waits else None)
        self.recorder.add("agent", "Call", began, what=what, t_end=ended, duration_s=round(ended - began, 3),
                          wait_s=None if wait_s is None else round(wait_s, 3), ok=True, **fields)
        return detail

    def beat(self, phase: str, text: str) -> None:
        self.recorder.add("agent", "Beat", phase=phase, text=text)
        self.console.say(f">> {text}")

    def set_mode(self, mode: str) -> None:
        def run() -> dict:
            reached = self.client.set_mode(mode, wait=True, timeout_s=90)
            return {"mode": reached.mode, "steps": list(reached.steps)}

        self._call(f"set_mode {mode}", run, waits=True)

    def embed_crops(self, count: int = 16) -> None:
        import numpy as np

        crops = np.random.default_rng(self.shots).integers(0, 255, (count, 224, 224, 3), dtype=np.uint8)
        self.shots += 1

        def run() -> dict:
            vectors = self.client.embed_images(crops)
            query = self.client.embed_texts(["the Save button"])[0]
            return {"crops": count, "best_crop": int(np.argmax(vectors @ query)), "device": self.client.get_clip_device()}

        self._call("clip_embed", run, waits=False)

    def describe_screen(self) -> None:
        """Lease the VLM (Mai loads it if needed: the agent waits), then call Ollama directly, as a real agent."""
        lease = self._call("vlm_lease", lambda: self.client.vlm(holder="demo-agent", timeout_s=90), waits=True)
        if lease is None:
            return
        try:
            self._call("vlm_call", lambda: self._ask_vlm(lease), waits=False)
        finally:
            self._call("vlm_release", lambda: lease.release(), waits=False)

    def _ask_vlm(self, lease: Any) -> dict:
        import ollama

        reply = ollama.Client(host=lease.host, timeout=60).chat(
            model=lease.model,
            messages=[{"role": "user", "content": "Describe this screen in one sentence.", "images": [self._screenshot()]}],
            options={"num_ctx": lease.num_ctx})
        return {"model": lease.model, "reply": (reply.message.content or "")[:80]}

    def _screenshot(self) -> bytes:
        import io

        import numpy as np
        from PIL import Image

        self.shots += 1
        pixels = np.random.default_rng(self.shots).integers(0, 255, (64, 96, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    def chat_turn(self, text: str) -> None:
        def run() -> dict:
            began = time.monotonic()
            first: float | None = None
            for _ in self.chat.stream_message(text):
                if first is None:
                    first = time.monotonic() - began
            done = self.chat.last_reply
            return {"model": done.model if done else None, "status": done.status if done else None,
                    "switches": list(done.switches) if done else [], "first_token_s": round(first or 0.0, 3),
                    "reply": (done.content if done else "")[:80], "wait_s": first}

        self._call("chat_turn", run, waits=True)

    def wait_until_vlm_unloaded(self, timeout_s: float) -> None:
        """Do nothing until Mai has unloaded the VLM and confirmed its VRAM came back (at once if it is not loaded,
        e.g. it never fitted): the next step then starts from the state the story needs, however slow the machine."""
        def run() -> dict:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                status = self.client.get_status()
                if status.vlm.state == "unloaded" and status.step_in_flight is None and not status.plan:
                    return {}
                time.sleep(0.1)
            raise RuntimeError(f"the VLM was still loaded after {timeout_s:.0f} s")

        self._call("wait_until_vlm_unloaded", run, waits=False)

