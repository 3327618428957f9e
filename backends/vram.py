"""VRAM probes: the only module that imports pynvml (nvidia-ml-py) and psutil.

In: a backend name ("nvml" or "simulated") and a device (NVML index or GPU UUID). Out: `VramSnapshot`s naming the
GPU by name and UUID, with each process's use where NVML reports it (named through psutil), and Mai errors (never
NVML's). `open_vram_probe` picks the probe: NVML on a real GPU; without
one, host memory through psutil, with a sentence saying why, so status still has numbers and names its
degradation. Whether an NVML failure is worth retrying is in `NoGpu.details["permanent"]`: only a missing NVML
library is (real-servers.md N4); the sampler retries the rest with backoff.

NVML creates no CUDA context, so a probe is safe in any process; this module never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, Sequence

import psutil
import pynvml
import structlog

from messages.errors import InvalidRequest, NoGpu
from messages.resources import GpuProcess, VramSnapshot

log = structlog.get_logger(__name__)

BACKENDS = ("nvml", "simulated")

_NVML_ERRORS = (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError)  # the mismatch error is not an NVMLError

# Why nvmlInit failed for good in this process, once known: a machine without libnvidia-ml does not grow one while
# we run, so later probes fail fast. Every other init failure (DriverNotLoaded at boot, LibRmVersionMismatch after a
# driver upgrade) clears by itself and is retried (real-servers.md N4).
_nvml_library_missing: str | None = None

# Errors that mean "this driver has no v2 memory query", after which v1 is used for the probe's life.
_NO_MEMORY_V2 = tuple(
    getattr(pynvml, name)
    for name in ("NVMLError_FunctionNotFound", "NVMLError_ArgumentVersionMismatch", "NVMLError_NotSupported")
    if hasattr(pynvml, name)
)

# Per-process queries: the unversioned names call v3; a driver without v3 raises FunctionNotFound, which
# nvidia-ml-py's throwOnVersionMismatch turns into NVMLLibraryMismatchError, after which v2 is used.
_PROCESS_QUERIES = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")

CGROUP_ROOT = Path("/sys/fs/cgroup")
HOST_MEMORY_NAME = "host memory (no GPU)"


class VramProbe(Protocol):
    """Reads device memory; `source` is the `VramSnapshot.source` it produces."""

    source: str

    def snapshot(self) -> VramSnapshot: ...

    def close(self) -> None: ...


class NvmlProbe:
    """Device-wide memory of one NVIDIA GPU through NVML. `device` is NVML's index (PCI bus order, which ignores
    CUDA_VISIBLE_DEVICES) or the GPU's UUID ("GPU-..."), looked up with nvmlDeviceGetHandleByUUID (N5)."""

    source = "nvml"

    def __init__(self, device: int | str = 0) -> None:
        global _nvml_library_missing
        self.device = device
        self._initialised = False
        if _nvml_library_missing is not None:
            raise _no_gpu(_nvml_library_missing, device, permanent=True)
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as exc:
            _nvml_library_missing = _nvml_text(exc)
            raise _no_gpu(_nvml_library_missing, device, permanent=True) from None
        except _NVML_ERRORS as exc:
            raise _no_gpu(_nvml_text(exc), device, permanent=False) from None
        self._initialised = True
        self._memory_v2 = True
        self._processes_v3 = True
        self._per_process_note: str | None = None  # the last answer, to log only its changes
        try:
            self._handle = _device_handle(device)
            self.device_name = _as_text(pynvml.nvmlDeviceGetName(self._handle))
            self.device_uuid = _as_text(pynvml.nvmlDeviceGetUUID(self._handle))
        except _NVML_ERRORS as exc:
            self.close()
            raise _no_gpu(_nvml_text(exc), device, permanent=False) from None
        except BaseException:
            self.close()
            raise

    def snapshot(self) -> VramSnapshot:
        """Total/used/free as nvidia-smi shows them (memory info v2; v1 on drivers without it)."""
        if not self._initialised:
            raise NoGpu(f"NVML probe for device {self.device!r} is closed", details={"cause": "closed"})
        try:
            info = self._memory_info()
        except _NVML_ERRORS as exc:  # mid-run (GPU lost, driver reloaded): the sampler reopens with backoff
            cause = _nvml_text(exc)
            raise NoGpu(
                f"NVML memory query failed on device {self.device!r}: {cause}",
                details={"cause": cause, "device": self.device, "permanent": False},
            ) from None
        taken_at = time.time()
        processes, note = self._processes()
        return VramSnapshot(
            total_bytes=int(info.total),
            used_bytes=int(info.used),
            free_bytes=int(info.free),
            source=self.source,
            device_name=self.device_name,
            taken_at=taken_at,
            device_uuid=self.device_uuid,
            processes=processes or (),
            per_process=processes is not None,
            per_process_note=note,
        )

    def close(self) -> None:
        """Pairs the nvmlInit of the constructor (NVML counts them); idempotent."""
        if self._initialised:
            self._initialised = False
            try:
                pynvml.nvmlShutdown()
            except _NVML_ERRORS as exc:
                log.warning("nvml.shutdown_failed", reason=_nvml_text(exc))

    def __enter__(self) -> NvmlProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _processes(self) -> tuple[tuple[GpuProcess, ...] | None, str]:
        """Each process's used bytes (compute and graphics lists; a process in both is one context, counted once), or
        None with the reason: WDDM reports usedGpuMemory=None, WSL2 answers NotSupported (real-servers.md N2). A
        failing process query never fails the reading: the device-wide figures stand without it."""
        used: dict[int, int] = {}
        note = ""
        try:
            for query in _PROCESS_QUERIES:
                for info in self._running(query):
                    if info.usedGpuMemory is None:
                        note = "NVML reports no per-process memory here (usedGpuMemory is None, as under Windows WDDM)"
                        break
                    used[int(info.pid)] = max(used.get(int(info.pid), 0), int(info.usedGpuMemory))
                if note:
                    break
        except _NVML_ERRORS as exc:
            note = f"NVML cannot list the GPU's processes here ({_nvml_text(exc)}; WSL2 answers NotSupported)"
        if note != self._per_process_note:
            self._per_process_note = note
            log.info("nvml.per_process", available=not note, reason=note or "reported")
        if note:
            return None, note
        return tuple(_named_process(pid, nbytes) for pid, nbytes in sorted(used.items())), ""

    def _running(self, query: str) -> list:
        if self._processes_v3:
            try:
                return getattr(pynvml, query)(self._handle)
            except pynvml.NVMLLibraryMismatchError:
                self._processes_v3 = False
        return getattr(pynvml, query + "_v2")(self._handle)

    def _memory_info(self):
        # v1 counts driver-reserved memory as used (~0.9 GB on an idle A100); v2 matches nvidia-smi.
        if self._memory_v2:
            try:
                return pynvml.nvmlDeviceGetMemoryInfo(self._handle, version=pynvml.nvmlMemory_v2)
            except _NO_MEMORY_V2:
                self._memory_v2 = False
        return pynvml.nvmlDeviceGetMemoryInfo(self._handle)


class PsutilProbe:
    """No GPU: host memory stands in so status still has numbers (`gpu_present=False`).

    Free is psutil's `available`, capped by the cgroup memory limits of this process (v2 `memory.max` or v1
    `memory.limit_in_bytes`, on its cgroup and every ancestor), since /proc/meminfo is host-wide even inside a
    limited container. `cgroup_dir` reads only that directory instead (tests, unusual mounts)."""

    source = "psutil"

    def __init__(self, cgroup_dir: str | Path | None = None) -> None:
        self._cgroup_dirs = (Path(cgroup_dir),) if cgroup_dir is not None else find_cgroup_dirs()

    def snapshot(self) -> VramSnapshot:
        memory = psutil.virtual_memory()
        total, free = int(memory.total), int(memory.available)
        for limit, usage in _cgroup_limits(self._cgroup_dirs):
            if limit < total:
                total = limit
            free = min(free, max(limit - usage, 0) if usage is not None else limit)
        free = min(free, total)
        return VramSnapshot(
            total_bytes=total,
            used_bytes=total - free,
            free_bytes=free,
            source=self.source,
            device_name=HOST_MEMORY_NAME,
            taken_at=time.time(),
            gpu_present=False,
        )

    def close(self) -> None:
        pass


class SimulatedProbe:
    """Reads the simulated GPU ledger shared with the test doubles and `mai demo`."""

    source = "simulated"

    def __init__(self, ledger_path: str | Path) -> None:
        from mai.sim.gpu_ledger import GpuLedger  # test and demo machinery: production never imports it

        self._ledger = GpuLedger(ledger_path)

    def snapshot(self) -> VramSnapshot:
        return self._ledger.snapshot()

    def close(self) -> None:
        pass


def open_vram_probe(
    backend: str, device: int | str = 0, ledger_path: str | Path | None = None
) -> tuple[VramProbe, NoGpu | None]:
    """The probe for `backend`, and the NVML failure it stands in for (None when there is none; the caller decides
    what to say and whether to retry, from `details["permanent"]`).

    "nvml" falls back to host memory through psutil when NVML cannot reach a GPU; "simulated" reads the ledger at
    `ledger_path`."""
    if backend == "nvml":
        try:
            return NvmlProbe(device), None
        except NoGpu as exc:
            return PsutilProbe(), exc
    if backend == "simulated":
        if ledger_path is None:
            raise InvalidRequest("the simulated VRAM backend needs ledger_path", details={"backend": backend})
        return SimulatedProbe(ledger_path), None
    raise InvalidRequest(
        f"unknown VRAM backend {backend!r}; accepted: {', '.join(repr(b) for b in BACKENDS)}",
        details={"backend": repr(backend), "accepted": list(BACKENDS)},
    )


def find_cgroup_dirs(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[Path, ...]:
    """This process's memory cgroup directory and its ancestors (v2 unified or v1 memory controller).

    When the path /proc shows does not exist under the mount (a container without its own cgroup namespace
    mounts its cgroup at the root), the mount root is used."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return ()
    found: list[Path] = []
    for line in lines:
        hierarchy_id, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy_id == "0" and controllers == "":
            mount = root
        elif "memory" in controllers.split(","):
            mount = root / "memory"
        else:
            continue
        leaf = mount / path.lstrip("/")
        chain = [leaf, *leaf.parents[: len(leaf.parents) - len(mount.parents)]] if leaf.is_dir() else [mount]
        found += [d for d in chain if _has_memory_limit(d)]
    return tuple(found)


def _has_memory_limit(directory: Path) -> bool:
    return (directory / "memory.max").is_file() or (directory / "memory.limit_in_bytes").is_file()


def _cgroup_limits(dirs: Sequence[Path]) -> list[tuple[int, int | None]]:
    """(limit, usage) for each directory that sets a limit; "max" (v2) means none."""
    limits = []
    for directory in dirs:
        for limit_file, usage_file in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit = _read_int(directory / limit_file)
            if limit is not None:
                limits.append((limit, _read_int(directory / usage_file)))
                break
    return limits


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" and anything odd: no limit


def _named_process(pid: int, used_bytes: int) -> GpuProcess:
    """A row named through psutil; a process it cannot see (gone, access denied, a host PID outside this container's
    PID namespace) keeps an empty name."""
    name = parent_name = ""
    try:
        process = psutil.Process(pid)
        name = process.name()
        parent = process.parent()
        parent_name = parent.name() if parent is not None else ""
    except psutil.Error:
        pass
    return GpuProcess(pid=pid, name=name, used_bytes=used_bytes, parent_name=parent_name)


def _device_handle(device: int | str):
    """NVML's handle for an index (PCI order) or a UUID; a GPU that is not there is NoGpu naming those that are."""
    if isinstance(device, str):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(device)
        except (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument):
            present = [_as_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
                       for i in range(pynvml.nvmlDeviceGetCount())]
            raise _no_gpu(f"no GPU with UUID {device}: NVML sees {', '.join(present) or 'none'}", device,
                          permanent=False) from None
    count = pynvml.nvmlDeviceGetCount()
    if not isinstance(device, int) or isinstance(device, bool) or not 0 <= device < count:
        raise _no_gpu(f"NVML device index {device!r} out of range: {count} device(s) present", device, permanent=False)
    return pynvml.nvmlDeviceGetHandleByIndex(device)


def _no_gpu(cause: str, device: int | str, *, permanent: bool) -> NoGpu:
    return NoGpu(f"NVML unavailable: {cause}", details={"cause": cause, "device": device, "permanent": permanent})


def _nvml_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _as_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
