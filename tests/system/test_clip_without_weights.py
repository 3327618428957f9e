"""Mai with a CLIP that cannot get its weights still reaches RECORDING, and says why CLIP is degraded (issue 12,
Must show). The real Mai (separate processes, driven through `python -m mai` as a user does), the Ollama double, and
the real open_clip factory path inside the CLIP mover (the simulated backend wraps the real OpenClipAdapter; only the
GPU is the ledger): the real ViT-B-32 architecture, failing as it does for a user —
(a) no network for Hugging Face: HF_HUB_OFFLINE=1 and a weights tag that is not in the (empty) cache, so
    huggingface_hub raises LocalEntryNotFoundError, which open_clip wraps twice; retried, and status says so;
(b) a corrupt checkpoint: a file of garbage bytes named x.safetensors, so safetensors raises SafetensorError; not
    retried, and status says what to fix.
`mai mode recording --wait` is asked at once after `mai start`, before the mover has said anything: the race a user
meets."""

from __future__ import annotations

import os
import time

import pytest

from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
VLM = "qwen2.5vl:7b"


def _sections(ollama_host: str, ledger_path, pretrained: str) -> dict:
    return {
        "gpu": {"backend": "simulated", "simulated_total_mb": 12288, "simulated_ledger": str(ledger_path),
                "sample_interval_s": 0.1},
        "clip": {"backend": "simulated", "model": "ViT-B-32", "pretrained": pretrained},
        "ollama": {"host": ollama_host, "vlm_model": VLM, "retries": 2, "retry_backoff_s": 0.05,
                   "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
    }


def _clip_degraded_line(system) -> str:
    text = system.cli("status").stdout
    return next((line for line in text.splitlines() if line.startswith("degraded") and " clip: " in line), "")


def test_recording_without_network_for_hugging_face_and_status_names_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # nothing cached, whatever this machine has
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=12 * GiB, load_time_s=0.3) as ollama:
        with running_mai(tmp_path, **_sections(ollama.host, ledger_path, "laion2b_s34b_b79k")) as system:
            result = system.cli("mode", "recording", "--wait", timeout_s=120)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.startswith("mode recording reached in ")
            line = wait_for(lambda: _clip_degraded_line(system), timeout_s=60)
            assert "LocalEntryNotFoundError" in line and "HF_HUB_OFFLINE" in line and "retrying in" in line
            gate = system.status_json()["gpu"]
            assert gate["mode"] == "recording" and gate["vlm"]["state"] == "loaded"
            assert gate["clip"]["ready"] is False and gate["clip"]["device"] == "cpu"
            assert "still being created" not in system.cli("status").stdout


def test_a_corrupt_checkpoint_is_named_within_a_minute_and_recording_still_works(tmp_path):
    checkpoint = tmp_path / "x.safetensors"
    checkpoint.write_bytes(os.urandom(64 * 1024))
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=12 * GiB, load_time_s=0.3) as ollama:
        with running_mai(tmp_path, **_sections(ollama.host, ledger_path, str(checkpoint))) as system:
            began = time.monotonic()
            line = wait_for(lambda: _clip_degraded_line(system), timeout_s=60)
            assert time.monotonic() - began < 60
            assert str(checkpoint) in line and "SafetensorError" in line and "not retried: fix clip.pretrained" in line
            result = system.cli("mode", "recording", "--wait", timeout_s=120)
            assert result.returncode == 0, result.stdout + result.stderr
            assert system.status_json()["gpu"]["vlm"]["state"] == "loaded"
