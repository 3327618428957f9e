"""The spec's properties 7 and 12 (DESIGN invariant 10) on the CPU, with the production architecture: OpenCLIP
ViT-B-32 built by `OpenClipAdapter` exactly as Mai builds it (random weights, `pretrained=None`), small batches.

7.  Embeddings are identical across device round trips: a GPU copy made and dropped (`_copy_module`, the helper
    `to_gpu` uses, aimed at the CPU here) and `to_cpu` leave the CPU master's vectors bit-identical.
12. A half-precision copy (fp16, bf16: what `clip.precision` puts on the GPU) agrees with the fp32 master at
    cosine >= 0.999 per image and per text.

The same moves on a real GPU are in tests/gpu/test_gpu_clip_nvml.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backends.clip import OpenClipAdapter, _copy_module

MODEL = "ViT-B-32"
TEXTS = ["a screenshot of a login form", "a red button labelled OK"]
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def adapter() -> OpenClipAdapter:
    return OpenClipAdapter(MODEL, None, seed=0, threads=2)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("vit-b-32")
    pixels = np.random.default_rng(12).integers(0, 256, size=(2, 96, 128, 3), dtype=np.uint8)
    paths = []
    for index, array in enumerate(pixels):
        path = folder / f"screen-{index}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def _with_copy(adapter: OpenClipAdapter, dtype: torch.dtype, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embed through the adapter's own batching and normalisation with a `dtype` copy active, the input cast to
    that dtype as the GPU path casts it; then drop the copy as `to_cpu` does."""
    adapter._gpu_model = _copy_module(adapter._master, torch.device("cpu"), dtype)
    try:
        assert {p.dtype for p in adapter._active_model().parameters()} == {dtype}
        images = adapter._embed_chunks(
            len(paths),
            lambda lo, hi: adapter._image_batch(Image.open(p).convert("RGB") for p in paths[lo:hi]),
            lambda model, batch, device: model.encode_image(batch.to(device=device, dtype=dtype)),
        )
        texts = adapter.embed_texts(TEXTS)
    finally:
        adapter.to_cpu()
    return images, texts


def test_the_production_architecture_is_what_is_tested(adapter: OpenClipAdapter) -> None:
    assert adapter.model_name == MODEL and adapter.pretrained is None and adapter.embedding_dim == 512
    assert sum(p.numel() for p in adapter._master.parameters()) > 150_000_000  # ViT-B-32: 151 M, not a test toy


def test_property_7_embeddings_are_bit_identical_across_a_round_trip(
    adapter: OpenClipAdapter, image_paths: list[str]
) -> None:
    before_images, before_texts = adapter.embed_images(image_paths), adapter.embed_texts(TEXTS)
    _with_copy(adapter, torch.float16, image_paths)  # a copy made, used and dropped
    assert adapter.to_cpu() >= 0.0 and adapter.device == "cpu"
    np.testing.assert_array_equal(adapter.embed_images(image_paths), before_images)
    np.testing.assert_array_equal(adapter.embed_texts(TEXTS), before_texts)
    assert next(adapter._master.parameters()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_property_12_half_precision_agrees_with_fp32_at_cosine_0_999(
    adapter: OpenClipAdapter, image_paths: list[str], dtype: torch.dtype
) -> None:
    fp32_images, fp32_texts = adapter.embed_images(image_paths), adapter.embed_texts(TEXTS)
    half_images, half_texts = _with_copy(adapter, dtype, image_paths)
    for name, fp32, half in (("image", fp32_images, half_images), ("text", fp32_texts, half_texts)):
        assert half.dtype == np.float32 and np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
        cosines = np.sum(fp32 * half, axis=1)  # rows are unit length
        assert cosines.min() >= MIN_COSINE, f"{name} cosine {cosines.min():.6f} < {MIN_COSINE} at {dtype}"
        assert not np.array_equal(fp32, half), "the copy did not run at the lower precision"
