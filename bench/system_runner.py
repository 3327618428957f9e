"""The systems the benchmarks measure: a private Mai on simulated backends, and a bare Thespian echo to compare with.

Mai is started the way a user starts it (`python -m mai --config F start`, so a separate daemonised
multiprocTCPBase on its own loopback port) with a private state dir, the simulated GPU ledger, simulated CLIP (real
OpenCLIP on the CPU, its GPU placement recorded in the ledger) and the Ollama double in its own process sharing that
ledger. CLIP is the real ViT-B-32 architecture with random weights (`pretrained=None`: no download), so memory and
embedding figures are a user's CLIP's; the tiny test model (`--clip-model ViT-Tiny-test`) only checks that a
benchmark runs, and its figures say so. LM Studio is
disabled: the benchmarks are about GPU arbitration, and a chat agent retrying a closed port would only add noise.
It is always stopped, and any process of it left behind is killed, even when a benchmark fails.

The echo is a trivial actor in a second multiprocTCPBase system on its own port, bound to loopback by the same
patch (`bootstrap/loopback.py`), and asked through `MaiClient`'s own ask path (a thread-local private context,
replies matched by request id), so the only difference from asking Mai is what the actor does with the message.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from thespian.actors import Actor

from bootstrap import loopback
from mai.client import MaiClient
from mai.sim.ollama_process import OllamaDouble, ollama_double
from messages.base import new_request_id
from messages.system import Ping, Pong
from mai.sim.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
VLM = "qwen2.5vl:7b"
BENCH_CLIP = "ViT-B-32"  # the architecture Mai ships with; random weights cost what trained ones cost
TEST_CLIP = "ViT-Tiny-test"  # open_clip's tiny test model: seconds faster to create, nothing like a user's CLIP
CLIP_MODELS = (BENCH_CLIP, TEST_CLIP)
GiB = 2**30
MiB = 2**20


# --- the machine ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU model, cores, load, Python, Thespian."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(load[0], 2),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "thespian": metadata.version("thespian"),
    }


def clip_facts(model: str) -> dict[str, Any]:
    """What CLIP a figure was measured with, for the report beside the machine."""
    if model not in CLIP_MODELS:
        raise ValueError(f"unknown benchmark CLIP model {model!r}; accepted: {', '.join(CLIP_MODELS)}")
    return {"model": model, "pretrained": None, "weights": "random", "backend": "simulated GPU ledger, OpenCLIP on the CPU",
            "test_model": model == TEST_CLIP}


def clip_line(clip: dict[str, Any]) -> str:
    note = " (the tiny TEST model: these figures are not a real CLIP's)" if clip["test_model"] else ""
    return f"clip: {clip['model']}, {clip['weights']} weights (pretrained=None), {clip['backend']}{note}"


def machine_line(info: dict[str, Any]) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg_1m']} (1 min), {info['os']}, "
            f"Python {info['python']}, Thespian {info['thespian']}")


# --- small statistics -------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample: always a value that was measured."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned numbers, for terminals and reports."""
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- a private Mai --------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAI_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    return env


@dataclass
class ProcessRss:
    role: str
    pid: int
    rss_bytes: int
    uss_bytes: int  # pages only this process holds: forked actors share the rest copy-on-write with the admin


@dataclass
class BenchSystem:
    """A running private Mai and the Ollama double it talks to."""

    workdir: Path
    config_path: Path
    config: Any
    ollama: OllamaDouble

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mai", "--config", str(self.config_path), *args], check=False,
                              capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=ROOT)

    def client(self) -> MaiClient:
        from mai.client import connect

        return connect(config=self.config)

    @property
    def log_path(self) -> Path:
        return Path(self.config.system.state_dir) / "mai.log"

    def log_events(self, *names: str) -> list[dict[str, Any]]:
        """Mai's JSON log lines whose event is one of `names`, in file order."""
        out = []
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") in names:
                out.append(entry)
        return out

    def processes(self, client: MaiClient) -> list[ProcessRss]:
        """RSS and USS of every process of the system, each named by the actor it runs (the supervisor's children
        answer a Ping with their role and pid; the admin is the root; the rest is Thespian's logger)."""
        import psutil

        from bootstrap.system import system_processes

        roles: dict[int, str] = {}
        for role, pong in client.ping_all(timeout_s=5).items():
            if pong is not None:
                roles[pong.pid] = role
        supervisor = client._ask_address(client._supervisor, Ping(new_request_id()), 5)
        roles[supervisor.pid] = "supervisor"
        procs = system_processes(self.config.system.admin_port)
        pids = {p.pid for p in procs}
        out = []
        for proc in procs:
            try:
                parent = proc.ppid()
                role = roles.get(proc.pid) or ("admin" if parent not in pids else "logger")
                full = proc.memory_full_info()
                out.append(ProcessRss(role, proc.pid, full.rss, full.uss))
            except psutil.Error:
                continue
        return sorted(out, key=lambda p: p.role)


def _config(workdir: Path, ledger: Path, ollama_host: str, clip_model: str) -> dict[str, Any]:
    return {
        "system": {"admin_port": free_port(), "state_dir": str(workdir / "state"), "start_timeout_s": 120,
                   "stop_timeout_s": 15},
        "gpu": {"backend": "simulated", "simulated_total_mb": 12288, "simulated_ledger": str(ledger)},
        "clip": {"backend": "simulated", "model": clip_model, "pretrained": None},
        "ollama": {"host": ollama_host, "vlm_model": VLM},
        "lmstudio": {"enabled": False},
        "logging": {"console": False},
    }


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise RuntimeError(f"{what} did not happen within {timeout_s:.0f} s")


@contextmanager
def bench_system(*, load_time_s: float = 0.0, unload_delay_s: float = 0.0, vram_release_lag_s: float = 0.0,
                 clip_model: str = BENCH_CLIP) -> Iterator[BenchSystem]:
    """A private Mai, ready (VLM state known, CLIP created), for the duration of the block."""
    from config import load_config

    clip_facts(clip_model)  # an unknown model fails here, before anything starts

    workdir = Path(tempfile.mkdtemp(prefix="mai-bench-"))
    ledger = workdir / "gpu.sqlite"
    try:
        with ollama_double(workdir / "ollama", ledger=ledger, vram_bytes=12 * GiB, load_time_s=load_time_s,
                           unload_delay_s=unload_delay_s,
                           extra_args=("--vram-release-lag-s", str(vram_release_lag_s))) as ollama:
            path = workdir / "mai.yaml"
            path.write_text(yaml.safe_dump(_config(workdir, ledger, ollama.host, clip_model)))
            system = BenchSystem(workdir, path, load_config(path, env={}), ollama)
            started = system.cli("start", timeout_s=180)
            try:
                if started.returncode != 0:
                    raise RuntimeError(f"mai start failed: {started.stdout}\n{started.stderr}")
                with system.client() as client:
                    wait_for(lambda: _ready(client), 120, "Mai reporting its VLM and CLIP")
                yield system
            finally:
                _stop(system)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _ready(client: MaiClient) -> bool:
    status = client.get_status()
    return status.vlm.state in ("loaded", "unloaded") and bool(status.clip.ready)


def _stop(system: BenchSystem) -> None:
    """`mai stop`, then kill whatever of the system is still there: a benchmark never leaves processes behind."""
    import psutil

    from bootstrap.system import system_processes

    leftovers = system_processes(system.config.system.admin_port)
    stopped = system.cli("stop", timeout_s=60)
    if stopped.returncode != 0:
        print(f"mai stop failed: {stopped.stdout} {stopped.stderr}", file=sys.stderr)
    for proc in leftovers:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            continue


# --- the bare echo ------------------------------------------------------------------------------------------------
class Echo(Actor):
    """Answers a Ping with a Pong and does nothing else: the floor an ask on multiprocTCPBase cannot go below."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, Ping):
            self.send(sender, Pong(msg.request_id, "echo", os.getpid(), 0.0))


class EchoClient(MaiClient):
    """`MaiClient._ask_address` (thread-local private contexts, request-id matching, timeouts) aimed at the echo.

    It sets the fields that path uses and skips the supervisor lookup, which the echo system does not have."""

    def __init__(self, asys: Any, echo: Any, port: int) -> None:  # not super().__init__: it looks up Mai's supervisor
        from thespian.actors import ExternalContext

        self._asys = asys
        self._context_cls = ExternalContext
        self._local = threading.local()
        self._contexts = []
        self._lock = threading.Lock()
        self._info = None
        self.echo = echo
        self.port = port  # the echo system's admin port

    def ping(self, timeout_s: float = 5.0) -> Pong:
        return self._ask_address(self.echo, Ping(new_request_id()), timeout_s)


@contextmanager
def _echo_creatable() -> Iterator[None]:
    """Let the echo admin, forked from this process by `ActorSystem()`, create the Echo actor.

    `bootstrap.safe_pickle` (installed by `loopback.apply`) refuses requests to create anything but Mai's own
    `actors.*`. The echo system must keep that restricted unpickler, since every message Mai's processes receive
    goes through it, so the creation check alone is widened, for exactly this class, while the admin forks."""
    try:
        from bootstrap import safe_pickle
    except ImportError:  # no unpickling guard in this checkout: nothing to widen
        yield
        return
    check = getattr(safe_pickle, "_check_creation", None)
    if check is None:
        yield
        return
    echo_class = f"{__name__}.{Echo.__name__}"

    def check_allowing_echo(obj: Any) -> None:
        message = obj[1] if isinstance(obj, tuple) and len(obj) == 2 else obj
        if getattr(message, "actorClassName", None) == echo_class and getattr(message, "sourceHash", None) is None:
            return
        check(obj)

    safe_pickle._check_creation = check_allowing_echo
    try:
        yield
    finally:
        safe_pickle._check_creation = check  # this process never creates actors; only the forked admin keeps it


@contextmanager
def echo_system() -> Iterator[EchoClient]:
    """A second multiprocTCPBase system on its own loopback port holding one Echo actor."""
    from thespian.actors import ActorSystem

    loopback.apply("127.0.0.1")
    port = free_port()
    with _echo_creatable():
        asys = ActorSystem("multiprocTCPBase", {"Admin Port": port}, transientUnique=True)
    client = None
    try:
        client = EchoClient(asys, asys.createActor(f"{__name__}.Echo"), port)
        client.ping(timeout_s=30)  # the actor process is up
        yield client
    finally:
        if client is not None:
            client.close()  # closes the private contexts (and the handle's transport)
        try:
            ActorSystem("multiprocTCPBase", {"Admin Port": port}, transientUnique=True).shutdown()
        except Exception as err:  # noqa: BLE001 - report, never mask the benchmark's own error
            print(f"echo system shutdown failed: {err}", file=sys.stderr)
