"""`python -m bootstrap`: start Mai's actor system in the foreground; Ctrl-C (or SIGTERM) stops it.

`mai start` runs this same program detached, with its output in `<state_dir>/console.log`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import psutil

from bootstrap import system as boot
from bootstrap.paths import stopping_marker


REVIVE_GRACE_S = 0.5


def run_foreground(cfg: Any, *, console_logs: bool = True, out: Any = sys.stdout) -> int:
    try:
        info = boot.start(cfg, console_logs=console_logs)
    except Exception as err:  # noqa: BLE001 - reported as a sentence, not a traceback
        print(f"mai: {err}", file=sys.stderr)
        return 1
    print(
        f"Mai {info.version} running on {cfg.system.bind_address}:{cfg.system.admin_port} "
        f"(state dir {cfg.system.state_dir}); actors: {', '.join(c.role for c in info.children)}. "
        "Press Ctrl-C to stop.",
        file=out,
        flush=True,
    )
    stopping = {"flag": False}

    def request_stop(signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    supervisor_pid, admin_pid = info.supervisor_pid, _admin_pid(cfg)
    while not stopping["flag"]:
        time.sleep(0.2)
        _reap_children()
        if not boot._port_open(cfg.system.bind_address, cfg.system.admin_port):
            print("mai: the actor system has stopped", file=out, flush=True)
            return 0
        if not _alive(supervisor_pid) and _revivable(cfg, admin_pid, stopping):
            supervisor_pid = _revive(cfg, out) or supervisor_pid
    report = boot.stop(cfg)
    killed = f"; killed {len(report.killed)} leftover processes" if report.killed else ""
    print(f"Mai stopped in {report.duration_s:.2f} s{killed}", file=out, flush=True)
    return 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _admin_pid(cfg: Any) -> int | None:
    """The daemonised admin: the root of the system's process tree."""
    procs = boot.system_processes(cfg.system.admin_port)
    return procs[0].pid if procs else None


def _revivable(cfg: Any, admin_pid: int | None, stopping: dict) -> bool:
    """Only a lone supervisor's death is revived: never during `mai stop`, and never once the admin is gone too (a
    whole-system kill): joining a dead admin's port would start a bare Thespian admin in its place. The grace lets
    a kill of every process show before deciding."""
    time.sleep(REVIVE_GRACE_S)
    return (not stopping["flag"] and not stopping_marker(cfg).exists() and admin_pid is not None
            and _alive(admin_pid) and boot._port_open(cfg.system.bind_address, cfg.system.admin_port))


def _revive(cfg: Any, out: Any) -> int | None:
    """The supervisor died (SIGKILL, OOM killer): start a new one; None when that failed (tried again next turn)."""
    try:
        info = boot.revive_supervisor(cfg)
    except Exception as err:  # noqa: BLE001 - reported, retried on the next turn of the loop
        print(f"mai: the supervisor died and could not be restarted yet: {err}", file=out, flush=True)
        return None
    print(f"mai: the supervisor died; restarted it (pid {info.supervisor_pid}) with every actor", file=out, flush=True)
    return info.supervisor_pid


def _reap_children() -> None:
    """The admin daemonises by forking twice; collect the intermediate child so it is not left a zombie."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> int:
    from config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m bootstrap", description=__doc__)
    parser.add_argument("--config", help="a YAML file on top of the defaults (also: MAI_CONFIG)")
    parser.add_argument("--quiet", action="store_true", help="no log lines on the console")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"mai: {err}", file=sys.stderr)
        return 2
    return run_foreground(cfg, console_logs=not args.quiet)


if __name__ == "__main__":
    sys.exit(main())
