"""GPU arbitration end to end: the real actor system (separate processes), the Ollama double in its own process,
simulated CLIP, one GPU ledger shared by all of them. Invariants are checked on the ledger's time-ordered record,
not on what Mai says about itself."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from mai.sim.gpu_ledger import GpuLedger, over_commits, overlapping_operations
from messages.errors import MaiError, Reason
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
VLM = "qwen2.5vl:7b"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arbitration")
    ledger_path = tmp / "gpu.sqlite"
    with ollama_double(tmp / "ollama", ledger=ledger_path, vram_bytes=12 * GiB, load_time_s=0.3, unload_delay_s=0.2) as ollama:
        sections = {
            "gpu": {"backend": "simulated", "simulated_total_mb": 12288, "simulated_ledger": str(ledger_path),
                    "sample_interval_s": 0.1, "reserve_mb": 512},
            "ollama": {"host": ollama.host, "vlm_model": VLM, "idle_timeout_s": 2.5, "retries": 2,
                       "retry_backoff_s": 0.05, "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
        }
        with running_mai(tmp, **sections) as system:
            with system.client() as client:
                wait_for(lambda: client.get_status().vlm.state in ("loaded", "unloaded"), timeout_s=30)
                wait_for(lambda: client.get_status().clip.ready, timeout_s=60)
                yield system, client, ollama, GpuLedger(ledger_path)


def _ops(ledger: GpuLedger, since_seq: int) -> list:
    return [e for e in ledger.events() if e.seq > since_seq and e.kind in ("begin", "end")]


def _last_seq(ledger: GpuLedger) -> int:
    events = ledger.events()
    return events[-1].seq if events else 0


def _first(events: list, kind: str, owner_prefix: str, op: str):
    return next(e for e in events if e.kind == kind and e.owner.startswith(owner_prefix) and e.op == op)


def test_recording_moves_clip_off_the_gpu_before_the_vlm_load_starts(world):
    system, client, ollama, ledger = world
    client.set_mode("autopilot", wait=True, timeout_s=60)
    assert client.get_clip_device() == "sim-gpu"
    mark = _last_seq(ledger)
    reached = client.set_mode("recording", wait=True, timeout_s=60)
    assert reached.mode == "recording"
    events = _ops(ledger, mark)
    clip_off = _first(events, "end", "clip", "move_cpu")
    vlm_load = _first(events, "begin", "ollama:", "load")
    assert clip_off.seq < vlm_load.seq, "CLIP must be off the GPU before the VLM load starts (invariant 3)"
    status = client.get_status()
    assert status.vlm.state == "loaded" and status.clip.device == "cpu"
    assert ledger.usage().get(f"ollama:{VLM}", 0) > 0  # the VLM really holds VRAM in the shared ledger


def test_autopilot_confirms_the_unload_before_clip_moves_to_the_gpu(world):
    system, client, ollama, ledger = world
    client.set_mode("recording", wait=True, timeout_s=60)
    mark = _last_seq(ledger)
    used_before = ledger.snapshot().used_bytes
    reached = client.set_mode("autopilot", wait=True, timeout_s=60)
    events = [e for e in ledger.events() if e.seq > mark]
    vlm_freed = next(e for e in events if e.kind == "free" and e.owner.startswith("ollama:") and e.nbytes > 0)
    clip_move = _first(events, "begin", "clip", "move_gpu")
    assert vlm_freed.seq < clip_move.seq, "the VLM's VRAM must be back before CLIP moves (invariants 3 and 4)"
    assert vlm_freed.used_after < used_before  # invariant 4: used VRAM went down
    assert client.get_clip_device() == "sim-gpu"
    status = client.get_status()
    assert status.mode == "autopilot" and status.vlm.state == "unloaded"
    assert any("unload" in step for step in reached.steps)


def test_no_overlapping_vram_operations_and_no_over_commit(world):
    system, client, ollama, ledger = world
    for mode in ("recording", "autopilot", "recording", "idle", "autopilot"):
        client.set_mode(mode, wait=True, timeout_s=60)
    events = ledger.events()
    assert overlapping_operations(events) == []  # invariant 5
    assert over_commits(events, ledger.total_bytes) == []  # invariant 12 (the ledger refuses, and records, an over-commit)
    assert not [e for e in events if e.kind == "oom"]


def test_last_mode_asked_wins_across_concurrent_clients(world):
    system, client, ollama, ledger = world
    order: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with system.client() as own:
            for j in range(4):
                mode = ("autopilot", "recording", "idle")[(i + j) % 3]
                with lock:  # the order in which requests are sent is the order the coordinator's mailbox sees
                    own.set_mode(mode)
                    order.append(mode)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    last = order[-1]
    wait_for(lambda: client.get_status().mode == last and not client.get_status().plan and client.get_status().step_in_flight is None,
             timeout_s=60)
    assert client.get_status().target_mode == last  # invariant 6


def test_lease_loads_on_demand_and_idle_unload_publishes_an_event(world):
    system, client, ollama, ledger = world
    client.set_mode("autopilot", wait=True, timeout_s=60)
    client.ensure_vlm_unloaded(timeout_s=60)
    events: list = []
    stop, subscribed = threading.Event(), threading.Event()

    def listen() -> None:
        with system.client() as watcher:
            for event in watcher.subscribe(ttl_s=10, stop=stop, ready=subscribed):
                events.append(event)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(30), "the coordinator never acknowledged the subscription"
    with client.vlm(holder="system-test", timeout_s=60) as lease:  # invariant 9: loads on demand
        assert lease.model == VLM and lease.host == ollama.host
        held_until = time.monotonic() + 3.0  # longer than idle_timeout_s (2.5 s): a duration, not a wait
        while time.monotonic() < held_until:  # never unloaded while the lease is held (invariant 8)
            assert client.get_status().vlm.state == "loaded"
            time.sleep(0.2)
    client.set_mode("idle", wait=True, timeout_s=30)
    wait_for(lambda: client.get_status().vlm.state == "unloaded", timeout_s=20)
    wait_for(lambda: any(type(e).__name__ == "IdleUnloaded" for e in events), timeout_s=10)
    stop.set()


def test_embeddings_from_paths_and_shared_memory_agree(world, tmp_path):
    from PIL import Image

    system, client, ollama, ledger = world
    pixels = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(pixels):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    from_files = client.embed_images(paths)
    from_shm = client.embed_images(pixels)
    assert from_files.shape == from_shm.shape and from_files.shape[0] == 2
    np.testing.assert_allclose(from_files, from_shm, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(client.embed_texts(["a", "b"]), axis=1), 1.0, rtol=1e-5)
    with pytest.raises(MaiError) as missing:
        client.embed_images([tmp_path / "nope.png"])
    assert missing.value.reason is Reason.INVALID_REQUEST and "nope.png" in str(missing.value)


def test_status_is_complete_and_cli_speaks_json(world):
    system, client, ollama, ledger = world
    data = system.status_json()
    gpu = data["gpu"]
    for key in ("mode", "target_mode", "vram", "reserve_bytes", "vlm", "clip", "chat_model", "degraded", "plan", "step_in_flight"):
        assert key in gpu  # invariant 11
    assert gpu["vram"]["source"] == "simulated" and gpu["vram"]["total_bytes"] == 12 * GiB
    assert gpu["vlm"]["model"] == VLM and gpu["vlm"]["host"] == ollama.host
    result = system.cli("mode", "recording", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mode"] == "recording"
    text = system.cli("status")
    assert "mode       recording" in text.stdout and "vram" in text.stdout


def test_unreachable_ollama_degrades_and_requests_fail_fast_with_the_reason(world):
    system, client, ollama, ledger = world
    client.set_mode("autopilot", wait=True, timeout_s=60)
    ollama.kill()
    try:
        wait_for(lambda: any(part == "vlm" for part, _ in client.get_status().degraded), timeout_s=30)
        reason = dict(client.get_status().degraded)["vlm"]
        assert "unreachable" in reason.lower()
        began = time.monotonic()
        with pytest.raises(MaiError) as failed:
            client.ensure_vlm_loaded(timeout_s=30)
        assert failed.value.reason is Reason.BACKEND_UNREACHABLE
        assert time.monotonic() - began < 5  # fast, not at the timeout
    finally:
        ollama.restart()
    wait_for(lambda: not any(part == "vlm" for part, _ in client.get_status().degraded), timeout_s=30)
    assert client.ensure_vlm_loaded(timeout_s=60).loaded


def _subscribers(system) -> set:
    """The subscriber addresses the coordinator keeps for a successor (it writes them on every Subscribe)."""
    from bootstrap import safe_pickle
    from bootstrap.paths import subscribers_file

    try:
        entries = safe_pickle.loads(subscribers_file(system.config).read_bytes(), peer="subscribers file")
    except FileNotFoundError:
        return set()
    return {str(token) for token, _ in entries}


def test_events_cli_prints_mode_changes_as_json_lines(world):
    import subprocess
    import sys

    from tests.system.harness import ROOT, test_env

    system, client, ollama, ledger = world
    client.set_mode("idle", wait=True, timeout_s=60)
    before = _subscribers(system)
    proc = subprocess.Popen([sys.executable, "-m", "mai", "--config", str(system.config_path), "events", "--json", "--duration", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=test_env(), cwd=ROOT)
    wait_for(lambda: _subscribers(system) - before, timeout_s=30)  # it subscribed: no event after this is missed
    client.set_mode("recording", wait=True, timeout_s=60)
    client.set_mode("autopilot", wait=True, timeout_s=60)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    changes = [e for e in events if e["type"] == "ModeChanged"]
    assert [c["mode"] for c in changes][-2:] == ["recording", "autopilot"], (out, err)
    assert all(c["duration_s"] >= 0 and isinstance(c["steps"], list) for c in changes)


def test_mai_events_says_what_it_listens_to_and_when_nothing_happened(world):
    import subprocess
    import sys

    from tests.system.harness import ROOT, test_env

    system, client, ollama, ledger = world
    client.set_mode("idle", wait=True, timeout_s=60)
    result = subprocess.run([sys.executable, "-m", "mai", "--config", str(system.config_path), "events", "--json",
                             "--duration", "1"], capture_output=True, text=True, env=test_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result
    assert f":{system.config.system.admin_port} for 1 s" in result.stderr and "no events" in result.stderr


def test_the_example_execution_loop_runs_against_mai(world):
    import subprocess
    import sys

    from tests.system.harness import ROOT, test_env

    system, client, ollama, ledger = world
    env = test_env() | {"MAI_CONFIG": str(system.config_path)}
    result = subprocess.run([sys.executable, "examples/execution_loop.py", "--steps", "1"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "VLM says: [qwen2.5vl:7b]" in result.stdout  # the double's reply: the lease reached Ollama directly
    assert "CLIP on sim-gpu" in result.stdout and "final: mode autopilot" in result.stdout


def test_mai_mode_wait_shows_what_mai_is_doing_during_a_long_load(tmp_path):
    """A VLM load takes seconds (a cold one much longer): `mai mode recording --wait` says what it waits for instead
    of sitting silent, on stderr, so the one-line result on stdout stays the same for scripts."""
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=12 * GiB, load_time_s=2.0) as ollama:
        sections = {"gpu": {"simulated_ledger": str(ledger_path)}, "ollama": {"host": ollama.host, "vlm_model": VLM}}
        with running_mai(tmp_path, **sections) as system:
            with system.client() as client:
                wait_for(lambda: client.get_status().vlm.state == "unloaded" and client.get_status().clip.ready,
                         timeout_s=60)
            result = system.cli("mode", "recording", "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mode recording reached in ")
    assert f"mode recording: loading {VLM} for " in result.stderr  # not a terminal: one line per step it waited on
