"""Where Mai keeps its files, all under the state directory unless the configuration says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def under_state_dir(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(cfg.system.state_dir) / path


def ledger_path(cfg: Any) -> str:
    """The simulated GPU's ledger (tests and `mai demo`)."""
    return str(under_state_dir(cfg, cfg.gpu.simulated_ledger or "sim-gpu.sqlite"))


def log_file(cfg: Any) -> Path | None:
    return None if cfg.logging.file is None else under_state_dir(cfg, cfg.logging.file)
