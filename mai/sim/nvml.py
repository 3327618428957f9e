"""Simulated GPUs as NVML and CUDA each number them, with NVML's real failures raised inside NVML's own calls.

Tests install it over `pynvml` (and `torch.cuda` for the CLIP side) with pytest's monkeypatch, so the code under
test makes its ordinary calls and meets the real error classes where the real ones arise:
- NVML numbers GPUs in PCI bus order (`nvmlDeviceGetHandleByIndex`), CUDA fastest first unless
  CUDA_DEVICE_ORDER=PCI_BUS_ID (real-servers.md T7, N5; https://docs.nvidia.com/deploy/nvml-api/ and the CUDA
  environment-variable appendix): `cuda_order` gives CUDA's numbering, so the two can differ;
- a container without libnvidia-ml: `nvmlInit` raises `NVMLError_LibraryNotFound`, while CUDA still works (N3);
- transient init failures: `NVMLError_DriverNotLoaded` at boot, `NVMLError_LibRmVersionMismatch` after a driver
  upgrade, for the first `init_failures` calls only (N4);
- `nvmlDeviceGetUUID` returns "GPU-<uuid>"; torch's `_CUuuid` prints the same UUID without the prefix
  (torch/csrc/cuda/Module.cpp, `uuid_to_string`);
- memory info v2 (`.reserved` apart from `.used`) as nvidia-ml-py 13.615.71 `pynvml.py` nvmlDeviceGetMemoryInfo.
Errors are raised as pynvml's `_nvmlCheckReturn` raises them: `NVMLError(return_code)`, which nvidia-ml-py turns
into the code's own subclass (`NVMLError_DriverNotLoaded` for 9, `NVMLError_LibraryNotFound` for 12, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GiB = 2**30


@dataclass
class SimGpu:
    name: str
    uuid: str  # NVML's form, "GPU-..."
    total_bytes: int = 24 * GiB
    used_bytes: int = GiB


@dataclass
class SimulatedNvml:
    """GPUs in PCI order; `cuda_order[i]` is the PCI index CUDA calls device i when it numbers them fastest first
    (its default); with CUDA_DEVICE_ORDER=PCI_BUS_ID in the environment the same devices come in PCI order. A
    `cuda_order` leaving GPUs out models CUDA_VISIBLE_DEVICES hiding them."""

    gpus: list[SimGpu]
    cuda_order: list[int] | None = None
    library_missing: bool = False
    init_failures: list[int] = field(default_factory=list)  # NVML return codes for the next nvmlInit calls
    query_failure: int | None = None  # the return code memory queries fail with (mid-run: GPU lost, driver reload)
    inits: int = 0
    shutdowns: int = 0
    init_attempts: int = 0

    def install(self, monkeypatch: Any) -> SimulatedNvml:
        for name, fn in {
            "nvmlInit": self._init, "nvmlShutdown": self._shutdown,
            "nvmlDeviceGetCount": lambda: self._ready() and len(self.gpus),
            "nvmlDeviceGetHandleByIndex": self._by_index, "nvmlDeviceGetHandleByUUID": self._by_uuid,
            "nvmlDeviceGetName": lambda h: self.gpus[h].name, "nvmlDeviceGetUUID": lambda h: self.gpus[h].uuid,
            "nvmlDeviceGetMemoryInfo": self._memory,
        }.items():
            monkeypatch.setattr(pynvml, name, fn)
        return self

    def install_cuda(self, monkeypatch: Any) -> SimulatedNvml:
        """torch.cuda as a CUDA build sees these GPUs (no context is ever made: properties and memory only)."""
        import torch

        def order() -> list[int]:
            fastest_first = self.cuda_order if self.cuda_order is not None else list(range(len(self.gpus)))
            return sorted(fastest_first) if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" else fastest_first

        def gpu(device: Any) -> SimGpu:  # torch takes an index or a torch.device
            return self.gpus[order()[getattr(device, "index", device) or 0]]

        monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(order()))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
            name=gpu(i).name, uuid=gpu(i).uuid[4:], major=8, minor=9))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpu(i).name)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (gpu(i).total_bytes - gpu(i).used_bytes,
                                                                     gpu(i).total_bytes))
        return self

    def _init(self) -> None:
        self.init_attempts += 1
        if self.library_missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.init_failures:
            raise pynvml.NVMLError(self.init_failures.pop(0))
        self.inits += 1

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def _ready(self) -> bool:
        if self.inits <= self.shutdowns:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return True

    def _by_index(self, index: int) -> int:
        self._ready()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _by_uuid(self, uuid: str) -> int:
        self._ready()
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return index
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def _memory(self, handle: int, version: Any = None) -> SimpleNamespace:
        self._ready()
        if self.query_failure is not None:
            raise pynvml.NVMLError(self.query_failure)
        gpu = self.gpus[handle]
        free = gpu.total_bytes - gpu.used_bytes
        if version is None:
            return SimpleNamespace(total=gpu.total_bytes, used=gpu.used_bytes, free=free)
        return SimpleNamespace(version=version, total=gpu.total_bytes, reserved=0, used=gpu.used_bytes, free=free)
