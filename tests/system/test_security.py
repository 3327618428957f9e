"""Security of a running Mai, attacked the way a local process would: code-running pickles sent to every
listening port run nothing and are logged, Mai keeps answering; the state directory is private; a remote bind is
announced with its risk; a secret in the configuration is never echoed."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from thespian.system.messages.admin import PendingActor
from thespian.system.transport.streamBuffer import ackDataErrMsg, toSendBuffer

from bootstrap.system import system_processes
from config import load_config
from tests.doubles.ollama import ollama_double
from tests.system.harness import ROOT, mai, running_mai, wait_for, write_config
from tests.system.harness import test_env as mai_env

pytestmark = pytest.mark.slow

FRAMED_WAIT_S = 20.0  # an idle actor answers a framed message in milliseconds; generous for a loaded machine
RAW_WAIT_S = 2.0  # an unframed pickle is never unpickled: Thespian waits for a length header that never comes


class RunsCode:
    """The classic payload: unpickling it calls `func(*args)`."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def listening(port: int) -> dict[int, set[int]]:
    """Every TCP port Mai's processes listen on -> the PIDs holding that socket."""
    ports: dict[int, set[int]] = {}
    for proc in system_processes(port):
        for conn in proc.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                ports.setdefault(conn.laddr.port, set()).add(proc.pid)
    return ports


def send(port: int, data: bytes, wait_s: float) -> bytes:
    """Connect, send, and read what comes back until the peer closes or `wait_s` passes."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
    return reply


def log_events(state_dir: Path, event: str) -> list[dict]:
    path = state_dir / "mai.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == event]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    ledger = tmp / "gpu.sqlite"  # shared with the Ollama double, so a mode change really moves models
    with ollama_double(tmp / "ollama", ledger=ledger, vram_bytes=12 * 2**30, load_time_s=0.2) as ollama:
        sections = {"gpu": {"simulated_ledger": str(ledger)}, "ollama": {"host": ollama.host}}
        with running_mai(tmp, **sections) as running:
            def ready():
                data = running.status_json()
                vlm_state = ((data.get("gpu") or {}).get("vlm") or {}).get("state")
                return all(a["answers"] for a in data["actors"]) and vlm_state in ("loaded", "unloaded")

            wait_for(ready, timeout_s=90)  # CLIP is created (torch import) in the first seconds
            yield running


def test_code_sent_to_every_listening_port_runs_nothing_is_logged_and_mai_keeps_answering(system, tmp_path):
    admin_port = system.config.system.admin_port
    state_dir = Path(system.config.system.state_dir)
    pids_before = {a["role"]: a["pid"] for a in system.status_json()["actors"]}
    ports = listening(admin_port)
    processes = {pid for pids in ports.values() for pid in pids}
    assert admin_port in ports and len(processes) >= 8  # admin, logger, supervisor and its five children

    sender = None  # Thespian reads (sender, message); the sender is not checked before unpickling
    attacks: list[tuple[int, str, Path, bytes]] = []
    for port in sorted(ports):
        for kind, func, args in (("os.system", os.system, "touch {}"), ("Popen", subprocess.Popen, ["touch", "{}"])):
            marker = tmp_path / f"ran-{port}-{kind}"
            args = args.format(marker) if isinstance(args, str) else [a.format(marker) for a in args]
            payload = (sender, RunsCode(func, args))
            attacks.append((port, f"{kind} framed", marker, toSendBuffer(payload)))
            attacks.append((port, f"{kind} raw", marker, pickle.dumps(payload)))
    # A request to the admin to create an "actor" from a callable that is not one of Mai's actors.
    attacks.append((admin_port, "createActor framed", tmp_path / "created",
                    toSendBuffer((sender, PendingActor("subprocess.getoutput", None, 1, None, None)))))

    # The starting client's listener is inherited by every process (reference thespian.md §8.1) and read by none
    # (that client closed its transport): data sent there is never read, so never unpickled, and never answered.
    read_by_none = {port for port, pids in ports.items() if pids == processes and port != admin_port}
    assert len(read_by_none) <= 1, ports

    def attack(port: int, how: str, data: bytes) -> bytes:
        return send(port, data, FRAMED_WAIT_S if "framed" in how and port not in read_by_none else RAW_WAIT_S)

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(attacks)) as pool:
        replies = list(pool.map(lambda a: attack(a[0], a[1], a[3]), attacks))
    probe_s = time.monotonic() - began

    # Every framed payload to a port Thespian reads was refused with a data error.
    answered = {(port, how) for (port, how, _, _), reply in zip(attacks, replies) if reply == ackDataErrMsg}
    framed = {(port, how) for port, how, _, _ in attacks if "framed" in how and port not in read_by_none}
    assert answered == framed, f"no data error from {sorted(framed - answered)}"
    assert not any(reply for (_, how, _, _), reply in zip(attacks, replies) if "raw" in how)

    # Each refusal is logged by the process that refused it, naming the listener and the global asked for.
    refused_as = {"os.system": "posix.system", "Popen": "subprocess.Popen",
                  "createActor": "createActor('subprocess.getoutput')"}
    expected = {(f"127.0.0.1:{port}", refused_as[how.split()[0]]) for port, how in answered}

    def refusals():
        return {(e["listener"], e["refused"]) for e in log_events(state_dir, "pickle.refused")}

    wait_for(lambda: refusals() >= expected, timeout_s=30)
    assert refusals() == expected
    assert all(e["peer"].startswith("127.0.0.1:") for e in log_events(state_dir, "pickle.refused"))
    assert not [marker for _, _, marker, _ in attacks if marker.exists()], "a payload ran"
    assert listening(admin_port).keys() == ports.keys()  # every listener still open

    # Nothing crashed or was restarted, and Mai still does its job.
    after = system.status_json()
    assert {a["role"]: a["pid"] for a in after["actors"]} == pids_before and all(a["answers"] for a in after["actors"])
    assert all(a["restarts"] == 0 for a in after["actors"])
    moved = system.cli("mode", "autopilot", "--wait", "--json")
    assert moved.returncode == 0, moved.stderr + moved.stdout
    assert json.loads(moved.stdout)["mode"] == "autopilot"
    print(f"\nprobed {len(ports)} ports ({len(answered)} framed refusals, {len(read_by_none)} read by no process) "
          f"with {len(attacks)} payloads in {probe_s:.1f} s")


def test_the_state_directory_and_everything_in_it_are_private(system):
    system.cli("mode", "idle", "--wait")  # the coordinator writes mode.json
    state_dir = Path(system.config.system.state_dir)
    paths = [state_dir, *state_dir.rglob("*")]
    assert {"mai.log", "console.log", "mode.json", "thespian.log"} <= {p.name for p in paths}
    modes = {str(p.relative_to(state_dir.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    want = {str(p.relative_to(state_dir.parent)): oct(0o700 if p.is_dir() else 0o600) for p in paths}
    assert modes == want


def test_a_secret_in_the_configuration_is_never_echoed(system):
    token = "sk-lm-Zq7secretTOKEN:x9y8z7w6v5u4"
    env = {**mai_env(), "MAI_LMSTUDIO__API_TOKEN": token}
    for args in (["status", "--json"], ["start"]):
        result = subprocess.run([sys.executable, "-m", "mai", "--config", str(system.config_path), *args],
                                capture_output=True, text=True, timeout=90, env=env, cwd=ROOT)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "lmstudio.api_token = '***'" in result.stderr and "cannot send an API token" in result.stderr
        assert token not in result.stdout + result.stderr
    status = system.status_json()
    assert status["config"]["lmstudio"]["api_token"] is None
    state_dir = Path(system.config.system.state_dir)
    assert not [p for p in state_dir.rglob("*.log*") if token in p.read_text(errors="replace")]


def test_a_remote_bind_starts_only_when_allowed_and_then_warns_at_start(tmp_path):
    (tmp_path / "refused").mkdir()
    (tmp_path / "allowed").mkdir()
    refused = write_config(tmp_path / "refused", system={"bind_address": "0.0.0.0"})
    result = mai(refused, "start")
    assert result.returncode == 2 and "system.bind_address" in result.stderr and "allow_remote" in result.stderr
    assert not (tmp_path / "refused" / "state").exists()  # refused before anything was created

    allowed = write_config(tmp_path / "allowed", system={"bind_address": "0.0.0.0", "allow_remote": True})
    port = load_config(allowed, env={}).system.admin_port
    foreground = subprocess.Popen([sys.executable, "-m", "bootstrap", "--quiet", "--config", str(allowed)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mai_env(), cwd=ROOT)
    try:
        wait_for(lambda: any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                             for c in psutil.net_connections("tcp")), timeout_s=60)
        wait_for(lambda: mai(allowed, "status", "--json").returncode == 0, timeout_s=60)  # clients reach it
        ips = {c.laddr.ip for proc in system_processes(port) for c in proc.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN}
        assert ips == {"0.0.0.0"}  # bound where the configuration says, and only because it was allowed
    finally:
        foreground.terminate()
        out, err = foreground.communicate(timeout=60)
    assert foreground.returncode == 0, out + err
    assert f"mai: warning: system.bind_address is 0.0.0.0 and system.allow_remote is true, so Mai's admin port {port}" in err
    assert "no authentication" in err and "firewall" in err
    [event] = log_events(tmp_path / "allowed" / "state", "system.remote_access")
    assert event["level"] == "warning" and event["bind_address"] == "0.0.0.0" and "no authentication" in event["detail"]
