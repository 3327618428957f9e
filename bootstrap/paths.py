"""Where Mai keeps its files, all under the state directory unless the configuration says otherwise, and how they
are made private: the state directory holds the chat history, the log and the learned footprints, so it is
created 0700 and every file Mai puts in it 0600 whatever the umask. An existing state directory that others can
enter is tightened (which also shuts them out of anything an older Mai left readable inside it); its contents
are not walked, so a state_dir pointed at a folder full of other things changes nothing else."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

# Called as notice(path, old_mode, new_mode) whenever an existing directory or file had to be tightened.
Notice = Callable[[Path, int, int], None]


def under_state_dir(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(cfg.system.state_dir) / path


def ledger_path(cfg: Any) -> str:
    """The simulated GPU's ledger (tests and `mai demo`)."""
    return str(under_state_dir(cfg, cfg.gpu.simulated_ledger or "sim-gpu.sqlite"))


def stopping_marker(cfg: Any) -> Path:
    """Present while `mai stop` shuts the system down: the foreground process must not revive a supervisor that
    is exiting on purpose."""
    return Path(cfg.system.state_dir) / "stopping"


def subscribers_file(cfg: Any) -> Path:
    """The coordinator's event subscribers (actor addresses), kept for its successor after a crash; a new system
    starts without them (their addresses died with the old one)."""
    return Path(cfg.system.state_dir) / "subscribers.pickle"


def log_file(cfg: Any) -> Path | None:
    return None if cfg.logging.file is None else under_state_dir(cfg, cfg.logging.file)


def _tighten(path: Path, mode: int, notice: Notice | None) -> None:
    """Drop every group and other permission bit; report it when there was one."""
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        if notice is not None:
            notice(path, mode, mode & 0o700)


def private_dir(path: str | Path, notice: Notice | None = None, *, tighten_existing: bool = True) -> Path:
    """Create `path` (and missing parents) as 0700, or tighten it if group or others can access it.

    `tighten_existing=False` for the folder of a file that may live outside the state directory (a user's
    folder is theirs to set): then only folders Mai creates are made private."""
    path = Path(path)
    if path.parent != path and not path.parent.exists():
        private_dir(path.parent, tighten_existing=False)  # parents we create are ours and private too
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
        if tighten_existing:
            _tighten(path, stat.S_IMODE(path.stat().st_mode), notice)
        return path
    os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def private_file(path: str | Path, notice: Notice | None = None) -> Path:
    """Create `path` empty as 0600 if missing (before a library creates it with the umask), or tighten it.

    Call it before SQLite opens a database: SQLite gives its -wal, -shm and -journal files the database's mode."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE)
    except FileExistsError:
        _tighten(path, stat.S_IMODE(path.stat().st_mode), notice)
        return path
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the open's mode is filtered by the umask
    finally:
        os.close(fd)
    return path
