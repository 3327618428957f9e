"""LM Studio installed but its server not started (real-servers.md L4: port 1234 answers only after "Start
server"): Mai chats with Ollama's models and `mai status` says, as the chat part's degraded reason, how to start
LM Studio's server. Nothing listens on the configured port, exactly as before "Start server"."""

from __future__ import annotations

import pytest

from mai.conversation import Mai
from mai.sim.ports import free_port
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30


def test_a_silent_lm_studio_degrades_chat_with_how_to_start_its_server(tmp_path):
    ledger = tmp_path / "gpu.sqlite"
    host = f"127.0.0.1:{free_port()}"
    with ollama_double(tmp_path / "ollama", ledger=ledger, vram_bytes=16 * GiB) as ollama:
        sections = {"gpu": {"simulated_total_mb": 16384, "simulated_ledger": str(ledger)},
                    "ollama": {"host": ollama.host}, "lmstudio": {"host": host, "request_timeout_s": 2},
                    "chat": {"reply_timeout_s": 60}}
        with running_mai(tmp_path, **sections) as system, Mai(config=system.config) as m:
            reason = wait_for(lambda: dict(m.client.get_status().degraded).get("chat"), timeout_s=30)
            assert reason.startswith(f"LM Studio at {host} is not serving: start its server with `lms server start`, "
                                     "or in LM Studio's Developer tab (Status: Running)")
            assert reason.endswith("(chat uses Ollama's models meanwhile)")
            assert "[llama3.2:3b]" in m.process_message("hello")  # chat still works, on Ollama
            status = system.cli("status")
            assert "lms server start" in status.stdout + status.stderr
