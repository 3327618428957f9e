"""The private world of `mai demo`: the Ollama and LM Studio doubles and Mai, each in its own process, sharing one
simulated GPU ledger in a temporary directory, on free loopback ports; always stopped, leftovers named.

Nothing here reads the user's configuration or environment overrides (MAI_*), so a Mai the user runs, and its
state dir, are never touched. Imports beyond the stdlib happen inside functions: `mai.cli` imports `mai.demo`,
which imports this, on every command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mai.sim.ports import free_port  # stdlib only: cheap on every CLI command

MiB = 2**20
VLM_MODEL = "qwen2.5vl:7b"
VLM_FOOTPRINT_MB = 6144  # what the Ollama double's qwen2.5vl:7b takes
CLIP_MODEL = "ViT-Tiny-test"  # created in a second; it stands in for ViT-B-32 on the simulated GPU...
CLIP_FOOTPRINT_MB = 600  # ...with ViT-B-32's fp32 footprint
RESERVE_MB = 1024  # room for the desktop: with it an 8 GB GPU cannot hold the VLM, CLIP and a chat model at once
START_TIMEOUT_S = 90.0  # a loaded machine starts the actor system and the doubles slowly


# --- timing ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoTiming:
    """Seconds for everything that takes time, derived from the run's duration so a short run tells the same story:
    the doubles' load and unload times, Mai's idle timeout, AUTOPILOT's grace for an on-demand VLM.

    The idle timeout (at least 3 s, for the fixed costs of a chat turn on a loaded machine) outlasts every gap
    between VLM calls in RECORDING, so the VLM stays loaded there; the script leaves room after its last VLM call
    for the idle unload to happen on screen."""

    duration_s: float
    vlm_load_s: float
    chat_load_s: float
    unload_s: float
    idle_timeout_s: float
    grace_s: float
    lease_drain_s: float

    @classmethod
    def for_duration(cls, duration_s: float) -> DemoTiming:
        def clamp(value: float, low: float, high: float) -> float:
            return round(min(max(value, low), high), 3)

        return cls(
            duration_s=duration_s,
            vlm_load_s=clamp(duration_s * 0.04, 0.3, 2.5),
            chat_load_s=clamp(duration_s * 0.025, 0.2, 1.5),
            unload_s=clamp(duration_s * 0.005, 0.05, 0.3),
            idle_timeout_s=round(max(duration_s * 0.135, 3.0), 3),
            grace_s=clamp(duration_s * 0.08, 0.5, 30.0),
            lease_drain_s=clamp(duration_s * 0.05, 1.0, 5.0),
        )


# --- the world -----------------------------------------------------------------------------------------------------------
def _child_env(root: Path) -> dict[str, str]:
    """The user's environment without MAI_* (their overrides must not leak into the demo's Mai)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAI_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)})
    return env


def demo_config(state_dir: Path, ledger: Path, admin_port: int, ollama_host: str, lmstudio_host: str,
                gpu_mb: int, timing: DemoTiming) -> dict[str, Any]:
    """The demo Mai's configuration: simulated GPU and CLIP, the doubles, timers scaled to the run."""
    return {
        "system": {"admin_port": admin_port, "state_dir": str(state_dir), "start_timeout_s": 60, "stop_timeout_s": 10,
                   "restart_backoff_initial_s": 0.2},
        "gpu": {"backend": "simulated", "simulated_total_mb": gpu_mb, "simulated_ledger": str(ledger),
                "sample_interval_s": 0.1, "reserve_mb": RESERVE_MB},
        "clip": {"backend": "simulated", "model": CLIP_MODEL, "pretrained": None, "footprint_mb": CLIP_FOOTPRINT_MB,
                 "threads": 1},
        "ollama": {"host": ollama_host, "vlm_model": VLM_MODEL, "vlm_footprint_mb": VLM_FOOTPRINT_MB,
                   "idle_timeout_s": timing.idle_timeout_s, "load_timeout_s": 300, "unload_timeout_s": 30,
                   "retries": 2, "retry_backoff_s": 0.1, "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 2},
        "lmstudio": {"host": lmstudio_host, "load_timeout_s": 60, "request_timeout_s": 10},
        "modes": {"autopilot": {"vlm_grace_s": timing.grace_s, "lease_drain_timeout_s": timing.lease_drain_s},
                  "recording": {"lease_drain_timeout_s": timing.lease_drain_s},
                  "idle": {"lease_drain_timeout_s": timing.lease_drain_s}},
        "chat": {"switch_hysteresis_s": 0, "cooldown_s": 30, "reply_timeout_s": 60, "max_retries": 1,
                 "retry_backoff_s": 0.1, "token_batch_ms": 50},
        "logging": {"console": False, "file": "mai.log", "level": "info"},
    }


class DemoWorld:
    """The doubles and Mai, started in a temporary directory and always stopped: `stop()` is idempotent and
    kills what does not exit, and `leftovers()` names any process still alive afterwards."""

    def __init__(self, timing: DemoTiming, gpu_mb: int) -> None:
        self.timing = timing
        self.gpu_mb = gpu_mb
        self.root = Path(__file__).resolve().parents[1]
        self.dir = Path(tempfile.mkdtemp(prefix="mai-demo-"))
        self.ledger_path = self.dir / "gpu.sqlite"
        self.env = _child_env(self.root)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.mai_pids: set[int] = set()
        self.cfg: Any = None
        self.config_path = self.dir / "mai.yaml"

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        import yaml

        from mai.sim.gpu_ledger import GpuLedger

        GpuLedger(self.ledger_path, total_bytes=self.gpu_mb * MiB, device_name=f"Simulated {self.gpu_mb // 1024} GB GPU",
                  reset=True)
        t = self.timing
        ollama_port = self._start_double("ollama", "mai.sim.ollama_server", [
            "--ledger", str(self.ledger_path), "--vram-mb", str(self.gpu_mb), "--load-time-s", str(t.vlm_load_s),
            "--unload-delay-s", str(t.unload_s), "--token-delay-s", "0.02"])
        lms_port = self._start_double("lmstudio", "mai.sim.lmstudio_server", [
            "--ledger", str(self.ledger_path), "--vram-mb", str(self.gpu_mb), "--load-time-s", str(t.chat_load_s)])
        config = demo_config(self.dir / "state", self.ledger_path, free_port(), f"http://127.0.0.1:{ollama_port}",
                             f"127.0.0.1:{lms_port}", self.gpu_mb, t)
        self.config_path.write_text(yaml.safe_dump(config))
        from config import load_config

        self.cfg = load_config(self.config_path, env={})
        self._wait_for_doubles(ollama_port, lms_port)
        self._start_mai()

    def _start_double(self, name: str, module: str, args: list[str]) -> int:
        port_file = self.dir / f"{name}.port"
        with open(self.dir / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file), *args],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C reaches only the demo, which then stops everything in order
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"the {name} double exited: {self._tail(self.dir / f'{name}.log')}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise RuntimeError(f"the {name} double did not start within {START_TIMEOUT_S:.0f} s")

    def _wait_for_doubles(self, ollama_port: int, lms_port: int) -> None:
        import urllib.request

        urls = [f"http://127.0.0.1:{ollama_port}/", f"http://127.0.0.1:{lms_port}/lmstudio-greeting"]
        deadline = time.monotonic() + START_TIMEOUT_S
        for url in urls:
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.05)

    def _start_mai(self) -> None:
        from mai.client import connect
        from messages.errors import MaiError

        log = self.dir / "mai-console.log"
        with open(log, "ab") as out:
            self.processes["mai"] = subprocess.Popen(
                [sys.executable, "-m", "bootstrap", "--quiet", "--config", str(self.config_path)],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes["mai"].poll() is not None:
                raise RuntimeError(f"Mai exited while starting: {self._tail(log)}")
            try:
                with connect(config=self.cfg, timeout_s=2) as client:
                    info = client.system_info(2.0)
                    status = client.get_status(2.0)
                    if all(c.address is not None for c in info.children) and status.clip.ready and \
                            status.vlm.state in ("loaded", "unloaded") and status.vram is not None:
                        self._note_mai_pids()
                        return
            except MaiError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Mai was not ready within {START_TIMEOUT_S:.0f} s: {self._tail(log)}")

    def _note_mai_pids(self) -> None:
        from bootstrap.system import system_processes

        self.mai_pids |= {p.pid for p in system_processes(self.cfg.system.admin_port)}

    @staticmethod
    def _tail(path: Path, lines: int = 6) -> str:
        try:
            return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no output)"
        except OSError:
            return "(no output)"

    # -- stop ----------------------------------------------------------------------------------------------------
    def stop(self) -> list[dict[str, Any]]:
        """Stop Mai (bounded, killing leftovers), then the doubles; return what had to be killed."""
        killed: list[dict[str, Any]] = []
        if self.cfg is not None:
            from bootstrap import system as boot

            try:
                self._note_mai_pids()
                killed += boot.stop(self.cfg).killed
            except Exception as err:  # noqa: BLE001 - keep stopping the rest whatever went wrong here
                killed.append({"pid": None, "name": "mai", "error": str(err)})
        for name in ("mai", "lmstudio", "ollama"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
                killed.append({"pid": proc.pid, "name": name, "signal": "SIGKILL"})
        return killed

    def pids(self) -> list[int]:
        return sorted(self.mai_pids | {p.pid for p in self.processes.values()})

    def leftovers(self) -> list[dict[str, Any]]:
        """Processes of this demo still alive: any started here, or any whose command line names its directory."""
        import psutil

        found = {}
        for pid in self.pids():
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = " ".join(proc.cmdline()[:4])
            except psutil.Error:
                continue
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.dir) in cmdline and proc.info["pid"] != os.getpid():
                found[proc.info["pid"]] = cmdline[:200]
        return [{"pid": pid, "cmdline": cmd} for pid, cmd in sorted(found.items())]

    def read_log(self) -> list[dict[str, Any]]:
        """Mai's JSON-lines log: one object per decision."""
        path = Path(self.cfg.system.state_dir) / "mai.log" if self.cfg else None
        if path is None or not path.exists():
            return []
        entries = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

