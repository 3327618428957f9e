"""On a real NVIDIA GPU: NVML's per-process figures show this process's own allocation, attributed to the part whose
pid it is, and the per-process footprint rule measures it. Skipped without CUDA or NVML, and (saying why) where
NVML gives no per-process figures or shows host PIDs (WDDM, WSL2, containers: real-servers.md N2)."""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import pytest  # noqa: E402
import torch  # noqa: E402

from backends.vram import NvmlProbe  # noqa: E402
from mai.core.attribution import Owner, owner_of  # noqa: E402
from mai.core.footprints import judge_delta  # noqa: E402
from messages.errors import NoGpu  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)
try:
    NvmlProbe(0).close()
except NoGpu as exc:
    pytest.skip(f"NVML unavailable: {exc}", allow_module_level=True)

MiB = 2**20


def test_this_processs_allocation_is_its_own_row_and_its_growth_is_the_footprint() -> None:
    torch.cuda.init()
    torch.zeros(1, device="cuda:0")  # this process's context exists before the "before" reading
    torch.cuda.synchronize()
    with NvmlProbe(0) as probe:
        before = probe.snapshot()
        if not before.per_process:
            pytest.skip(f"no per-process figures here: {before.per_process_note}")
        mine = [r for r in before.processes if r.pid == os.getpid()]
        if not mine:
            pytest.skip(f"NVML does not list pid {os.getpid()} (a container sees host PIDs): "
                        f"{[(r.pid, r.name) for r in before.processes]}")
        block = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        after = probe.snapshot()
    (row,) = [r for r in after.processes if r.pid == os.getpid()]
    print(f"\nthis process: {mine[0].used_bytes / MiB:.0f} -> {row.used_bytes / MiB:.0f} MiB ({row.name}); "
          f"rows {[(r.name, r.used_bytes // MiB) for r in after.processes]}")
    assert row.name and owner_of(row, clip_pid=os.getpid()) is Owner.CLIP
    verdict = judge_delta(before, after, 512 * MiB, Owner.CLIP, clip_pid=os.getpid())
    assert verdict.reason == "process_delta" and abs(verdict.nbytes - 512 * MiB) <= 0.05 * 512 * MiB
    del block
