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
