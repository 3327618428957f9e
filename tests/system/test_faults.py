"""Faults Mai survives (issue #6), each a test against the real actor system, the Ollama and LM Studio doubles in
their own processes and one simulated GPU ledger:

- every supervised actor SIGKILLed, idle and in the middle of its operation: restarted with a new PID, its state
  rebuilt from the world (Ollama's /api/ps, where the ledger says CLIP's bytes are, LM Studio's loaded models, the
  saved mode), no second VLM allocation, and the client call in flight answered (a typed `MaiError` or a
  success) within its timeout;
- Ollama killed mid-load, answering 500, hanging past the timeout, then back: degraded with the reason,
  recovered without restarting Mai;
- LM Studio dropping the websocket mid-reply: the turn completes, and the history has it;
- the whole system SIGKILLed and started again: history, learned footprints and mode intact.

One Mai serves the whole module; each test first brings it to the state it needs. Restart times are printed
(`pytest -s`) as measured on the machine that runs the tests.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from mai.conversation import Mai
from mai.sim.gpu_ledger import GpuLedger, LedgerEvent
from messages.base import new_request_id
from messages.errors import MaiError, Reason
from messages.system import Ping
from tests.doubles.lmstudio import LmStudioDoubleProcess, lmstudio_double
from tests.doubles.ollama import OllamaDouble, ollama_double
from bootstrap.system import system_processes
from tests.system.harness import RunningMai, running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
VLM = "qwen2.5vl:7b"
VLM_OWNER = f"ollama:{VLM}"
ROLES = ("sampler", "vlm", "clip", "chat", "coordinator")
LOAD_S = 0.3  # the double's normal load time; tests that kill something mid-load slow it down


@dataclass
class World:
    system: RunningMai
    client: Any
    ollama: OllamaDouble
    lms: LmStudioDoubleProcess
    ledger: GpuLedger
    streaming: threading.Event = field(default_factory=threading.Event)  # set once a reply in flight streams

    def ps(self) -> list[str]:
        """What Ollama itself says is loaded (its /api/ps)."""
        with urllib.request.urlopen(f"{self.ollama.host}/api/ps", timeout=10) as response:
            return [m["name"] for m in json.loads(response.read())["models"]]

    def lms_loaded(self) -> list[str]:
        return [inst["identifier"] for inst in self.lms.state()["loaded"]]

    def log_events(self) -> list[dict]:
        log = Path(self.system.config.system.state_dir) / "mai.log"
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("faults")
    ledger_path = tmp / "gpu.sqlite"
    with ollama_double(tmp / "ollama", ledger=ledger_path, vram_bytes=16 * GiB, load_time_s=LOAD_S,
                       unload_delay_s=0.2) as ollama, lmstudio_double(tmp, ledger=ledger_path) as lms:
        sections = {
            "gpu": {"backend": "simulated", "simulated_total_mb": 16384, "simulated_ledger": str(ledger_path),
                    "sample_interval_s": 0.1},
            "ollama": {"host": ollama.host, "vlm_model": VLM, "idle_timeout_s": 600, "retries": 2,
                       "retry_backoff_s": 0.05, "request_timeout_s": 2, "load_timeout_s": 300, "unload_timeout_s": 10,
                       "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
            "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
            "chat": {"max_retries": 1, "retry_backoff_s": 0.05, "cooldown_s": 30, "switch_hysteresis_s": 0,
                     "reply_timeout_s": 60, "token_batch_ms": 20},
        }
        with running_mai(tmp, **sections) as system:
            client = system.client()
            try:
                wait_for(lambda: client.get_status().vlm.state in ("loaded", "unloaded"), timeout_s=30)
                wait_for(lambda: client.get_status().clip.ready, timeout_s=60)
                yield World(system, client, ollama, lms, GpuLedger(ledger_path))
            finally:
                client.close()


@pytest.fixture(autouse=True)
def no_handler_escapes(world) -> Iterator[None]:
    """No handler let an exception reach Thespian during the test (it would re-run the handler and drop the
    effects after the failure point: a reply, the next step)."""
    log = Path(world.system.config.system.state_dir) / "mai.log"
    start = log.stat().st_size
    yield
    with open(log, encoding="utf-8") as f:
        f.seek(start)
        escaped = [json.loads(line) for line in f if "retryable exception" in line or "handler.failed" in line]
    assert escaped == [], escaped[:2]


# --- helpers ------------------------------------------------------------------------------------------------------


def _pids(client: Any) -> dict[str, int | None]:
    return {role: (pong.pid if pong else None) for role, pong in client.ping_all(timeout_s=3).items()}


@dataclass(frozen=True)
class Actor:
    role: str
    address: Any
    pid: int


def _actor(client: Any, role: str) -> Actor:
    """The actor playing `role` now (ask while it is idle: a busy actor answers no ping)."""
    def found() -> Actor | None:
        address = client.system_info().address_of(role)
        pong = client._ask_address(address, Ping(new_request_id()), 3.0) if address is not None else None
        return Actor(role, address, pong.pid) if pong is not None else None

    return wait_for(found, timeout_s=30)


def _kill(actor: Actor) -> float:
    os.kill(actor.pid, signal.SIGKILL)
    return time.monotonic()


def _wait_restarted(client: Any, dead: Actor, killed_at: float) -> float:
    """Seconds from the SIGKILL until the supervisor names a successor and it answers. Never messages the dead
    address: Thespian's external tell to a dead actor blocks its context for the 35 s transmit retry period."""
    def answered() -> bool:
        address = client.system_info().address_of(dead.role)
        if address is None or address == dead.address:
            return False
        try:
            return client._ask_address(address, Ping(new_request_id()), 0.3).pid != dead.pid
        except MaiError:
            return False  # busy (with a step sent again to it): ask again

    wait_for(answered, timeout_s=60, interval_s=0.05)
    return time.monotonic() - killed_at


def _settled(client: Any, mode: str) -> Any:
    """The status once `mode` is reached with nothing left to do."""
    def done() -> Any:
        status = client.get_status()
        ok = status.mode == mode == status.target_mode and not status.plan and status.step_in_flight is None
        return status if ok else None

    return wait_for(done, timeout_s=60)


def _assert_reconciled(w: World, mode: str) -> Any:
    """What Mai says matches the world: the VLM per Ollama's /api/ps, CLIP per the ledger, the chat model per
    LM Studio; and every actor answers."""
    seen: list = []

    def matches() -> Any:
        status = _settled(w.client, mode)
        said = (status.vlm.state, status.clip.device, status.chat_model)
        truth = ("loaded" if VLM in w.ps() else "unloaded", "sim-gpu" if w.ledger.usage().get("clip", 0) else "cpu",
                 next((i.removeprefix("mai:") for i in w.lms_loaded()), None))
        seen[:] = [said, truth]
        return status if said == truth else None

    try:
        status = wait_for(matches, timeout_s=30)
    except AssertionError:
        if not seen:  # the mode was never reached
            raise
        raise AssertionError(f"Mai says (vlm, clip, chat) = {seen[0]}, the world says {seen[1]}") from None
    assert all(_pids(w.client).values()), "every actor answers"
    return status


def _vlm_allocations(events: list[LedgerEvent]) -> tuple[int, int]:
    """(loads begun, most VLM allocations held at once) on the ledger's record."""
    loads = held = most = 0
    for e in events:
        if e.owner != VLM_OWNER:
            continue
        if e.kind == "begin" and e.op == "load":
            loads += 1
        elif e.kind == "alloc" and e.nbytes > 0:
            held += 1
            most = max(most, held)
        elif e.kind == "free" and e.op == "released":
            held = 0
    return loads, most


def _last_seq(ledger: GpuLedger) -> int:
    events = ledger.events()
    return events[-1].seq if events else 0


def _since(ledger: GpuLedger, seq: int) -> list[LedgerEvent]:
    return [e for e in ledger.events() if e.seq > seq]


@contextmanager
def _in_background(call: Callable[[], Any]) -> Iterator[dict]:
    """Run a client call in a thread; afterwards the dict holds its `result` or `error` and `seconds`."""
    outcome: dict = {}

    def run() -> None:
        began = time.monotonic()
        try:
            outcome["result"] = call()
        except BaseException as err:  # noqa: BLE001 - the test asserts on whatever came back
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(120)
        assert not thread.is_alive(), "the client call hung"


def _answered(outcome: dict, timeout_s: float) -> None:
    """The call in flight came back within its timeout, with a success or a typed Mai error."""
    assert outcome["seconds"] <= timeout_s + 5, outcome
    if "error" in outcome:
        assert isinstance(outcome["error"], MaiError), repr(outcome["error"])


def _to_mode(w: World, mode: str) -> None:
    w.client.set_mode(mode, wait=True, timeout_s=60)
    _settled(w.client, mode)


def _report(what: str, seconds: float) -> None:
    print(f"\n[faults] {what}: {seconds:.2f} s")


def _what(outcome: dict) -> str:
    """How a call in flight came back, for the printed report."""
    if "error" in outcome:
        err = outcome["error"]
        return f"{type(err).__name__}, reason {getattr(err, 'reason', '?')}"
    return f"success: {type(outcome.get('result')).__name__}"


def _say(w: World, text: str) -> str:
    """One chat turn through `mai.Mai`, as a user's program sends it."""
    with Mai(config=w.system.config) as m:
        return m.process_message(text)


def _history(w: World) -> list[dict]:
    with Mai(config=w.system.config) as m:
        return m.get_conversation_history()


def _restarts(w: World) -> dict[str, int]:
    return {c.role: c.restarts for c in w.client.system_info().children}


def _degraded(w: World, part: str) -> str | None:
    return dict(w.client.get_status().degraded).get(part)


# --- SIGKILL of each actor, idle -------------------------------------------------------------------------------------

# The mode each actor is killed in: one that gives it something to rebuild from the world.
IDLE_MODE = {"sampler": "recording", "vlm": "recording", "clip": "autopilot", "chat": "recording",
             "coordinator": "recording"}
# A call a long-lived program makes straight to that actor (its client still knows the dead one's address).
DIRECT_CALL: dict[str, Callable[[Mai], Any]] = {
    "coordinator": lambda m: m.get_status(), "clip": lambda m: m.client.get_clip_device(),
    "chat": lambda m: m.get_conversation_history(),
}


@pytest.mark.parametrize("role", ROLES)
def test_sigkill_of_an_idle_actor_is_restarted_and_reconciled(world, role):
    w = world
    _to_mode(w, IDLE_MODE[role])
    _say(w, f"hello before the {role} dies")
    before = _assert_reconciled(w, IDLE_MODE[role])
    restarts = _restarts(w)
    mark = _last_seq(w.ledger)
    lms_loads = len(w.lms.frames(endpoint="loadModel"))

    program = Mai(config=w.system.config)
    direct = DIRECT_CALL.get(role, lambda m: None)
    direct(program)
    victim = _actor(w.client, role)
    killed_at = _kill(victim)
    seconds = _wait_restarted(w.client, victim, killed_at)
    _report(f"SIGKILL idle {role}: answering again after", seconds)
    with program:  # its next call finds the successor: no wait on the dead address (Thespian's 35 s retry)
        began = time.monotonic()
        direct(program)
        if role in DIRECT_CALL:
            _report(f"  a program's next {role} call (its client knew the dead address) answered after",
                    time.monotonic() - began)
        assert time.monotonic() - began < 15

    info = _restarts(w)
    assert info[role] == restarts[role] + 1 and all(info[r] == restarts[r] for r in ROLES if r != role)
    after = _assert_reconciled(w, IDLE_MODE[role])
    assert after.mode == before.mode  # the coordinator restores its saved mode
    if role == "clip":
        # The new mover starts on the CPU (its predecessor's GPU copy died with it); autopilot puts it back.
        assert after.clip.device == "sim-gpu" and w.ledger.usage().get("clip", 0) > 0
    if role in ("chat", "coordinator"):
        assert after.chat_model == before.chat_model  # adopted, or reported again, not forgotten
    if role == "sampler":  # the coordinator watches the new sampler: its readings are fresh
        wait_for(lambda: w.client.get_status().vram.taken_at > time.time() - 2, timeout_s=10)
    loads, most = _vlm_allocations(_since(w.ledger, mark))
    assert loads == 0 and most == 0, "nothing reloaded the VLM"
    assert len(w.lms.frames(endpoint="loadModel")) == lms_loads, "nothing reloaded the chat model"
    reply = _say(w, f"still there after the {role} died?")
    assert f"last_user=still there after the {role} died?" in reply


@contextmanager
def _subscribed(w: World, ttl_s: float) -> Iterator[list[tuple[float, Any]]]:
    """A client subscribed for the block (renewing every ttl_s / 3): (monotonic time, event) as they arrive."""
    listener = w.system.client()
    events: list[tuple[float, Any]] = []
    stop, ready = threading.Event(), threading.Event()

    def listen() -> None:
        for event in listener.subscribe(ttl_s=ttl_s, stop=stop, ready=ready):
            events.append((time.monotonic(), event))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the subscription was never acknowledged"
        yield events
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def _mode_event(events: list[tuple[float, Any]], mode: str, since: float = 0.0) -> float | None:
    return next((t for t, e in events if t >= since and type(e).__name__ == "ModeChanged" and e.mode == mode), None)


def test_a_subscription_follows_a_restarted_coordinator(world):
    """`mai events --follow` and an ExecutionLoop's subscribe() keep receiving events after the coordinator is
    restarted: the renewal finds the successor instead of renewing at the dead address forever."""
    w = world
    _to_mode(w, "recording")
    with _subscribed(w, ttl_s=3.0) as events:
        victim = _actor(w.client, "coordinator")
        _wait_restarted(w.client, victim, _kill(victim))
        time.sleep(2.0)  # past a renewal (every ttl_s / 3), which must have found the successor
        w.client.set_mode("autopilot", wait=True, timeout_s=60)
        wait_for(lambda: _mode_event(events, "autopilot"), timeout_s=30)
    _settled(w.client, "autopilot")


def test_a_restarted_coordinator_publishes_to_its_predecessors_subscribers_at_once(world):
    """Nothing between the restart and the next renewal is lost: the successor restores the subscriptions from the
    state dir, so the first event after the restart reaches a subscriber that renews only every 20 s."""
    w = world
    _to_mode(w, "recording")
    with _subscribed(w, ttl_s=60.0) as events:
        victim = _actor(w.client, "coordinator")
        _wait_restarted(w.client, victim, _kill(victim))
        asked_at = time.monotonic()
        w.client.set_mode("autopilot", wait=True, timeout_s=60)
        got = wait_for(lambda: _mode_event(events, "autopilot", since=asked_at), timeout_s=10)
        assert got - asked_at < 10  # the subscriber's next renewal is 20 s after it subscribed
    ready_lines = [e for e in w.log_events() if e["event"] == "coordinator.ready"]
    assert ready_lines[-1]["subscribers"] >= 1
    _settled(w.client, "autopilot")


def test_sigkill_of_the_supervisor_restarts_it_with_every_actor(world):
    """Thespian supervises nobody above the supervisor: the process that started Mai revives it, and the new
    actors reconcile from the world like any restarted actor (no reload, the mode kept, the history kept)."""
    w = world
    _to_mode(w, "recording")
    _say(w, "hello before the supervisor dies")
    before = _assert_reconciled(w, "recording")
    old_pid = w.client.system_info().supervisor_pid
    old_actors = {role: pid for role, pid in _pids(w.client).items() if pid is not None}
    assert len(old_actors) == len(ROLES)
    port = w.system.config.system.admin_port
    processes = len(system_processes(port))
    mark = _last_seq(w.ledger)
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def revived() -> bool:
        try:
            info = w.client.system_info()
        except MaiError:
            return False
        return info.supervisor_pid != old_pid and all(c.address is not None for c in info.children)

    wait_for(revived, timeout_s=90, interval_s=0.2)
    _report("SIGKILL supervisor: a new supervisor and all actors answering after", time.monotonic() - killed_at)
    after = _assert_reconciled(w, "recording")
    assert after.mode == before.mode
    # The old actors died with their supervisor: no orphan idles on with its model and sockets.
    wait_for(lambda: not [pid for pid in old_actors.values() if psutil.pid_exists(pid)], timeout_s=10)
    assert len(system_processes(port)) == processes
    loads, most = _vlm_allocations(_since(w.ledger, mark))
    assert loads == 0 and most == 0, "nothing reloaded the VLM"
    assert any(e.get("event") == "supervisor.revived" for e in w.log_events())
    reply = _say(w, "still there after the supervisor died?")
    assert "last_user=still there after the supervisor died?" in reply


# --- SIGKILL of each actor in the middle of its operation -------------------------------------------------------

CALL_TIMEOUT_S = 20.0  # the client call in flight: it must come back (answer or typed error) within this


@contextmanager
def _ledger_stalled(w: World) -> Iterator[None]:
    """The simulated GPU stops taking writes (a stalled device): whoever changes VRAM waits inside its operation."""
    conn = sqlite3.connect(w.ledger.path, timeout=30, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _vlm_loading(w: World) -> bool:
    return any(r["model"] == VLM and r["state"] == "loading" for r in w.ollama.state()["runners"])


def _step_in_flight(w: World, prefix: str) -> bool:
    return (w.client.get_status().step_in_flight or "").startswith(prefix)


def _kill_mid_operation(w: World, role: str, call: Callable[[], Any], midway: Callable[[], Any],
                        stall: Callable[[], Any] = nullcontext) -> tuple[dict, float]:
    """Start `call`, SIGKILL `role` once `midway()` holds (inside `stall()`), and wait for the call to come back.
    Returns the call's outcome and the seconds until the restarted actor answered."""
    victim = _actor(w.client, role)  # now: a busy actor answers no ping
    with _in_background(call) as outcome:
        with stall():
            wait_for(midway, timeout_s=20, interval_s=0.05)
            killed_at = _kill(victim)
        seconds = _wait_restarted(w.client, victim, killed_at)
    return outcome, seconds


@contextmanager
def _configured(double: Any, **slow: Any) -> Iterator[None]:
    """Change a double's settings for the block, then put its defaults back."""
    defaults = {"load_time_s": LOAD_S, "vram_release_lag_s": 0.0, "fragment_delay_s": 0.01}
    double.configure(**slow)
    try:
        yield
    finally:
        double.configure(**{key: defaults[key] for key in slow})


@dataclass
class MidOperation:
    """Killing `role` while it does `what`: the mode to start from, the client call in flight, when the kill
    lands, the mode Mai must end in (without being asked again), and checks of the world afterwards."""

    what: str
    start: str
    call: Callable[[World], Any]
    midway: Callable[[World], Any]
    end: str
    slow: Callable[[World], Any] = lambda w: nullcontext()
    stall: Callable[[World], Any] = lambda w: nullcontext()
    timeout_s: float = CALL_TIMEOUT_S


def _stream_a_long_reply(w: World) -> str:
    """A turn through `mai.Mai` that sets `w.streaming` once the reply streams; returns the text received."""
    w.streaming.clear()
    received = []
    with Mai(config=w.system.config, reply_timeout_s=8) as m:
        for text in m.stream_message("a long answer, please"):
            received.append(text)
            w.streaming.set()
    return "".join(received)


MID_OPERATION = {
    "vlm": MidOperation(
        "a VLM load", "autopilot", lambda w: w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S),
        _vlm_loading, "recording", slow=lambda w: _configured(w.ollama, load_time_s=2.0)),
    "clip": MidOperation(  # the successor creates its CLIP model (imports torch) before it moves it: slower
        "a move to the GPU", "idle", lambda w: w.client.migrate_clip_to_gpu(timeout_s=45),
        lambda w: _step_in_flight(w, "move CLIP to gpu"), "idle", stall=_ledger_stalled, timeout_s=45),
    "coordinator": MidOperation(
        "a mode change (VLM loading)", "autopilot",
        lambda w: w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S),
        _vlm_loading, "recording", slow=lambda w: _configured(w.ollama, load_time_s=2.0)),
    "chat": MidOperation(
        "a streamed reply", "recording", _stream_a_long_reply, lambda w: w.streaming.is_set(), "recording",
        slow=lambda w: _configured(w.lms, fragment_delay_s=0.4), timeout_s=8),
    "sampler": MidOperation(
        "a wait for freed VRAM", "recording",
        lambda w: w.client.set_mode("autopilot", wait=True, timeout_s=CALL_TIMEOUT_S),
        lambda w: _step_in_flight(w, "confirm VRAM recovered"), "autopilot",
        slow=lambda w: _configured(w.ollama, vram_release_lag_s=3.0)),
}


@pytest.mark.parametrize("role", ROLES)
def test_sigkill_of_an_actor_mid_operation(world, role):
    w, case = world, MID_OPERATION[role]
    _to_mode(w, "recording")  # a chat model loaded and the VLM in Ollama: every actor has something to rebuild
    _say(w, f"hello before the {role} dies")
    _to_mode(w, case.start)
    before = w.client.get_status()
    mark = _last_seq(w.ledger)
    lms_loads = len(w.lms.frames(endpoint="loadModel"))
    with case.slow(w):
        outcome, seconds = _kill_mid_operation(w, role, lambda: case.call(w), lambda: case.midway(w),
                                               lambda: case.stall(w))
    _report(f"SIGKILL {role} during {case.what}: answering again after", seconds)
    _report(f"  the call in flight came back ({_what(outcome)}) after", outcome["seconds"])
    _answered(outcome, case.timeout_s)

    status = _assert_reconciled(w, case.end)  # reached without the client asking again
    events = _since(w.ledger, mark)
    loads, most = _vlm_allocations(events)
    assert most <= 1, "never two VLM allocations at once"
    assert len(w.lms.frames(endpoint="loadModel")) == lms_loads, "the chat model was not loaded again"
    assert status.chat_model == before.chat_model
    if role == "vlm":  # Ollama aborted the dead loader's load; the successor loaded it once more
        assert any(e["kind"] == "load_aborted" for e in w.ollama.events())
        assert loads == 2 and "result" in outcome, (loads, outcome)
    if role == "coordinator":  # the loader finished the load; the new coordinator learned it from Ollama
        assert loads == 1 and "result" in outcome, (loads, outcome)  # the client asked the successor again
    if role == "clip":
        assert outcome.get("result") == "sim-gpu" and status.clip.device == "sim-gpu"
    if role == "sampler":  # the freed VRAM was still confirmed before CLIP moved to the GPU (invariant 4)
        freed = next(e for e in events if e.owner == VLM_OWNER and e.kind == "free" and e.op == "released")
        moved = next(e for e in events if e.owner == "clip" and e.kind == "begin" and e.op == "move_gpu")
        assert freed.seq < moved.seq and "result" in outcome
    if role == "chat":
        turns = _history(w)
        assert (turns[-2]["role"], turns[-2]["content"]) == ("user", "a long answer, please")
        assert (turns[-1]["role"], turns[-1]["status"]) == ("assistant", "interrupted")
    reply = _say(w, f"still there after the {role} died?")
    assert f"still there after the {role} died?" in reply  # (after an interrupted reply, joined to the last ask)


# --- Ollama misbehaving: killed mid-load, answering 500, hanging; LM Studio dropping the socket ---------------------


def test_ollama_killed_mid_load_degrades_then_recovers_when_it_comes_back(world):
    w = world
    _to_mode(w, "autopilot")
    restarts, mark = _restarts(w), _last_seq(w.ledger)
    w.ollama.configure(load_time_s=2.0)  # the restarted double starts with its normal load time again
    with _in_background(lambda: w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S)) as outcome:
        wait_for(lambda: _vlm_loading(w), timeout_s=20, interval_s=0.05)
        w.ollama.kill()
    _report(f"Ollama killed mid-load: set_mode(recording) came back ({_what(outcome)}) after", outcome["seconds"])
    _answered(outcome, CALL_TIMEOUT_S)
    assert outcome["error"].reason is Reason.BACKEND_UNREACHABLE
    reason = wait_for(lambda: _degraded(w, "vlm"), timeout_s=20)
    assert "unreachable" in reason and w.ollama.host in reason

    time.sleep(2.0)  # down for a while, then back
    came_back = time.monotonic()
    w.ollama.restart()
    wait_for(lambda: _degraded(w, "vlm") is None, timeout_s=30)
    status = _assert_reconciled(w, "recording")  # the mode last asked for is reached without being asked again
    _report("Ollama back: recording reached on its own after", time.monotonic() - came_back)
    assert status.vlm.state == "loaded" and _restarts(w) == restarts, "recovered without restarting any actor"
    assert _vlm_allocations(_since(w.ledger, mark))[1] <= 1


def test_ollama_answering_500_is_retried_then_degrades_then_recovers(world):
    w = world
    _to_mode(w, "autopilot")
    restarts = _restarts(w)
    w.ollama.configure(fail_next="error500", fail_count=1, fail_paths=["/api/generate"])
    reached = w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S)  # one 500, then a retry
    assert reached.mode == "recording"
    assert [r["status"] for r in w.ollama.requests("/api/generate")][-2:] == [500, 200]

    _to_mode(w, "autopilot")
    every_route = ["/api/generate", "/api/ps", "/api/version", "/api/tags", "/api/show"]
    w.ollama.configure(fail_next="error500", fail_count=10_000, fail_paths=every_route)
    try:
        began = time.monotonic()
        with pytest.raises(MaiError) as failed:
            w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S)
        _report(f"Ollama answering 500: set_mode(recording) failed ({failed.value.reason}) after",
                time.monotonic() - began)
        assert failed.value.reason in (Reason.BACKEND_UNREACHABLE, Reason.LOAD_FAILED)
        reason = wait_for(lambda: _degraded(w, "vlm"), timeout_s=20)
        assert "HTTP 500" in reason, reason
    finally:
        w.ollama.configure(fail_next=None, fail_count=0)
    wait_for(lambda: _degraded(w, "vlm") is None, timeout_s=30)
    assert _assert_reconciled(w, "recording").vlm.state == "loaded"
    assert _restarts(w) == restarts


def test_ollama_hanging_past_the_timeout_degrades_then_recovers(world):
    w = world
    _to_mode(w, "autopilot")
    restarts = _restarts(w)
    every_route = ["/api/generate", "/api/ps", "/api/version", "/api/tags", "/api/show"]
    w.ollama.configure(fail_next="hang", hang_s=8, fail_count=10_000, fail_paths=every_route)
    try:
        began = time.monotonic()
        with pytest.raises(MaiError) as failed:
            w.client.set_mode("recording", wait=True, timeout_s=CALL_TIMEOUT_S)
        _report(f"Ollama hanging: set_mode(recording) failed ({failed.value.reason}) after", time.monotonic() - began)
        assert failed.value.reason in (Reason.TIMEOUT, Reason.BACKEND_UNREACHABLE)
        assert time.monotonic() - began < CALL_TIMEOUT_S  # Ollama's own request timeouts, not the caller's
        reason = wait_for(lambda: _degraded(w, "vlm"), timeout_s=20)
        assert "did not answer" in reason, reason
    finally:
        w.ollama.configure(fail_next=None, fail_count=0)
    wait_for(lambda: _degraded(w, "vlm") is None, timeout_s=30)
    assert _assert_reconciled(w, "recording").vlm.state == "loaded"
    assert _restarts(w) == restarts


def test_lmstudio_dropping_the_websocket_mid_reply_loses_no_turn(world):
    w = world
    _to_mode(w, "recording")
    before = _say(w, "before the drop")
    model = before.split("]", 1)[0].removeprefix("[")  # the double's reply names the instance: "[mai:<key>] ..."
    restarts = _restarts(w)
    predicts = len(w.lms.frames(type="channelCreate", endpoint="predict"))
    w.lms.configure(midstream="drop")  # the next reply's socket is cut halfway, without a close frame
    with Mai(config=w.system.config) as m:
        reply = m.process_message("are you still there?")
        # A retry on the same model (chat.max_retries 1), not a fallback to the next one: the same instance
        # answered, no switch was made, and LM Studio was asked twice, both times for that model.
        assert reply.startswith(f"[{model}]") and m.last_reply.model == model.removeprefix("mai:"), reply
        assert m.last_reply.switches == (), m.last_reply.switches
    asked = w.lms.frames(type="channelCreate", endpoint="predict")[predicts:]
    assert len(asked) == 2, asked
    assert {json.dumps(frame["creationParameter"]["modelSpecifier"], sort_keys=True) for frame in asked} == \
        {json.dumps(asked[0]["creationParameter"]["modelSpecifier"], sort_keys=True)}
    assert "last_user=are you still there?" in reply
    turns = [(t["role"], t["status"], t["content"]) for t in _history(w)]
    assert turns[-2] == ("user", "complete", "are you still there?")
    assert turns[-1][:2] == ("assistant", "complete") and turns[-1][2] == reply
    assert "last_user=more" in _say(w, "more")  # the agent reconnected for good
    assert _degraded(w, "chat") is None and _restarts(w) == restarts


# --- the whole actor system SIGKILLed (kept last: it replaces the module's Mai and client) -------------------------


def test_whole_system_sigkill_mid_mode_change_keeps_history_footprints_and_mode(world):
    from bootstrap.system import system_processes

    w = world
    _to_mode(w, "recording")  # the VLM loaded once: its footprint is learned
    _say(w, "remember the number 42")
    history = [(t["role"], t["status"], t["content"]) for t in _history(w)]
    learned = w.client.get_status().vlm
    assert learned.footprint_learned
    _to_mode(w, "autopilot")
    port = w.system.config.system.admin_port

    w.ollama.configure(load_time_s=2.0)
    with _in_background(lambda: w.client.set_mode("recording", wait=True, timeout_s=8)) as outcome:
        wait_for(lambda: _vlm_loading(w), timeout_s=20, interval_s=0.05)
        processes = system_processes(port)
        for proc in processes:  # all at once, like a power cut for Mai alone
            proc.send_signal(signal.SIGKILL)
        wait_for(lambda: not system_processes(port), timeout_s=15)
    w.ollama.configure(load_time_s=LOAD_S)
    assert len(processes) >= 8
    _answered(outcome, 8)  # the caller got a typed error, it did not hang
    assert any(e["kind"] == "load_aborted" for e in w.ollama.events())  # Ollama dropped the dead loader's load

    began = time.monotonic()
    started = w.system.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    w.client.close()
    w.client = w.system.client()  # the old one knew the dead system's addresses
    status = w.client.get_status()
    _report("whole system SIGKILLed: from `mai start` to the coordinator's status", time.monotonic() - began)
    # The mode it was in and the mode it was asked for are restored (and said so), the footprint is not re-learned.
    assert status.target_mode == "recording" and status.mode in ("autopilot", "recording"), status
    assert status.vlm.footprint_learned and status.vlm.footprint_bytes == learned.footprint_bytes
    events = w.log_events()
    assert [e["restored_mode"] for e in events if e["event"] == "coordinator.ready"][-1] == "autopilot"
    assert [e["target"] for e in events if e["event"] == "coordinator.target_restored"][-1:] == ["recording"]
    status = _assert_reconciled(w, "recording")  # then reached, from what Ollama, the ledger and LM Studio hold
    assert status.vlm.state == "loaded"
    assert [(t["role"], t["status"], t["content"]) for t in _history(w)] == history
    assert "last_user=what was the number?" in _say(w, "what was the number?")
