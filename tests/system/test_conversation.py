"""The conversation agent end to end: real actor system, LM Studio and Ollama doubles in their own processes,
one simulated GPU ledger. The doubles' replies are derived from the whole history they received
("messages=<n> ... digest=..."), so these tests prove what context reached which model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mai.conversation import Mai
from tests.doubles.lmstudio import lmstudio_double
from tests.doubles.ollama import ollama_double
from tests.system.harness import mai, running_mai, wait_for, write_config

pytestmark = pytest.mark.slow
GiB = 2**30
BIG, SMALL = "qwen2.5-7b-instruct", "qwen2.5-3b-instruct"


def _sections(tmp, ledger_path, ollama, lms) -> dict:
    return {
        "gpu": {"backend": "simulated", "simulated_total_mb": 16384, "simulated_ledger": str(ledger_path), "sample_interval_s": 0.1},
        "ollama": {"host": ollama.host, "retries": 1, "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
        "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
        "chat": {"max_retries": 1, "retry_backoff_s": 0.05, "cooldown_s": 30, "switch_hysteresis_s": 0,
                 "reply_timeout_s": 60, "token_batch_ms": 20},
    }


@pytest.fixture
def world(tmp_path):
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=16 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms:
        yield tmp_path, ledger_path, ollama, lms


def _turns(history: list[dict]) -> list[tuple[str, str, str]]:
    return [(h["role"], h["status"], h["content"]) for h in history if h["role"] != "system"]


def test_replies_carry_the_whole_history_and_survive_a_model_switch(world):
    tmp, ledger_path, ollama, lms = world
    with running_mai(tmp, **_sections(tmp, ledger_path, ollama, lms)) as system, Mai(config=system.config) as m:
        first = m.process_message("hello there")
        assert f"[mai:{BIG}] messages=2" in first  # system prompt + the user's message, best tier that fits
        second = m.process_message("and again")
        assert "messages=4" in second
        assert m.get_status()["chat_model"] == BIG
        m.switch_model(SMALL)
        third = m.process_message("after the switch")
        assert f"[mai:{SMALL}] messages=6" in third  # invariant 14: the new model got the conversation
        assert "last_user=after the switch" in third
        history = m.get_conversation_history()
        turns = _turns(history)
        assert [t[0] for t in turns] == ["user", "assistant"] * 3 and all(t[1] == "complete" for t in turns)
        assert [h["model"] for h in history if h["role"] == "assistant"] == [BIG, BIG, SMALL]
        listing = m.list_models()
        assert listing.pinned == SMALL and any(r.key == SMALL and r.current and r.loaded for r in listing.rows)
        cli = system.cli("models", "--json")
        assert cli.returncode == 0, cli.stderr
        rows = {row["key"]: row for row in json.loads(cli.stdout)["models"]}
        assert rows[SMALL]["current"] and rows[SMALL]["pinned"] and rows[SMALL]["loaded"]
        assert not rows["llama3.2:3b"]["current"]
        switched = system.cli("switch", "auto")
        assert switched.returncode == 0 and "automatic again" in switched.stdout
        assert m.list_models().pinned is None
        unknown = system.cli("switch", "gpt-17")
        assert unknown.returncode == 1 and "unknown chat model 'gpt-17'" in unknown.stderr


def test_a_failing_model_is_replaced_silently_and_the_reply_arrives(world):
    tmp, ledger_path, ollama, lms = world
    with running_mai(tmp, **_sections(tmp, ledger_path, ollama, lms)) as system, Mai(config=system.config) as m:
        m.process_message("warm up")
        lms.configure(model_failures={BIG: "error"})  # reloads of the big model fail from now on
        lms.configure(midstream="modelUnloaded")       # ... and the current reply dies halfway
        reply = m.process_message("are you still there?")
        assert "messages=4" in reply and "last_user=are you still there?" in reply
        assert m.last_reply.switches, "the switch is recorded (and logged), not shown as an error"
        # The fallback is the next model of the chain (same tier as llama3.2:3b, ahead of it in the chain), not
        # any model that happens to work.
        assert m.last_reply.model == SMALL and reply.startswith(f"[mai:{SMALL}]"), (m.last_reply, reply)
        assert any(BIG in s for s in m.last_reply.switches), m.last_reply.switches


def test_the_choice_counts_vram_a_model_that_cannot_be_granted_is_never_loaded(tmp_path):
    """On a 5 GiB GPU the 5.6 GB best model cannot be granted (5 GiB less the reserve): the agent chooses
    the next model from the grantable VRAM at once. Ignoring VRAM would load (or be refused) the big one first."""
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=5 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms:
        sections = _sections(tmp_path, ledger_path, ollama, lms)
        sections["gpu"]["simulated_total_mb"] = 5120
        with running_mai(tmp_path, **sections) as system, Mai(config=system.config) as m:
            with system.client() as client:
                status = wait_for(lambda: (s := client.get_status()).vlm.state != "unknown" and s, timeout_s=60)
            reply = m.process_message("hello on a small GPU")
            assert reply.startswith(f"[mai:{SMALL}]") and m.last_reply.model == SMALL, (reply, status)
            assert m.last_reply.switches == (), m.last_reply.switches  # chosen, not fallen back to
            loads = [f["creationParameter"] for f in lms.frames(type="channelCreate", endpoint="loadModel")]
            assert loads and all(BIG not in json.dumps(p) for p in loads), loads
            # Nor asked the gate for it (a refused ChatNeeds is silent in the reply, not in the log).
            log = Path(system.config.system.state_dir) / "mai.log"
            chosen = [e["model"] for e in map(json.loads, log.read_text().splitlines()) if e.get("event") == "chat.choose"]
            assert chosen == [SMALL], chosen


def test_killing_the_agent_mid_reply_loses_no_completed_turn(world):
    tmp, ledger_path, ollama, lms = world
    with running_mai(tmp, **_sections(tmp, ledger_path, ollama, lms)) as system, Mai(config=system.config) as m:
        m.process_message("first question")
        lms.configure(fragment_delay_s=0.5)  # a slow reply: time to kill the agent in the middle of it
        with system.client() as client:
            agent_pid = client.ping_all()["chat"].pid
        got_chunk = threading.Event()
        errors: list[BaseException] = []

        def talk() -> None:
            try:
                for _ in m.stream_message("second question, interrupted"):
                    got_chunk.set()
            except BaseException as err:  # noqa: BLE001 - the client sees a typed error or a timeout
                errors.append(err)

        worker = threading.Thread(target=talk, daemon=True)
        worker.start()
        assert got_chunk.wait(20)
        time.sleep(0.7)  # let a checkpoint of the partial reply reach the store
        os.kill(agent_pid, signal.SIGKILL)
        lms.configure(fragment_delay_s=0.01)
        with system.client() as client:
            wait_for(lambda: (p := client.ping_all().get("chat")) is not None and p.pid != agent_pid, timeout_s=30)
        history = _turns(Mai(config=system.config).get_conversation_history())
        assert history[0][:2] == ("user", "complete") and history[1][:2] == ("assistant", "complete")
        assert history[2][0] == "user" and history[2][2] == "second question, interrupted"
        assert history[3][0] == "assistant" and history[3][1] == "interrupted"  # marked, and never fed back
        again = Mai(config=system.config).process_message("third")
        # The interrupted reply is not fed back, so the two user messages are adjacent and merged into one turn:
        # system, user, assistant, user (both texts).
        assert "messages=4" in again and "last_user=second question, interrupted third" in again


def test_history_survives_a_sigkill_of_the_whole_system(world):
    from bootstrap.system import system_processes

    tmp, ledger_path, ollama, lms = world
    config = write_config(tmp, **_sections(tmp, ledger_path, ollama, lms))
    assert mai(config, "start").returncode == 0
    try:
        from config import load_config

        cfg = load_config(config, env={})
        with Mai(config=cfg) as m:
            m.process_message("remember the number 42")
            m.process_message("and the colour blue")
        for proc in system_processes(cfg.system.admin_port):
            proc.send_signal(signal.SIGKILL)
        wait_for(lambda: not system_processes(cfg.system.admin_port), timeout_s=15)
        assert mai(config, "start").returncode == 0
        with Mai(config=cfg) as m:
            turns = _turns(m.get_conversation_history())
            assert [t[2] for t in turns if t[0] == "user"] == ["remember the number 42", "and the colour blue"]
            assert all(t[1] == "complete" for t in turns)
            assert "messages=6" in m.process_message("what did I say?")
    finally:
        mai(config, "stop")
