"""Start, find, attach to and stop Mai's actor system (multiprocTCPBase, loopback only by default).

Thespian silently reuses whatever admin answers on the port (reference thespian.md §8.5), so before starting we
probe the port and report what is there: Mai (and which version), another Thespian system, or some other program.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bootstrap.loopback as loopback
from bootstrap.logs import append_event, configure_structlog, get_logger, log_defs
from bootstrap.paths import ledger_path, log_file, private_dir, private_file, stopping_marker, subscribers_file
from mai import __version__
from messages.base import new_request_id
from messages.errors import MaiError, NotRunning, OperationTimeout, Reason
from messages.system import GetSystemInfo, SystemInfo

BASE = "multiprocTCPBase"
MAI_CAPABILITY = "Mai Version"
log = get_logger("mai.bootstrap")


@dataclass(frozen=True)
class AdminProbe:
    """What answers on the admin port: kind is none | mai | thespian | other."""

    kind: str
    port: int
    version: str | None = None
    started_at: float | None = None
    state_dir: str | None = None

    def describe(self) -> str:
        if self.kind == "none":
            return f"nothing listens on 127.0.0.1:{self.port}"
        if self.kind == "mai":
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at or 0))
            return f"Mai {self.version} is running on port {self.port} (started {since}, state dir {self.state_dir})"
        if self.kind == "thespian":
            return f"another Thespian actor system (not Mai) answers on port {self.port}"
        return f"port {self.port} is in use by a program that is not a Thespian actor system"


@dataclass
class StopReport:
    was_running: bool
    duration_s: float
    killed: list[dict] = field(default_factory=list)  # processes that had to be killed: pid, name, signal

    def to_dict(self) -> dict:
        return {"was_running": self.was_running, "duration_s": round(self.duration_s, 3), "killed": self.killed}


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _with_timeout(fn: Any, timeout_s: float, what: str) -> Any:
    """Run a Thespian call that may block (an admin that accepts but never answers) with a hard bound."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise OperationTimeout(f"{what} did not answer within {timeout_s:.1f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def attach(cfg: Any, timeout_s: float | None = None) -> Any:
    """A handle on the running system (never starts one: the port is probed first)."""
    from thespian.actors import ActorSystem

    loopback.apply(cfg.system.bind_address)
    port = cfg.system.admin_port
    if not _port_open(cfg.system.bind_address, port):
        raise NotRunning(f"Mai is not running (nothing listens on {cfg.system.bind_address}:{port}); start it with `mai start`")
    return _with_timeout(
        lambda: ActorSystem(BASE, {"Admin Port": port}, transientUnique=True),
        timeout_s or cfg.system.ask_timeout_s,
        f"the actor system on port {port}",
    )


def probe_admin(cfg: Any, timeout_s: float = 3.0) -> AdminProbe:
    from thespian.system.messages.status import Thespian_StatusReq, Thespian_SystemStatus

    port = cfg.system.admin_port
    if not _port_open(cfg.system.bind_address, port):
        return AdminProbe("none", port)
    try:
        asys = attach(cfg, timeout_s)
    except MaiError:
        return AdminProbe("other", port)
    try:
        admin = asys._systemBase.adminAddr
        reply = _with_timeout(lambda: asys.ask(admin, Thespian_StatusReq(), timeout_s), timeout_s + 1, "the admin")
    except MaiError:
        reply = None
    finally:
        _close(asys)
    if not isinstance(reply, Thespian_SystemStatus):
        return AdminProbe("other", port)
    caps = reply.capabilities or {}
    if MAI_CAPABILITY not in caps:
        return AdminProbe("thespian", port)
    return AdminProbe("mai", port, caps.get(MAI_CAPABILITY), caps.get("Mai Started At"), caps.get("Mai State Dir"))


def _close(asys: Any) -> None:
    try:
        asys._systemBase.transport.close()
    except Exception:  # noqa: BLE001 - best effort: the handle is being dropped anyway
        pass


def warn(cfg: Any, event: str, message: str, **fields: Any) -> None:
    """A warning from the starting process, which is not part of the actor system: on the console (stderr; the
    detached `mai start` keeps it in console.log) and in the log file, written before the logger process owns it."""
    print(f"mai: warning: {message}", file=sys.stderr, flush=True)
    file = log_file(cfg)
    if file is not None:
        append_event(file, "warning", "mai.bootstrap", event, detail=message, **fields)


def prepare_state_dir(cfg: Any) -> Path:
    """Create the state directory private to the user (0700), or take group and other access away from it."""
    tightened: list[str] = []

    def notice(path: Path, old_mode: int, new_mode: int) -> None:
        tightened.append(f"{path} {old_mode:04o} -> {new_mode:04o}")

    path = private_dir(cfg.system.state_dir, notice)
    if tightened:
        warn(cfg, "state_dir.tightened", f"others could enter Mai's state directory; removed their access: "
             f"{'; '.join(tightened)}", paths=tightened)
    return path


def _private_thespian_log(cfg: Any) -> None:
    """Thespian's own log (warnings such as an actor's exception, with the message's repr: a chat turn's text)
    defaults to a shared /tmp/thespian.log that other users can read; keep it in the private state directory,
    for this process and every process of the system it starts. An explicit THESPLOG_FILE is respected."""
    from thespian.system import utilis

    if "THESPLOG_FILE" not in os.environ:
        os.environ["THESPLOG_FILE"] = str(private_file(Path(cfg.system.state_dir) / "thespian.log"))
        utilis._thesplog_file = None  # Thespian reads the variable once, on its first line


def start(cfg: Any, *, console_logs: bool | None = None) -> SystemInfo:
    """Start the actor system and the supervisor tree; return once the supervisor answers.

    Raises MaiError(BUSY) when something already answers on the admin port, saying what it is."""
    from thespian.actors import ActorSystem

    loopback.apply(cfg.system.bind_address)
    probe = probe_admin(cfg)
    if probe.kind != "none":
        raise MaiError(f"not starting: {probe.describe()}", reason=Reason.BUSY,
                       details={"kind": probe.kind, "version": probe.version or "", "port": probe.port})
    # Every process of the system descends from this one: whatever a library creates (SQLite's side files,
    # a rotated log, Thespian's own log) is then private too, whatever the user's umask.
    os.umask(0o077)
    prepare_state_dir(cfg)
    stopping_marker(cfg).unlink(missing_ok=True)
    subscribers_file(cfg).unlink(missing_ok=True)
    exposure = cfg.system.exposure_warning()
    if exposure is not None:
        warn(cfg, "system.remote_access", exposure, bind_address=cfg.system.bind_address, port=cfg.system.admin_port)
    if cfg.gpu.backend == "simulated":
        from mai.sim.gpu_ledger import GpuLedger

        GpuLedger(ledger_path(cfg), total_bytes=cfg.gpu.simulated_total_mb * 2**20)
    file = log_file(cfg)
    if file is not None:
        private_file(file)
    _private_thespian_log(cfg)
    configure_structlog(cfg.logging.level)
    console = cfg.logging.console if console_logs is None else console_logs
    capabilities = {
        "Admin Port": cfg.system.admin_port,
        MAI_CAPABILITY: __version__,
        "Mai Started At": time.time(),
        "Mai State Dir": str(cfg.system.state_dir),
    }
    defs = log_defs(cfg.logging.level, file, console, cfg.logging.console_format)
    asys = ActorSystem(BASE, capabilities, logDefs=defs, transientUnique=True)
    try:
        from actors.supervisor import SUPERVISOR_NAME
        from messages.system import Init

        supervisor = asys.createActor("actors.supervisor.Supervisor", globalName=SUPERVISOR_NAME)
        asys.tell(supervisor, Init(cfg, ()))
        info = wait_until_up(cfg, asys, supervisor, cfg.system.start_timeout_s)
    except BaseException:
        _shutdown_quietly(asys)
        raise
    log.info("system.started", port=cfg.system.admin_port, version=__version__, pid=os.getpid())
    _close(asys)
    return info


def revive_supervisor(cfg: Any) -> SystemInfo:
    """Create and wire a new supervisor after the old one died (its children die with it; the admin lives on).

    Nobody supervises the supervisor inside Thespian (the admin only drops its global name), so the process that
    started the system does: the new supervisor starts fresh children, which reconcile from the world (Ollama's
    /api/ps, the persisted mode, conversation and footprints) as after any restart."""
    from messages.system import Init

    asys = attach(cfg)
    try:
        supervisor = supervisor_address(asys)
        asys.tell(supervisor, Init(cfg, ()))
        info = wait_until_up(cfg, asys, supervisor, cfg.system.start_timeout_s)
    finally:
        _close(asys)
    file = log_file(cfg)
    if file is not None:  # this process is no actor: it writes its line to the log file itself, as at start
        append_event(file, "warning", "mai.bootstrap", "supervisor.revived", port=cfg.system.admin_port,
                     pid=info.supervisor_pid,
                     detail="the supervisor died; a new one restarted every actor, which reconciled from the world")
    return info


def wait_until_up(cfg: Any, asys: Any, supervisor: Any, timeout_s: float) -> SystemInfo:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = system_info(asys, supervisor, min(2.0, cfg.system.ask_timeout_s))
        if info is not None and all(child.address is not None for child in info.children):
            return info
        time.sleep(0.05)
    raise OperationTimeout(f"the actor system did not come up within {timeout_s:.0f} s (see the log in {cfg.system.state_dir})")


def system_info(asys: Any, supervisor: Any, timeout_s: float) -> SystemInfo | None:
    request_id = new_request_id()
    with asys.private() as ctx:
        reply = ctx.ask(supervisor, GetSystemInfo(request_id), timeout_s)
        while reply is not None and getattr(reply, "request_id", None) != request_id:
            reply = ctx.listen(timeout_s)
    return reply if isinstance(reply, SystemInfo) else None


def supervisor_address(asys: Any) -> Any:
    from actors.supervisor import SUPERVISOR_NAME

    return asys.createActor("actors.supervisor.Supervisor", globalName=SUPERVISOR_NAME)


def system_processes(port: int) -> list[Any]:
    """Every process of the system on `port`: the daemonised admin and all its descendants (logger, actors).

    The admin's listening socket is inherited by its children, so the port may be reported under any of
    them; climb to the topmost ancestor running the same program, then take its whole tree."""
    import psutil

    roots = set()
    for conn in psutil.net_connections(kind="tcp"):
        if not (conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid):
            continue
        try:
            proc = psutil.Process(conn.pid)
            while (parent := proc.parent()) is not None and parent.pid != 1 and parent.cmdline() == proc.cmdline():
                proc = parent
            roots.add(proc)
        except psutil.Error:
            continue
    procs = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                procs[proc.pid] = proc
        except psutil.Error:
            continue
    return list(procs.values())


def stop(cfg: Any, timeout_s: float | None = None) -> StopReport:
    """Shut the system down within a bounded time; kill what did not exit and report it."""
    import psutil

    loopback.apply(cfg.system.bind_address)
    timeout_s = timeout_s or cfg.system.stop_timeout_s
    began = time.monotonic()
    if not _port_open(cfg.system.bind_address, cfg.system.admin_port):
        return StopReport(False, 0.0)
    procs = system_processes(cfg.system.admin_port)
    try:
        private_file(stopping_marker(cfg))
    except OSError:
        pass  # an unusable state dir: the foreground process may revive a supervisor; the kill below still ends it
    try:
        asys = attach(cfg)
        _with_timeout(asys.shutdown, timeout_s, "the actor system's shutdown")
    except MaiError as err:
        log.warning("system.stop.unclean", error=str(err))
    killed: list[dict] = []
    _gone, alive = psutil.wait_procs(procs, timeout=max(0.1, timeout_s - (time.monotonic() - began)))
    for proc in alive:
        try:
            name = " ".join(proc.cmdline()[:3]) or proc.name()
            proc.send_signal(signal.SIGKILL)
            killed.append({"pid": proc.pid, "name": name, "signal": "SIGKILL"})
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=2)
    report = StopReport(True, time.monotonic() - began, killed)
    # Into the log file, not onto the terminal: `mai stop` prints its own sentence, and the logger process is gone.
    path = log_file(cfg)
    if path is not None:
        try:
            append_event(path, "info", "mai.bootstrap", "system.stopped", duration_s=round(report.duration_s, 3),
                         killed=[k["name"] for k in killed])
        except OSError:
            pass  # an unusable state dir already said so at start; stopping goes on
    return report


def _shutdown_quietly(asys: Any) -> None:
    try:
        _with_timeout(asys.shutdown, 12, "shutdown")
    except Exception:  # noqa: BLE001 - already failing; the original error matters more
        pass
