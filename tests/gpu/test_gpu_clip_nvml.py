"""On a real NVIDIA GPU: NVML agrees with CUDA, and a production-sized CLIP (ViT-B-32, random weights) moves
cpu → cuda → cpu with the device reported truthfully, embeddings that agree across devices, and its VRAM really
handed back to the driver. Skipped without CUDA or NVML; run with `-m gpu -s` to see the move timings."""

from __future__ import annotations

import os

# NVML numbers devices in PCI order and CUDA "fastest first"; align them before CUDA starts (multi-GPU hosts).
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from backends.vram import NvmlProbe  # noqa: E402
from messages.errors import NoGpu  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)
try:
    NvmlProbe(0).close()
except NoGpu as exc:
    pytest.skip(f"NVML unavailable: {exc}", allow_module_level=True)

from backends.clip import OpenClipAdapter, write_images_to_shm  # noqa: E402

MiB = 2**20
TEXTS = ["a screenshot of a login form", "a red button labelled OK", "an empty desktop", "a terminal window"]


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(4, 224, 224, 3), dtype=np.uint8)


def _embed_both(adapter: OpenClipAdapter, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    block, shape = write_images_to_shm(pixels)
    try:
        images = adapter.embed_image_arrays(block.name, shape)
    finally:
        block.close()
        block.unlink()
    return adapter.embed_texts(TEXTS), images


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())  # rows are unit length


def test_nvml_snapshot_is_sane_and_matches_cuda() -> None:
    free_before, total_cuda = torch.cuda.mem_get_info(0)  # creates this process's context before NVML looks
    with NvmlProbe(0) as probe:
        snap = probe.snapshot()
    free_after, _ = torch.cuda.mem_get_info(0)
    print(f"\nNVML {snap.device_name}: total {snap.total_bytes / MiB:.0f} MiB, used {snap.used_bytes / MiB:.0f} MiB, "
          f"free {snap.free_bytes / MiB:.0f} MiB; CUDA total {total_cuda / MiB:.0f} MiB free {free_after / MiB:.0f} MiB")
    assert (snap.source, snap.gpu_present) == ("nvml", True) and snap.device_name
    assert 0 < snap.used_bytes and 0 < snap.free_bytes
    assert snap.used_bytes + snap.free_bytes <= snap.total_bytes
    assert abs(snap.total_bytes - total_cuda) <= 0.05 * snap.total_bytes
    tolerance = 512 * MiB  # other processes, and NVML's and CUDA's different treatment of reserved memory
    assert min(free_before, free_after) - tolerance <= snap.free_bytes <= max(free_before, free_after) + tolerance


def test_clip_round_trip_reports_device_agrees_and_frees_vram(pixels: np.ndarray) -> None:
    adapter = OpenClipAdapter("ViT-B-32", None, seed=0)
    assert adapter.device == "cpu"
    cpu_texts, cpu_images = _embed_both(adapter, pixels)

    with NvmlProbe(0) as probe:
        first_gpu_s = adapter.to_gpu(0)  # includes the CUDA context and pinning the master once
        assert adapter.device == "cuda:0"
        assert adapter.gpu_memory_allocated() >= adapter.footprint_bytes
        gpu_texts, gpu_images = _embed_both(adapter, pixels)
        used_on_gpu = probe.snapshot().used_bytes

        first_cpu_s = adapter.to_cpu()
        assert adapter.device == "cpu"
        assert adapter.gpu_memory_allocated() == 0
        used_after = probe.snapshot().used_bytes

        warm_gpu_s = adapter.to_gpu(0)
        idempotent_gpu_s = adapter.to_gpu(0)
        assert adapter.device == "cuda:0"
        warm_cpu_s = adapter.to_cpu()
        idempotent_cpu_s = adapter.to_cpu()
        assert adapter.device == "cpu" and adapter.gpu_memory_allocated() == 0

    print(f"\nViT-B-32 fp32 footprint {adapter.footprint_bytes / MiB:.1f} MiB; NVML used fell by "
          f"{(used_on_gpu - used_after) / MiB:.1f} MiB; moves (s): first to_gpu {first_gpu_s:.3f}, "
          f"to_cpu {first_cpu_s:.3f}, warm to_gpu {warm_gpu_s:.3f}, to_cpu {warm_cpu_s:.3f}, "
          f"idempotent {idempotent_gpu_s:.6f}/{idempotent_cpu_s:.6f}; min cosine cpu/cuda "
          f"text {_min_cosine(cpu_texts, gpu_texts):.6f} image {_min_cosine(cpu_images, gpu_images):.6f}")
    assert _min_cosine(cpu_texts, gpu_texts) >= 0.999
    assert _min_cosine(cpu_images, gpu_images) >= 0.999
    assert used_on_gpu - used_after >= 0.75 * adapter.footprint_bytes
    assert idempotent_gpu_s < 0.01
    # Pinning the master and the round trips left the CPU model untouched.
    again_texts, again_images = _embed_both(adapter, pixels)
    np.testing.assert_array_equal(again_texts, cpu_texts)
    np.testing.assert_array_equal(again_images, cpu_images)


def test_half_precision_gpu_copy_costs_half_and_agrees_with_cpu(pixels: np.ndarray) -> None:
    fp32_bytes = OpenClipAdapter("ViT-B-32", None, seed=0).footprint_bytes
    adapter = OpenClipAdapter("ViT-B-32", None, "fp16", seed=0)
    assert adapter.footprint_bytes == pytest.approx(fp32_bytes / 2, rel=1e-3)
    cpu_texts, cpu_images = _embed_both(adapter, pixels)  # the CPU master runs fp32
    adapter.to_gpu(0)
    try:
        assert adapter.device == "cuda:0"
        assert next(adapter._gpu_model.parameters()).dtype == torch.float16
        gpu_texts, gpu_images = _embed_both(adapter, pixels)
    finally:
        adapter.to_cpu()
    assert adapter.gpu_memory_allocated() == 0
    np.testing.assert_allclose(np.linalg.norm(gpu_images, axis=1), 1.0, atol=1e-5)
    assert _min_cosine(cpu_texts, gpu_texts) >= 0.999
    assert _min_cosine(cpu_images, gpu_images) >= 0.999


def test_to_gpu_with_a_missing_device_index_is_no_gpu() -> None:
    adapter = OpenClipAdapter("ViT-Tiny-test", None, seed=0)
    with pytest.raises(NoGpu, match="out of range"):
        adapter.to_gpu(torch.cuda.device_count())
    assert adapter.device == "cpu"


# --- issue 11: footprint measured, workspaces released, one pinned buffer, one GPU name --------------------------
# Each runs in a fresh subprocess where the first to_gpu must be the process's first CUDA use (the context counts).

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _fresh_process(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_measured_footprint_of_the_first_to_gpu_is_within_5_percent_of_nvmls_change() -> None:
    figures = _fresh_process("""
import json
from backends.clip import OpenClipAdapter
from backends.vram import NvmlProbe
adapter = OpenClipAdapter("ViT-B-32", None, seed=0)
mover_probe, judge = NvmlProbe(0), NvmlProbe(0)  # the mover's reader, and an independent one
before = judge.snapshot().used_bytes
adapter.to_gpu(0, lambda: mover_probe.snapshot().free_bytes)
after = judge.snapshot().used_bytes
print(json.dumps({"measured": adapter.measured_move_bytes, "nvml": after - before, "params": adapter.footprint_bytes}))
""")
    print(f"\nfirst to_gpu: measured {figures['measured'] / MiB:.0f} MiB, NVML change {figures['nvml'] / MiB:.0f} MiB, "
          f"parameters {figures['params'] / MiB:.0f} MiB")
    assert figures["nvml"] > figures["params"]  # the context and allocator rounding come on top (T3, T4)
    assert abs(figures["measured"] - figures["nvml"]) <= 0.05 * figures["nvml"]


def test_memory_allocated_is_zero_after_to_cpu_once_cublas_workspaces_are_cleared() -> None:
    figures = _fresh_process("""
import json, numpy, torch
from backends.clip import OpenClipAdapter
adapter = OpenClipAdapter("ViT-B-32", None, seed=0)
adapter.to_gpu(0)
adapter.embed_texts(["a matmul makes cuBLAS allocate its workspace"])
on_gpu = torch.cuda.memory_allocated()
adapter.to_cpu()
print(json.dumps({"on_gpu": on_gpu, "after": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}))
""")
    print(f"\nallocated on GPU {figures['on_gpu'] / MiB:.0f} MiB; after to_cpu {figures['after']} B "
          f"(reserved {figures['reserved']} B)")
    assert figures["on_gpu"] > 0
    assert figures["after"] == 0 and figures["reserved"] == 0


def test_pinned_master_costs_at_most_1_1_times_the_parameter_bytes_of_ram() -> None:
    figures = _fresh_process("""
import ctypes, json, psutil, torch
from backends.clip import OpenClipAdapter
def rss():
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory otherwise
    return psutil.Process().memory_info().rss
torch.empty(1, device="cuda:0")  # the CUDA context and its libraries first: not the master's cost
adapter = OpenClipAdapter("ViT-B-32", None, seed=0)
params = sum(t.numel() * t.element_size() for t in list(adapter._master.parameters()) + list(adapter._master.buffers()))
before = rss()  # the pageable master is resident: `params` of it
adapter.to_gpu(0)
adapter.to_cpu()
after = rss()
pinned = all(t.is_pinned() for t in adapter._master.parameters())
print(json.dumps({"params": params, "master_rss": after - before + params, "pinned": pinned}))
""")
    print(f"\nmaster: {figures['params'] / MiB:.0f} MiB of parameters, {figures['master_rss'] / MiB:.0f} MiB resident "
          f"after pinning (pinned: {figures['pinned']})")
    assert figures["pinned"]
    assert figures["master_rss"] <= 1.1 * figures["params"]


def test_clip_and_nvml_name_the_same_gpu() -> None:
    from backends.clip import OpenClipAdapter as Adapter
    from mai.core.gpu_device import normalise_uuid, resolve_cuda_index

    with NvmlProbe(0) as probe:
        nvml_uuid = probe.device_uuid
        by_uuid = NvmlProbe(nvml_uuid)
        assert by_uuid.snapshot().device_uuid == nvml_uuid
        by_uuid.close()
    cuda_uuids = Adapter.cuda_device_uuids()
    index, note = resolve_cuda_index(0, cuda_uuids, nvml_uuid)
    print(f"\nNVML 0 = {nvml_uuid}; CUDA {index} = {normalise_uuid(cuda_uuids[index])}; {note or 'same numbering'}")
    assert normalise_uuid(str(torch.cuda.get_device_properties(index).uuid)) == nvml_uuid
    assert normalise_uuid(cuda_uuids[0]) == nvml_uuid  # CUDA_DEVICE_ORDER=PCI_BUS_ID: index 0 is NVML's 0 too
