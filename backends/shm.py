"""The shared-memory file system's free space: read before writing a batch of images there.

`SharedMemory(create=True)` is shm_open plus a sparse ftruncate, so a block larger than the free space is created
without complaint and the writer dies of SIGBUS on the first page that does not fit (real-servers.md S1; Docker's
default `/dev/shm` is 64 MiB). Torch-free, so the client can import it."""

from __future__ import annotations

import os

SHM_DIR = "/dev/shm"


def shm_free_bytes(directory: str = SHM_DIR) -> int | None:
    """Free bytes there; None where there is no such file system (Windows, macOS: nothing to check)."""
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no os.statvfs on Windows
        return None
    return stats.f_bavail * stats.f_frsize
