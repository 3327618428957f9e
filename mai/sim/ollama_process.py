"""Start the Ollama double (`mai.sim.ollama_server`) as a real process on loopback, for contract and system
tests and for the benchmarks (`bench/system_runner.py`).

    from mai.sim.ollama_process import ollama_double

    with ollama_double(tmp_path, load_time_s=0.05) as double:
        adapter = OllamaAdapter(double.host, num_ctx=8192)
        double.configure(fail_next="oom")
        assert double.requests("/api/generate")[-1]["body"]["keep_alive"] == -1.0

The process is always terminated when the block ends. Control calls use urllib, not the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from mai.sim.gpu_ledger import GpuLedger

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: the double runs with it on sys.path
GiB = 1024**3


class OllamaDouble:
    """A running double: its `host`, request log, runtime config, and process control (kill, restart)."""

    def __init__(self, workdir: Path, argv: list[str], ledger: GpuLedger | None, port: int = 0) -> None:
        self.workdir = workdir
        self.ledger = ledger
        self._argv = argv
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- process --------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        port_file = self.workdir / "ollama-double.port"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        with open(self.workdir / "ollama-double.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mai.sim.ollama_server", "--port", str(self.port),
                 "--port-file", str(port_file), *self._argv],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Ollama double exited with {self.process.returncode}; see {log.name}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                try:
                    if self._call("GET", "/") == "Ollama is running":
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Ollama double did not answer within {timeout_s}s; see {log.name}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, like a crashed server; its runners' VRAM returns to the ledger as a driver would reclaim it."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        if self.ledger is not None:
            for owner in self.ledger.usage():
                if owner.startswith("ollama:"):
                    self.ledger.free(owner)

    def restart(self) -> None:
        """Kill if running, then start again on the same port (so clients keep their host)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    # -- control endpoints ------------------------------------------------------------------------------------

    def log(self) -> list[dict[str, Any]]:
        """Every request (kind "request": method, path, body, status, fault) and scheduler event (kind "load",
        "reload", "evict", "evict_all", "expire", "expire_all", "unloaded", "oom", "load_aborted", "removed"), in
        order."""
        return self._call("GET", "/_double/log")["entries"]

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.log() if e["kind"] == "request" and (path is None or e["path"] == path)]

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.log() if e["kind"] != "request" and (not kinds or e["kind"] in kinds)]

    def configure(self, **changes: Any) -> dict[str, Any]:
        """E.g. `configure(fail_next="hang", hang_s=3, fail_paths=["/api/ps"])`; see DoubleConfig."""
        return self._call("POST", "/_double/config", changes)

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_double/state")

    def remove(self, model: str) -> None:
        """`ollama rm MODEL`: gone from /api/tags; if it is loaded, its runner stays listed (O8)."""
        self._call("POST", "/_double/remove", {"model": model})

    def reset(self) -> None:
        """Unload everything at once, clear the log and the config; clear the ledger's record too."""
        self._call("POST", "/_double/reset", {})
        if self.ledger is not None:
            self.ledger.reset()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.host + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return json.loads(text) if response.headers.get_content_type() == "application/json" else text


@contextmanager
def ollama_double(
    workdir: Path,
    *,
    ledger: bool | str | Path = True,
    vram_bytes: int = 24 * GiB,
    models: Sequence[dict[str, Any]] | None = None,
    load_time_s: float = 0.05,
    unload_delay_s: float = 0.05,
    token_delay_s: float = 0.002,
    extra_args: Sequence[str] = (),
) -> Iterator[OllamaDouble]:
    """Run the double for the duration of the block. `ledger=True` makes a fresh `GpuLedger` of `vram_bytes` in
    `workdir` (a path shares an existing one; False leaves the double with its private capacity)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["--load-time-s", str(load_time_s), "--unload-delay-s", str(unload_delay_s),
            "--token-delay-s", str(token_delay_s), "--vram-mb", str(vram_bytes // (1024 * 1024)), *extra_args]
    gpu: GpuLedger | None = None
    if ledger:
        path = workdir / "gpu.sqlite" if ledger is True else Path(ledger)
        gpu = GpuLedger(path, total_bytes=vram_bytes, reset=ledger is True)
        argv += ["--ledger", str(path)]
    if models is not None:
        argv += ["--models", json.dumps(list(models))]
    double = OllamaDouble(workdir, argv, gpu)
    try:
        double.start()
        yield double
    finally:
        double.stop()
