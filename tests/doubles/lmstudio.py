"""Start the LM Studio double (`mai.sim.lmstudio_server`) as a real subprocess for a test, and always stop it.

    with lmstudio_double(tmp_path, vram_mb=8192) as lms_double:
        adapter = LmStudioAdapter(lms_double.host)
        lms_double.configure(midstream="drop")
        frames = lms_double.frames(endpoint="loadModel")

`kill()` ends the process abruptly (SIGKILL, like a crash); `restart()` starts a fresh one on the SAME port, so a
client configured with the old host finds it again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0


class LmStudioDoubleProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        models: list[dict[str, Any]] | None = None,
        vram_mb: int | None = None,
        load_time_s: float | None = None,
        ledger: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.options: list[str] = []
        if models is not None:
            self.options += ["--models", json.dumps(models)]
        if vram_mb is not None:
            self.options += ["--vram-mb", str(vram_mb)]
        if load_time_s is not None:
            self.options += ["--load-time-s", str(load_time_s)]
        if ledger is not None:
            self.options += ["--ledger", str(ledger)]
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.starts += 1
        port_file = self.workdir / f"lmstudio-port-{self.starts}"
        stderr_path = self.workdir / f"lmstudio-double-{self.starts}.log"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mai.sim.lmstudio_server", "--port", str(self.port), "--port-file", str(port_file)]
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(cmd + self.options, cwd=REPO_ROOT, stdout=stderr, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = stderr_path.read_text()
                raise RuntimeError(f"LM Studio double exited with {self.process.returncode}:\n{output}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                if self._greets():
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"LM Studio double did not answer within {START_TIMEOUT_S} s:\n{stderr_path.read_text()}")

    def _greets(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/lmstudio-greeting", timeout=1) as response:
                return json.loads(response.read()) == {"lmstudio": True}
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        """End the process at once, like a crash: sockets die without close frames."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """A fresh double (no loaded models, default settings) on the same port."""
        self.kill()
        self.start()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- control ------------------------------------------------------------------------------------------------
    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.url}/_double/{path}", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"double rejected {path}: {exc.read().decode()}") from None

    def log(self) -> list[dict[str, Any]]:
        """Every frame the double received: {"t", "conn", "ns", "frame"}, oldest first."""
        return self._get("log")

    def frames(self, *, type: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
        """The received frames themselves, filtered by frame type and/or endpoint."""
        return [
            entry["frame"]
            for entry in self.log()
            if (type is None or entry["frame"].get("type") == type)
            and (endpoint is None or entry["frame"].get("endpoint") == endpoint)
        ]

    def configure(self, **settings: Any) -> dict[str, Any]:
        query = urllib.parse.urlencode({key: json.dumps(value) for key, value in settings.items()})
        return self._get(f"config?{query}")

    def state(self) -> dict[str, Any]:
        return self._get("state")

    def reset(self) -> None:
        self._get("reset")


@contextmanager
def lmstudio_double(tmp_path: Path, **kw: Any) -> Iterator[LmStudioDoubleProcess]:
    """A running double for the duration of the block; keyword arguments as `LmStudioDoubleProcess`."""
    double = LmStudioDoubleProcess(Path(tmp_path) / "lmstudio-double", **kw)
    try:
        double.start()
        yield double
    finally:
        double.stop()
