"""Run the real Mai (multiprocTCPBase, separate processes) for system tests: a private port and state dir, the
simulated GPU ledger, tiny CLIP, and Ollama pointed at a double or at a closed port. Mai is always driven the
way a user drives it — through `python -m mai` — and always stopped, even when a test fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from mai.sim.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAI_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    return env


def write_config(tmp: Path, **sections: dict) -> Path:
    """A user config for a test: simulated GPU, tiny CLIP, quiet console; `sections` override per test."""
    data: dict[str, dict] = {
        "system": {"admin_port": free_port(), "state_dir": str(tmp / "state"), "start_timeout_s": 60,
                   "restart_backoff_initial_s": 0.2, "stop_timeout_s": 10},
        "gpu": {"backend": "simulated", "simulated_total_mb": 12288, "sample_interval_s": 0.1},
        "clip": {"backend": "simulated", "model": "ViT-Tiny-test", "pretrained": None},
        "ollama": {"host": f"http://127.0.0.1:{free_port()}", "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1,
                   "retries": 2, "retry_backoff_s": 0.05, "load_timeout_s": 300, "unload_timeout_s": 10},
        "logging": {"console": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp / "mai.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def mai(config: Path, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mai", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout_s, env=test_env(), cwd=ROOT)


@dataclass
class RunningMai:
    config_path: Path
    config: Any

    def cli(self, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
        return mai(self.config_path, *args, timeout_s=timeout_s)

    def status_json(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def client(self) -> Any:
        from mai.client import connect

        return connect(config=self.config)


@contextmanager
def running_mai(tmp: Path, **sections: dict) -> Iterator[RunningMai]:
    from config import load_config

    path = write_config(tmp, **sections)
    cfg = load_config(path, env={})
    started = mai(path, "start")
    try:
        assert started.returncode == 0, f"mai start failed: {started.stdout}\n{started.stderr}"
        yield RunningMai(path, cfg)
    finally:
        stopped = mai(path, "stop")
        if stopped.returncode != 0:  # leave nothing behind, whatever happened
            print("stop failed:", stopped.stdout, stopped.stderr)


def wait_for(predicate: Any, timeout_s: float = 20.0, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s (last value: {last!r})")
