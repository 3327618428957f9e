"""How a batch of images travels through shared memory: whole, in slices that fit, or not at all (file paths).

Pure: the sizes and the free space come in, the slices go out. Only `SHM_SHARE` of the free space is planned for,
since other processes (a DataLoader, a second client) write there too and a miss is SIGBUS, not an error."""

from __future__ import annotations

SHM_SHARE = 0.5


def plan_shm_batches(count: int, image_bytes: int, free_bytes: int | None) -> list[tuple[int, int]] | None:
    """`[(lo, hi), ...]` covering `range(count)`, each slice's bytes within SHM_SHARE of `free_bytes`;
    1. free space unknown (no /dev/shm on this OS): one slice;
    2. not even one image fits: None, send the images as files;
    3. otherwise as many images per slice as fit."""
    if free_bytes is None:  # (1)
        return [(0, count)]
    per_slice = int(free_bytes * SHM_SHARE) // max(image_bytes, 1)
    if per_slice < 1:  # (2)
        return None
    return [(lo, min(lo + per_slice, count)) for lo in range(0, count, per_slice)]  # (3)
