"""Issue 11's first "must show", end to end through `python -m mai`: with `ollama.vlm_model` spelled in a form
Ollama accepts but does not list (`Library/Qwen2.5VL:7B` for the double's `qwen2.5vl:7b`), `mai mode recording
--wait` reaches RECORDING and `mai mode autopilot --wait` unloads it. And a slow, silent load (O3) is visible
while it lasts: `mai status` and `mai mode --wait` say "loading Library/Qwen2.5VL:7B for N s"."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.doubles.ollama import ollama_double
from tests.system import harness
from tests.system.harness import ROOT, running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
LISTED = "qwen2.5vl:7b"  # how the double's /api/ps and /api/tags name it
CONFIGURED = "Library/Qwen2.5VL:7B"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama-names")
    ledger_path = tmp / "gpu.sqlite"
    with ollama_double(tmp / "ollama", ledger=ledger_path, vram_bytes=12 * GiB, load_time_s=0.3,
                       unload_delay_s=0.2) as ollama:
        sections = {
            "gpu": {"backend": "simulated", "simulated_total_mb": 12288, "simulated_ledger": str(ledger_path),
                    "sample_interval_s": 0.1},
            "ollama": {"host": ollama.host, "vlm_model": CONFIGURED, "idle_timeout_s": 600},
        }
        with running_mai(tmp, **sections) as system:
            with system.client() as client:
                wait_for(lambda: client.get_status().vlm.state in ("loaded", "unloaded"), timeout_s=30)
                wait_for(lambda: client.get_status().clip.ready, timeout_s=60)
                yield system, client, ollama


def _ps(ollama) -> list[str]:
    return [m["name"] for m in ollama._call("GET", "/api/ps")["models"]]


def test_a_non_canonical_vlm_name_reaches_recording_and_autopilot_unloads_it(world):
    system, client, ollama = world
    assert system.cli("mode", "autopilot", "--wait").returncode == 0

    recording = system.cli("mode", "recording", "--wait")

    assert recording.returncode == 0, recording.stderr + recording.stdout
    assert recording.stdout.startswith("mode recording reached")
    assert _ps(ollama) == [LISTED]
    status = client.get_status()
    assert (status.mode, status.vlm.model, status.vlm.state) == ("recording", CONFIGURED, "loaded")
    assert [r["body"]["model"] for r in ollama.requests("/api/generate")][-1] == CONFIGURED

    autopilot = system.cli("mode", "autopilot", "--wait")

    assert autopilot.returncode == 0, autopilot.stderr + autopilot.stdout
    assert _ps(ollama) == [] and client.get_status().vlm.state == "unloaded"
    assert [d for d in client.get_status().degraded if d[0] == "vlm"] == [], "no load_failed, no retry storm"
    failed = [r for r in ollama.requests("/api/generate") if r["status"] != 200]
    assert failed == []


def test_a_slow_load_succeeds_and_status_shows_it_loading_meanwhile(world):
    system, client, ollama = world
    assert system.cli("mode", "autopilot", "--wait").returncode == 0
    ollama.configure(load_time_s=4.0)  # silent for 4 s, like a cold load from a slow disk
    try:
        waiting = subprocess.Popen([sys.executable, "-m", "mai", "--config", str(system.config_path), "mode",
                                    "recording", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=harness.test_env(), cwd=ROOT)
        shown = []

        def loading_for() -> int | None:
            text = system.cli("status").stdout
            found = re.search(rf"now: loading {re.escape(CONFIGURED)} for (\d+) s", text)
            if found:
                shown.append(int(found.group(1)))
                assert re.search(rf"vlm +{re.escape(CONFIGURED)}: loading for \d+ s", text), text
            return found is not None and shown[-1] >= 1

        wait_for(loading_for, timeout_s=15, interval_s=0.3)
        assert _ps(ollama) == []  # the double hides a model while it loads (O18); Mai still shows the wait
        out, err = waiting.communicate(timeout=60)
    finally:
        ollama.configure(load_time_s=0.3)
    assert waiting.returncode == 0, err + out
    assert out.startswith("mode recording reached")
    assert f"mode recording: loading {CONFIGURED} for" in err  # `mai mode --wait` says the same
    assert client.get_status().vlm.state == "loaded" and _ps(ollama) == [LISTED]
    assert len([r for r in ollama.requests("/api/generate") if r["body"].get("keep_alive") == -1]) >= 1
