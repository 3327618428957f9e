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
- memory info v2 (`.reserved` apart from `.used`) as nvidia-ml-py 13.615.71 `pynvml.py` nvmlDeviceGetMemoryInfo;
- per-process rows as `nvmlDeviceGet{Compute,Graphics}RunningProcesses` return them (`pynvml.py:4162-4299`: the
  unversioned names call v3; a driver without v3 raises FunctionNotFound, which `throwOnVersionMismatch`
  (`pynvml.py:3131-3141`) turns into `NVMLLibraryMismatchError`; usedGpuMemory is None where NVML answers
  NVML_VALUE_NOT_AVAILABLE, as under Windows WDDM; WSL2 answers NotSupported: real-servers.md N2). With a `ledger`
  the first GPU's memory and rows follow the simulated GPU ledger, each owner a process: "clip" is CLIP's own pid,
  "ollama:<model>" a `llama-server` child of `ollama` (`ollama/ollama@fb30760:llm/llama_server.go:339-349, 423`),
  "lmstudio:<id>" an `lm-studio` process, "other:<name>" (or any other owner) a program named after it.
`install` also puts psutil's Process over the simulated pids, so the probe names them as it names real ones.
Errors are raised as pynvml's `_nvmlCheckReturn` raises them: `NVMLError(return_code)`, which nvidia-ml-py turns
into the code's own subclass (`NVMLError_DriverNotLoaded` for 9, `NVMLError_LibraryNotFound` for 12, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml

GiB = 2**30

_REAL_PROCESS = psutil.Process
PROCESS_MEMORY = ("reported", "wddm", "not_supported", "no_v3")  # how the per-process queries answer


@dataclass
class SimProcess:
    pid: int
    name: str
    used_bytes: int
    parent_name: str = ""
    graphics: bool = False  # listed by the graphics query (a desktop, a browser); else by the compute one


@dataclass
class SimGpu:
    name: str
    uuid: str  # NVML's form, "GPU-..."
    total_bytes: int = 24 * GiB
    used_bytes: int = GiB
    processes: list[SimProcess] = field(default_factory=list)


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
    process_memory: str = "reported"  # one of PROCESS_MEMORY: real figures, WDDM's None, WSL2's NotSupported, no v3
    ledger: Any = None  # a GpuLedger the first GPU follows (memory and per-process rows)
    clip_pid: int = 0  # the pid the ledger's "clip" owner runs as
    hidden_pids: set[int] = field(default_factory=set)  # psutil raises AccessDenied for these
    owner_pids: dict[str, int] = field(default_factory=dict)  # ledger owner -> its simulated pid, once seen
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
            "nvmlDeviceGetComputeRunningProcesses": lambda h: self._running(h, False, 3),
            "nvmlDeviceGetComputeRunningProcesses_v2": lambda h: self._running(h, False, 2),
            "nvmlDeviceGetGraphicsRunningProcesses": lambda h: self._running(h, True, 3),
            "nvmlDeviceGetGraphicsRunningProcesses_v2": lambda h: self._running(h, True, 2),
        }.items():
            monkeypatch.setattr(pynvml, name, fn)
        monkeypatch.setattr(psutil, "Process", self._process_class())
        return self

    def _process_class(self) -> type:
        """psutil's Process over the simulated pids (named as given, their parent by `parent_name`); real pids (CLIP's
        own) stay real; `hidden_pids` raise AccessDenied as another user's processes do. A subclass, since psutil
        compares Process instances with isinstance."""
        sim = self

        class SimulatedProcess(_REAL_PROCESS):
            def __init__(self, pid: int | None = None) -> None:
                if pid in sim.hidden_pids:
                    raise psutil.AccessDenied(pid)
                self._sim = next((row for gpu in sim.gpus for row in gpu.processes
                                  if row.pid == pid and pid != sim.clip_pid), None)
                if self._sim is None:
                    super().__init__(pid)

            def name(self) -> str:
                return self._sim.name if self._sim is not None else super().name()

            def parent(self) -> Any:
                if self._sim is None:
                    return super().parent()
                parent_name = self._sim.parent_name
                return SimpleNamespace(name=lambda: parent_name) if parent_name else None

        return SimulatedProcess

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
        gpu = self._follow(handle)
        free = gpu.total_bytes - gpu.used_bytes
        if version is None:
            return SimpleNamespace(total=gpu.total_bytes, used=gpu.used_bytes, free=free)
        return SimpleNamespace(version=version, total=gpu.total_bytes, reserved=0, used=gpu.used_bytes, free=free)

    def _follow(self, handle: int) -> SimGpu:
        """The GPU, with the first one's memory and processes read from the ledger when there is one."""
        gpu = self.gpus[handle]
        if self.ledger is not None and handle == 0:
            gpu.processes = self.ledger_processes(self.ledger.usage())
            gpu.used_bytes = sum(p.used_bytes for p in gpu.processes)
        return gpu

    def ledger_processes(self, usage: dict[str, int]) -> list[SimProcess]:
        """Each ledger owner as the process the real one runs in (see the module docstring)."""
        rows = []
        for owner, nbytes in usage.items():
            kind, _, rest = owner.partition(":")
            if owner == "clip":
                rows.append(SimProcess(self.clip_pid or self._pid(owner), "python3", nbytes))
            elif kind == "ollama":
                rows.append(SimProcess(self._pid(owner), "llama-server", nbytes, parent_name="ollama"))
            elif kind == "lmstudio":
                rows.append(SimProcess(self._pid(owner), "lm-studio", nbytes))
            else:
                rows.append(SimProcess(self._pid(owner), rest if kind == "other" and rest else owner, nbytes,
                                       graphics=True))
        return rows

    def _pid(self, owner: str) -> int:
        return self.owner_pids.setdefault(owner, 40_000 + len(self.owner_pids))

    def _running(self, handle: int, graphics: bool, version: int) -> list[SimpleNamespace]:
        self._ready()
        if self.process_memory == "not_supported":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if self.process_memory == "no_v3" and version == 3:
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                                  "match the NVML lib version.")
        wddm = self.process_memory == "wddm"
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if wddm else p.used_bytes, gpuInstanceId=0xFFFFFFFF,
                                computeInstanceId=0xFFFFFFFF)
                for p in self._follow(handle).processes if p.graphics == graphics]
