"""CLIP on the simulated GPU: real OpenCLIP embeddings computed on the CPU, placement recorded in the GPU ledger.

Used by system tests and `mai demo` on machines without a GPU, so the coordinator's ordering and fit decisions
are checked against the same ledger the Ollama and LM Studio doubles allocate in. `device` says "sim-gpu"
rather than pretending to be CUDA."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy

from backends.clip import OpenClipAdapter
from mai.sim.gpu_ledger import GpuLedger

OWNER = "clip"
SIM_GPU_UUID = "GPU-51a00000-0000-4000-8000-000000000000"


class SimulatedGpuClip:
    def __init__(self, ledger_path: str, model_name: str, pretrained: str | None, precision: str = "fp32", *,
                 seed: int | None = None, threads: int | None = None, move_s: float = 0.03,
                 footprint_bytes: int | None = None) -> None:
        self.ledger = GpuLedger(ledger_path)
        self.inner = OpenClipAdapter(model_name, pretrained, precision, seed=seed, threads=threads)
        self.move_s = move_s
        # What it occupies on the simulated GPU: a declared size lets a tiny test model stand in for ViT-B-32.
        self._footprint_bytes = footprint_bytes
        self.on_gpu = False
        self.ledger.free(OWNER)  # a restarted mover starts on the CPU: what its predecessor held died with it

    @property
    def device(self) -> str:
        return "sim-gpu" if self.on_gpu else "cpu"

    @property
    def footprint_bytes(self) -> int:
        return self._footprint_bytes or self.inner.footprint_bytes

    @property
    def embedding_dim(self) -> int:
        return self.inner.embedding_dim

    @staticmethod
    def cuda_available() -> bool:
        return True

    def to_gpu(self, device_index: int = 0, free_bytes: Callable[[], int] | None = None) -> float:
        """`free_bytes` is accepted for the real adapter's signature; the ledger's change is the footprint exactly."""
        if self.on_gpu:
            return 0.0
        began = time.monotonic()
        self.ledger.begin(OWNER, "move_gpu")
        try:
            time.sleep(self.move_s)
            self.ledger.allocate(OWNER, self.footprint_bytes)  # raises OutOfMemory when it does not fit
            self.on_gpu = True
        finally:
            self.ledger.end(OWNER, "move_gpu")
        return time.monotonic() - began

    def to_cpu(self) -> float:
        if not self.on_gpu:
            return 0.0
        began = time.monotonic()
        self.ledger.begin(OWNER, "move_cpu")
        time.sleep(self.move_s)
        self.ledger.free(OWNER)
        self.on_gpu = False
        self.ledger.end(OWNER, "move_cpu")
        return time.monotonic() - began

    def embed_images(self, paths: Sequence[str]) -> numpy.ndarray:
        return self.inner.embed_images(paths)

    def embed_image_arrays(self, shm_name: str, shape: tuple[int, int, int, int]) -> numpy.ndarray:
        return self.inner.embed_image_arrays(shm_name, shape)

    def embed_texts(self, texts: Sequence[str]) -> numpy.ndarray:
        return self.inner.embed_texts(texts)

    def gpu_memory_allocated(self) -> int:
        return self.footprint_bytes if self.on_gpu else 0

    @staticmethod
    def cuda_device_uuids() -> list[str]:
        """One simulated CUDA device, in the form torch prints (no "GPU-" prefix)."""
        return [SIM_GPU_UUID[4:]]

    def cuda_memory(self, device_index: int) -> tuple[int, int, str]:
        """Like `torch.cuda.mem_get_info`: device-wide, every holder of the ledger counted."""
        snap = self.ledger.snapshot()
        return snap.free_bytes, snap.total_bytes, snap.device_name


def make_clip_adapter(cfg: Any, ledger_path: str) -> Any:
    """The CLIP adapter the configuration asks for (torch is imported here, inside the mover's process only)."""
    c = cfg.clip
    if c.backend == "simulated":
        declared = c.footprint_mb * 2**20 if c.footprint_mb else None  # clip.footprint_mb: its size on the simulated GPU
        return SimulatedGpuClip(ledger_path, c.model, c.pretrained, c.precision, seed=0, threads=c.threads,
                                footprint_bytes=declared)
    return OpenClipAdapter(c.model, c.pretrained, c.precision, threads=c.threads)
