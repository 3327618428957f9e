"""Whose VRAM is it: NVML's per-process rows attributed to Mai's parts or to other programs.

Rule 1: a row is CLIP's when its pid is the CLIP process's own; Ollama's when the process or its parent is an Ollama
process (the server, `ollama runner`, the older `ollama_llama_server`, or the `llama-server` it spawns); LM Studio's
likewise; everything else is another program's, named by its process name.
Rule 2: names are compared without case and without Windows' `.exe`; a row whose name psutil could not read (a
container's host PID, access denied) is another program's, shown as "pid N": NVML's per-process figures are
unreliable (real-servers.md N2), so this module only sorts what it is given and callers fall back to device-wide
readings when a part's own rows are not there.

Pure: no I/O, no clock. Process names at `ollama/ollama@fb30760`: `llm/llama_server.go:339-349, 423` (Ollama starts
its bundled `llama-server` binary as a child), `cmd/cmd.go:2463` and `runner/runner.go:10` (`ollama runner`, the
Ollama engine's runner: the same executable). LM Studio is closed source: its names ("LM Studio", `lm-studio`,
the headless `llmster`) are from its installers *(unverified)*.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from messages.resources import GpuProcess


class Owner(enum.Enum):
    CLIP = "clip"
    OLLAMA = "ollama"
    LMSTUDIO = "lmstudio"
    OTHER = "other"


OLLAMA_NAMES = frozenset({"ollama", "ollama_llama_server"})
LMSTUDIO_PREFIXES = ("lm studio", "lm-studio", "lmstudio", "llmster")


def _plain(name: str) -> str:
    name = name.strip().lower()
    return name[:-4] if name.endswith(".exe") else name


def _is_ollama(name: str) -> bool:
    return _plain(name) in OLLAMA_NAMES


def _is_lmstudio(name: str) -> bool:
    return _plain(name).startswith(LMSTUDIO_PREFIXES)


def owner_of(row: GpuProcess, clip_pid: int) -> Owner:
    """Rule 1, numbered: (1) CLIP's pid; (2) Ollama or its child; (3) LM Studio or its child; (4) anyone else."""
    if clip_pid > 0 and row.pid == clip_pid:  # (1)
        return Owner.CLIP
    if _is_ollama(row.name) or _is_ollama(row.parent_name):  # (2)
        return Owner.OLLAMA
    if _is_lmstudio(row.name) or _is_lmstudio(row.parent_name):  # (3)
        return Owner.LMSTUDIO
    return Owner.OTHER  # (4)


def shown_name(row: GpuProcess) -> str:
    return row.name or f"pid {row.pid}"


@dataclass(frozen=True)
class GpuUse:
    """One reading's rows, attributed: bytes per part of Mai, and other programs' bytes by process name (several
    processes of one program, such as a browser's, are summed), largest first."""

    mai: tuple[tuple[Owner, int], ...]
    others: tuple[tuple[str, int], ...]

    @property
    def mai_bytes(self) -> int:
        return sum(n for _, n in self.mai)

    @property
    def other_bytes(self) -> int:
        return sum(n for _, n in self.others)


def split_use(rows: Iterable[GpuProcess], clip_pid: int) -> GpuUse:
    mai: dict[Owner, int] = {}
    others: dict[str, int] = {}
    for row in rows:
        owner = owner_of(row, clip_pid)
        if owner is Owner.OTHER:
            others[shown_name(row)] = others.get(shown_name(row), 0) + row.used_bytes
        else:
            mai[owner] = mai.get(owner, 0) + row.used_bytes
    return GpuUse(tuple(sorted(mai.items(), key=lambda kv: (-kv[1], kv[0].value))),
                  tuple(sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))))


def growth(before: Iterable[GpuProcess], after: Iterable[GpuProcess], owner: Owner, clip_pid: int) -> int | None:
    """What `owner`'s processes grew by between two readings: the sum over its processes in `after` of what each
    gained (a runner that appeared counts whole; one that shrank or left, such as a model Ollama evicted to make
    room, counts nothing). None when `owner` has no process in `after`: the caller cannot tell its use apart."""
    held = {row.pid: row.used_bytes for row in before if owner_of(row, clip_pid) is owner}
    mine = [row for row in after if owner_of(row, clip_pid) is owner]
    if not mine:
        return None
    return sum(max(0, row.used_bytes - held.get(row.pid, 0)) for row in mine)
