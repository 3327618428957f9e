"""Issue 12, hole 8: the chat model switches when resources run short, between turns.

Real actor system, LM Studio and Ollama doubles, one simulated GPU ledger. Another program takes VRAM (an "other"
owner in the ledger, as a game or a second notebook would) while a reply streams: the reply finishes on the model
it started with, then — before the next turn, with no request from anyone — the agent switches down to the model
that still has room, with one log line saying why."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mai.conversation import Mai
from mai.sim.gpu_ledger import GpuLedger
from tests.doubles.lmstudio import lmstudio_double
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for
from tests.system.test_conversation import BIG, SMALL, GiB, _sections

pytestmark = pytest.mark.slow
MiB = 2**20
RESERVE = 512 * MiB  # gpu.reserve_mb in config/default.yaml


def test_another_program_taking_vram_switches_the_chat_model_down_after_the_reply(tmp_path: Path) -> None:
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=16 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms:
        sections = _sections(tmp_path, ledger_path, ollama, lms)
        sections["chat"]["switch_hysteresis_s"] = 30  # a model chosen for the shortage stays (no flapping back)
        with running_mai(tmp_path, **sections) as system, Mai(config=system.config) as m:
            assert m.process_message("hello").startswith(f"[mai:{BIG}]")
            gate = system.status_json()["gpu"]
            assert gate["chat_footprint_learned"], gate  # the agent chooses by the measured footprint too
            ledger = GpuLedger(ledger_path)

            lms.configure(fragment_delay_s=0.3)  # a slow reply: the other program arrives in the middle of it
            chunks: list[str] = []
            first = threading.Event()

            def talk() -> None:
                for chunk in m.stream_message("tell me a long story"):
                    chunks.append(chunk)
                    first.set()

            worker = threading.Thread(target=talk, daemon=True)
            worker.start()
            assert first.wait(20)
            # Leave the gate less than the 7B model holds (it no longer has room) but far more than the 3B one needs:
            # free VRAM drops below the reserve.
            taken = ledger.allocate("other", ledger.snapshot().free_bytes - RESERVE // 2)
            assert taken > 0
            assert system.status_json()["gpu"]["chat_model"] == BIG, "never switched in the middle of a reply"
            lms.configure(fragment_delay_s=0.01)
            worker.join(60)
            assert not worker.is_alive()
            assert m.last_reply.model == BIG and m.last_reply.status == "complete", m.last_reply
            assert "".join(chunks).startswith(f"[mai:{BIG}]")

            # Before any new turn, the agent moves to the model that has room.
            wait_for(lambda: system.status_json()["gpu"]["chat_model"] == SMALL, timeout_s=30)
            assert ledger.usage().get("other") == taken
            log = [json.loads(line) for line in
                   (Path(system.config.system.state_dir) / "mai.log").read_text().splitlines() if line.startswith("{")]
            switches = [e for e in log if e.get("event") == "chat.model" and e.get("model") == SMALL]
            assert len(switches) == 1 and "resources short" in switches[0]["reason"], switches
            assert BIG in switches[0]["reason"]  # the reason names what no longer fits

            reply = m.process_message("and now?")
            assert reply.startswith(f"[mai:{SMALL}]") and m.last_reply.switches == (), m.last_reply
