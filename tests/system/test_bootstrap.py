"""The foundation, as a user meets it: start, status, a second start, a killed actor, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from bootstrap.system import system_processes
from tests.system.harness import mai, running_mai, wait_for, write_config

pytestmark = pytest.mark.slow


def _system_pids(port: int) -> set[int]:
    return {p.pid for p in system_processes(port)}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with running_mai(tmp_path_factory.mktemp("mai")) as running:
        yield running


def test_status_answers_with_every_actor_and_the_config(system):
    # The CLIP actor is busy creating its model (torch import) for a few seconds after start.
    def all_answer():
        data = system.status_json()
        return data if all(a["answers"] for a in data["actors"]) else None

    data = wait_for(all_answer, timeout_s=60)
    assert data["running"] is True and data["version"]
    roles = {a["role"]: a for a in data["actors"]}
    assert set(roles) == {"sampler", "vlm", "clip", "chat", "coordinator"}
    assert data["config"]["system"]["admin_port"] == system.config.system.admin_port
    assert data["uptime_s"] >= 0


def test_every_listening_socket_is_on_loopback(system):
    pids = _system_pids(system.config.system.admin_port)
    assert len(pids) >= 8  # admin, logger, supervisor and its five children
    listening = [c for c in psutil.net_connections("tcp") if c.pid in pids and c.status == psutil.CONN_LISTEN]
    assert listening, "the system has listening sockets"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


def test_second_start_reports_the_running_system(system):
    before = _system_pids(system.config.system.admin_port)
    result = system.cli("start")
    assert result.returncode == 0
    assert "Mai 0.1.0 is running on port" in result.stdout
    assert _system_pids(system.config.system.admin_port) == before  # nothing new was started


def test_killed_child_is_restarted_by_the_supervisor(system):
    with system.client() as client:
        old = client.ping_all()["sampler"]
        os.kill(old.pid, signal.SIGKILL)

        def restarted():
            info = client.system_info()
            pong = client.ping_all().get("sampler")
            return pong is not None and pong.pid != old.pid and info.children[0].restarts >= 1 and pong

        new = wait_for(restarted, timeout_s=20)
    assert new.pid != old.pid
    assert any(a["role"] == "sampler" and a["restarts"] >= 1 for a in system.status_json()["actors"])


def test_start_refuses_a_port_held_by_another_program(tmp_path):
    config = write_config(tmp_path)
    from config import load_config

    cfg = load_config(config, env={})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.system.admin_port))
        squatter.listen()
        result = mai(config, "start")
    assert result.returncode == 1
    assert "not a Thespian actor system" in (result.stdout + result.stderr)
    with socket.socket() as probe:  # no admin was started behind the squatter
        assert probe.connect_ex(("127.0.0.1", cfg.system.admin_port)) != 0


def test_status_and_stop_when_not_running(tmp_path):
    config = write_config(tmp_path)
    status = mai(config, "status", "--json")
    assert status.returncode == 3
    assert json.loads(status.stdout) == {"running": False, "reason": json.loads(status.stdout)["reason"]}
    assert "not running" in json.loads(status.stdout)["reason"]
    stop = mai(config, "stop")
    assert stop.returncode == 0 and "not running" in stop.stdout


def test_a_reader_that_leaves_early_gets_no_error_message(tmp_path):
    """`mai status --json | head -c 100`: the pipe closes under mai; a shell tool stays quiet about that."""
    import subprocess
    import sys

    from tests.system.harness import ROOT, test_env

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before mai writes a byte
    try:
        result = subprocess.run([sys.executable, "-m", "mai", "--config", str(write_config(tmp_path)), "status",
                                 "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=90,
                                env=test_env(), cwd=ROOT)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_stop_leaves_no_process_and_frees_the_port(tmp_path):
    with running_mai(tmp_path) as system:
        port = system.config.system.admin_port
        pids = _system_pids(port)
        assert pids
        stopped = system.cli("stop")
        # One sentence on the terminal; the details go to the log.
        assert stopped.returncode == 0 and stopped.stdout.startswith("Mai stopped in ") and stopped.stderr == ""
        log = (Path(system.config.system.state_dir) / "mai.log").read_text().splitlines()
        assert json.loads(log[-1])["event"] == "system.stopped" and json.loads(log[-1])["killed"] == []
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids), timeout_s=15)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_actors_start_in_any_order_without_errors_or_message_storms(system):
    """Peers' first messages can overtake an actor's Init; they must wait for it, not fail (and a failure
    reply must never be answered with another one)."""
    import json as _json
    from pathlib import Path

    log = Path(system.config.system.state_dir) / "mai.log"
    events = [_json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    failed = [e for e in events if e["event"] in ("handler.failed", "message.unrecognized")]
    assert failed == [], failed[:3]


def test_without_ollama_the_example_loop_gets_autopilot_and_a_reason_for_recording(tmp_path):
    """README's promise: Mai runs without Ollama, reporting the degraded part. An ExecutionLoop then gets AUTOPILOT
    (CLIP on the GPU: nothing is known to unload, and CLIP is fitted against the real reading) and a fast, named
    failure for RECORDING, which needs the VLM."""
    import subprocess
    import sys

    from tests.system.harness import ROOT, test_env

    with running_mai(tmp_path) as system:  # the harness points Ollama at a port where nothing listens
        client = system.client()
        try:
            wait_for(lambda: "vlm" in dict(client.get_status().degraded) and client.get_status().clip.ready, timeout_s=60)
        finally:
            client.close()
        env = test_env() | {"MAI_CONFIG": str(system.config_path)}
        began = time.monotonic()
        result = subprocess.run([sys.executable, "examples/execution_loop.py", "--steps", "1"], capture_output=True,
                                text=True, timeout=120, env=env, cwd=ROOT)
        took_s = time.monotonic() - began
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VLM unavailable (backend_unreachable)" in result.stdout and "is unreachable" in result.stdout
    assert "autopilot reached" in result.stdout and "CLIP on sim-gpu" in result.stdout
    assert "final: mode autopilot" in result.stdout and "'vlm'" in result.stdout  # degraded, with its reason
    assert took_s < 60  # failing fast, not waiting out a load timeout
