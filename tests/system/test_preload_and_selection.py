"""Issue 13 end to end: the real actor system, the LM Studio and Ollama doubles in their own processes, one simulated
GPU ledger. `mai preload` loads a chat model so the next turn starts without a load (the LM Studio double's
loadModel channels are the witness); a greeting stays on it; a long code question moves to the better model, with
one log line saying why; the preloaded model yields when RECORDING needs its VRAM; a preload that does not fit is
refused saying what is free and what would have to yield."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mai.conversation import Mai
from tests.doubles.lmstudio import lmstudio_double
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
BIG, SMALL = "qwen2.5-7b-instruct", "qwen2.5-3b-instruct"
LONG_CODE_QUESTION = "Please review this module and tell me what is wrong with it:\n```python\n" + "".join(
    f"def handler_{i}(request):\n    value = request.get('field_{i}')\n    return value * {i}\n\n"
    for i in range(160)) + "```\n"  # about 13,000 characters: 3,300 tokens, long from 2,000


def _sections(ledger_path: Path, ollama, lms, total_mb: int, **chat: object) -> dict:
    return {
        "gpu": {"backend": "simulated", "simulated_total_mb": total_mb, "simulated_ledger": str(ledger_path),
                "sample_interval_s": 0.1},
        "ollama": {"host": ollama.host, "retries": 1, "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
        "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
        "chat": {"max_retries": 1, "retry_backoff_s": 0.05, "cooldown_s": 30, "switch_hysteresis_s": 0,
                 "reply_timeout_s": 60, "token_batch_ms": 20, **chat},
    }


def _loads(lms) -> list[str]:
    return [json.dumps(f["creationParameter"]) for f in lms.frames(type="channelCreate", endpoint="loadModel")]


def _log(system) -> list[dict]:
    path = Path(system.config.system.state_dir) / "mai.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_preload_then_a_greeting_starts_without_a_load_and_long_code_moves_to_the_better_model(tmp_path):
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=16 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms, \
            running_mai(tmp_path, **_sections(ledger_path, ollama, lms, 16384)) as system, \
            Mai(config=system.config) as m:
        preload = system.cli("preload", SMALL, "--json")
        assert preload.returncode == 0, preload.stderr
        done = json.loads(preload.stdout)
        assert done["model"] == SMALL and not done["already_loaded"] and done["load_s"] > 0
        assert len(_loads(lms)) == 1 and SMALL in _loads(lms)[0]
        rows = {row["key"]: row for row in json.loads(system.cli("models", "--json").stdout)["models"]}
        assert rows[SMALL]["preloaded"] and rows[SMALL]["current"] and rows[SMALL]["loaded"], rows[SMALL]
        table = system.cli("models").stdout
        assert "yes (preloaded)" in table, table
        status = m.get_current_model_status()
        assert status["model"] == SMALL and status["preloaded"] and status["vram"]["total_bytes"] > 0, status
        assert m.get_system_status()["chat_model"] == SMALL

        # A greeting: the 7b fits and hysteresis is 0, yet the turn stays on the preloaded model: no load at all.
        reply = m.process_message("hi there")
        assert m.last_reply.model == SMALL and reply.startswith(f"[mai:{SMALL}]"), reply
        assert len(_loads(lms)) == 1, _loads(lms)
        again = system.cli("preload", SMALL, "--json")
        assert json.loads(again.stdout)["already_loaded"] and len(_loads(lms)) == 1

        # What would a long code question get? Asked without loading anything.
        selection = m.select_best_model(LONG_CODE_QUESTION)
        assert selection.model == BIG and selection.load_needed and {"code", "long"} <= set(selection.kinds)
        assert len(_loads(lms)) == 1

        # The long code question itself moves to the better model, and one log line says why.
        m.process_message(LONG_CODE_QUESTION)
        assert m.last_reply.model == BIG, m.last_reply
        assert len(_loads(lms)) == 2 and BIG in _loads(lms)[1]
        choices = [e for e in _log(system) if e.get("event") == "chat.choose"]
        assert [(e["model"], e["load"]) for e in choices] == [(SMALL, False), (BIG, True)], choices
        why = choices[-1]
        assert why["previous"] == SMALL and "tier 2 < 3" in why["reason"] and "code" in why["turn"], why
        assert "costs a load" in why["reason"], why
        rows = {row["key"]: row for row in json.loads(system.cli("models", "--json").stdout)["models"]}
        assert rows[BIG]["current"] and not rows[BIG]["preloaded"] and not rows[SMALL]["preloaded"]


def test_the_preloaded_model_yields_when_recording_needs_its_vram(tmp_path):
    """8 GiB: the 3b (2.6 GB) preloaded beside nothing else fits; RECORDING's VLM (6 GB) then needs its bytes."""
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=8 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms, \
            running_mai(tmp_path, **_sections(ledger_path, ollama, lms, 8192, leave_room_for_agent=False)) as system, \
            Mai(config=system.config) as m:
        with system.client() as client:
            wait_for(lambda: client.get_status().vlm.state != "unknown", timeout_s=60)
        done = m.preload_model(SMALL)
        assert done.model == SMALL and m.get_status()["chat_model"] == SMALL
        mode = system.cli("mode", "recording", "--wait", "--json", timeout_s=120)
        assert mode.returncode == 0, mode.stderr + mode.stdout
        assert any("yield" in step for step in json.loads(mode.stdout)["steps"]), mode.stdout
        status = m.get_status()
        assert status["mode"] == "recording" and status["vlm"]["state"] == "loaded" and not status["chat_model"]
        assert not any(r.preloaded or r.loaded for r in m.list_models().rows if r.key == SMALL)
        unloads = [e for e in _log(system) if e.get("event") == "chat.unloaded" and e.get("logger") == "mai.chat"]
        assert unloads and unloads[-1]["model"] == SMALL and unloads[-1]["reason"].startswith("yield"), unloads


def test_a_preload_that_does_not_fit_is_refused_with_the_reason(tmp_path):
    """8 GiB with the VLM's and CLIP's room kept for them (the default): the 7b (5,600 MB) cannot be granted."""
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=8 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms, \
            running_mai(tmp_path, **_sections(ledger_path, ollama, lms, 8192)) as system:
        with system.client() as client:
            wait_for(lambda: client.get_status().vlm.state != "unknown", timeout_s=60)
        refused = system.cli("preload", BIG)
        assert refused.returncode == 1, refused.stdout
        text = refused.stderr
        assert f"chat model {BIG} needs 5.5 GB" in text and "free" in text and "would have to yield" in text, text
        assert "kept for the VLM and CLIP" in text, text
        as_json = json.loads(system.cli("preload", BIG, "--json").stdout)
        assert as_json["error"] == "insufficient_vram" and int(as_json["details"]["needed_bytes"]) == 5600 * 2**20
        assert _loads(lms) == []  # nothing was loaded for it
