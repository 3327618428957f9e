"""VRAM probes without a GPU: NVML's failure becomes NoGpu with NVML's reason, `open_vram_probe` degrades to psutil
and says why, psutil numbers respect cgroup limits, and the simulated probe reads the shared ledger.

NvmlProbe's decisions (v2 → v1 fallback, index checks, paired init/shutdown, error translation) are tested here
against a fake pynvml; the real NVML path runs in tests/gpu when a GPU is lent."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from backends import vram
from backends.vram import NvmlProbe, PsutilProbe, SimulatedProbe, find_cgroup_dirs, open_vram_probe
from messages.errors import InvalidRequest, NoGpu, Reason

MiB = 2**20
GiB = 2**30


def _nvml_really_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.fixture
def fresh_nvml_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's cached "NVML library is absent" verdict for the duration of a test."""
    monkeypatch.setattr(vram, "_nvml_library_missing", None)


class FakeNvml:
    """Just enough of pynvml for NvmlProbe: one device, v2 memory info unless told the driver lacks it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, device_count: int = 1, has_v2: bool = True) -> None:
        self.inits = self.shutdowns = 0
        self.memory_calls: list[object] = []
        self.has_v2 = has_v2
        self.query_error: Exception | None = None
        for name, fn in {
            "nvmlInit": self._init,
            "nvmlShutdown": self._shutdown,
            "nvmlDeviceGetCount": lambda: device_count,
            "nvmlDeviceGetHandleByIndex": lambda index: f"handle-{index}",
            "nvmlDeviceGetName": lambda handle: b"NVIDIA Fake 24GB",
            "nvmlDeviceGetUUID": lambda handle: "GPU-00000000-1111-2222-3333-444444444444",
            "nvmlDeviceGetMemoryInfo": self._memory_info,
        }.items():
            monkeypatch.setattr(pynvml, name, fn)

    def _init(self) -> None:
        self.inits += 1

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def _memory_info(self, handle, version=None):
        self.memory_calls.append(version)
        if self.query_error is not None:
            raise self.query_error
        if version is None:  # v1: driver-reserved memory counts as used
            return SimpleNamespace(total=24 * GiB, used=2 * GiB, free=22 * GiB)
        if not self.has_v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(version=version, total=24 * GiB, reserved=GiB, used=GiB, free=22 * GiB)


# ---------------------------------------------------------------------------------------------- real machine


def test_nvml_probe_without_a_gpu_raises_no_gpu_naming_nvmls_reason(fresh_nvml_verdict: None) -> None:
    if _nvml_really_works():
        pytest.skip("NVML works on this machine; see tests/gpu")
    with pytest.raises(NoGpu) as info:
        NvmlProbe()
    assert info.value.reason is Reason.NO_GPU
    assert "NVML Shared Library Not Found" in str(info.value)
    assert info.value.details["cause"] == "NVML Shared Library Not Found"


def test_open_nvml_without_a_gpu_degrades_to_psutil_and_says_why() -> None:
    if _nvml_really_works():
        pytest.skip("NVML works on this machine; see tests/gpu")
    probe, failure = open_vram_probe("nvml")
    assert isinstance(probe, PsutilProbe)
    assert failure is not None and failure.details["cause"] == "NVML Shared Library Not Found"
    assert failure.details["permanent"] is True  # no library: the one failure that is never retried (N4)
    assert probe.snapshot().source == "psutil"
    probe.close()


# ---------------------------------------------------------------------------------------------- NVML logic


def test_only_a_missing_nvml_library_is_cached_for_the_process(
    fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    codes = [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
             pynvml.NVML_ERROR_LIBRARY_NOT_FOUND]

    def failing_init() -> None:
        calls.append(codes[0])
        raise pynvml.NVMLError(codes.pop(0) if len(codes) > 1 else codes[0])  # pynvml's own _nvmlCheckReturn

    monkeypatch.setattr(pynvml, "nvmlInit", failing_init)
    with pytest.raises(NoGpu, match="Driver Not Loaded") as info:
        NvmlProbe()
    assert info.value.details["permanent"] is False
    with pytest.raises(NoGpu, match="RM has detected an NVML/RM version mismatch") as info:
        NvmlProbe()  # a transient failure was not cached: NVML was asked again
    assert info.value.details["permanent"] is False
    for _ in range(3):
        with pytest.raises(NoGpu, match="NVML Shared Library Not Found") as info:
            NvmlProbe()
        assert info.value.details["permanent"] is True
    assert len(calls) == 3  # after LibraryNotFound, nvmlInit is not called again


def test_a_library_mismatch_is_translated_too(fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def mismatched() -> None:
        raise pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")

    monkeypatch.setattr(pynvml, "nvmlInit", mismatched)
    probe, failure = open_vram_probe("nvml")
    assert isinstance(probe, PsutilProbe)
    assert failure is not None and failure.details["cause"].startswith("Unversioned function")
    assert failure.details["permanent"] is False


def test_nvml_snapshot_uses_memory_info_v2(fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    probe, degraded = open_vram_probe("nvml")
    assert isinstance(probe, NvmlProbe) and degraded is None
    snap = probe.snapshot()
    assert (snap.total_bytes, snap.used_bytes, snap.free_bytes) == (24 * GiB, GiB, 22 * GiB)
    assert (snap.source, snap.device_name, snap.gpu_present) == ("nvml", "NVIDIA Fake 24GB", True)
    assert snap.device_uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert fake.memory_calls == [pynvml.nvmlMemory_v2]
    probe.close()
    probe.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)
    with pytest.raises(NoGpu, match="closed"):
        probe.snapshot()


def test_nvml_snapshot_falls_back_to_v1_once_when_the_driver_lacks_v2(
    fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml(monkeypatch, has_v2=False)
    with NvmlProbe() as probe:
        first, second = probe.snapshot(), probe.snapshot()
    assert (first.used_bytes, first.free_bytes) == (2 * GiB, 22 * GiB) == (second.used_bytes, second.free_bytes)
    assert fake.memory_calls == [pynvml.nvmlMemory_v2, None, None]  # v2 is not retried
    assert fake.shutdowns == 1


def test_nvml_device_index_out_of_range_says_how_many_exist(
    fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml(monkeypatch, device_count=1)
    with pytest.raises(NoGpu, match=r"index 1 out of range: 1 device\(s\) present"):
        NvmlProbe(1)
    assert (fake.inits, fake.shutdowns) == (1, 1)  # the init was paired even though the probe never existed
    NvmlProbe(0).close()  # a bad index is not a "no NVML" verdict


def test_nvml_query_errors_become_no_gpu(fresh_nvml_verdict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    probe = NvmlProbe()
    fake.query_error = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(NoGpu, match="GPU is lost"):
        probe.snapshot()
    fake.query_error = pynvml.NVMLLibraryMismatchError("mismatch")
    with pytest.raises(NoGpu, match="mismatch"):
        probe.snapshot()
    probe.close()


# ---------------------------------------------------------------------------------------------- psutil


def test_psutil_snapshot_is_consistent_host_memory(tmp_path: Path) -> None:
    snap = PsutilProbe(cgroup_dir=tmp_path).snapshot()  # an empty directory: no cgroup limit
    host = psutil.virtual_memory()
    assert (snap.source, snap.gpu_present, snap.device_name) == ("psutil", False, vram.HOST_MEMORY_NAME)
    assert snap.total_bytes == host.total
    assert snap.used_bytes + snap.free_bytes == snap.total_bytes
    assert 0 < snap.free_bytes <= snap.total_bytes
    assert abs(snap.free_bytes - host.available) < 0.1 * host.total  # other processes move it a little


def test_default_psutil_probe_never_reports_more_than_the_host_has() -> None:
    snap = PsutilProbe().snapshot()
    assert 0 < snap.free_bytes <= snap.total_bytes <= psutil.virtual_memory().total


@pytest.mark.parametrize(
    ("limit_file", "usage_file"), [("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")]
)
def test_cgroup_limit_caps_total_and_free(tmp_path: Path, limit_file: str, usage_file: str) -> None:
    (tmp_path / limit_file).write_text(f"{GiB}\n")
    (tmp_path / usage_file).write_text(f"{256 * MiB}\n")
    snap = PsutilProbe(cgroup_dir=tmp_path).snapshot()
    assert snap.total_bytes == GiB
    assert snap.free_bytes == min(768 * MiB, psutil.virtual_memory().available)
    assert snap.used_bytes == snap.total_bytes - snap.free_bytes


def test_cgroup_without_a_limit_leaves_host_numbers(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text(f"{256 * MiB}\n")
    assert PsutilProbe(cgroup_dir=tmp_path).snapshot().total_bytes == psutil.virtual_memory().total


def test_find_cgroup_dirs_walks_from_this_process_cgroup_to_the_mount(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "user.slice" / "app.scope"
    leaf.mkdir(parents=True)
    for directory in (root, root / "user.slice", leaf):
        (directory / "memory.max").write_text("max\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/user.slice/app.scope\n")
    assert find_cgroup_dirs(root, self_cgroup) == (leaf, root / "user.slice", root)

    # cgroup v1 inside a container without its own namespace: /proc names a host path the mount does not have.
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    self_cgroup.write_text("12:cpu:/\n4:memory:/docker/0123abcd\n0::/\n")
    assert find_cgroup_dirs(root, self_cgroup) == (root / "memory", root)
    assert find_cgroup_dirs(root, tmp_path / "missing") == ()


# ---------------------------------------------------------------------------------------------- selection


def test_unknown_backend_is_an_invalid_request_naming_the_accepted_ones() -> None:
    with pytest.raises(InvalidRequest) as info:
        open_vram_probe("rocm")
    assert "'rocm'" in str(info.value) and "'nvml'" in str(info.value) and "'simulated'" in str(info.value)
    with pytest.raises(InvalidRequest, match="ledger_path"):
        open_vram_probe("simulated")


def test_simulated_probe_reads_the_shared_ledger(tmp_path: Path) -> None:
    gpu_ledger = pytest.importorskip("mai.sim.gpu_ledger")
    path = tmp_path / "gpu.sqlite"
    ledger = gpu_ledger.GpuLedger(path, total_bytes=1000 * MiB, device_name="Test GPU")
    ledger.allocate("clip", 300 * MiB)

    probe, degraded = open_vram_probe("simulated", ledger_path=str(path))
    assert isinstance(probe, SimulatedProbe) and degraded is None
    snap = probe.snapshot()
    assert (snap.total_bytes, snap.used_bytes, snap.free_bytes) == (1000 * MiB, 300 * MiB, 700 * MiB)
    assert (snap.source, snap.device_name, snap.gpu_present) == ("simulated", "Test GPU", True)

    ledger.free("clip")  # another process's change is visible on the next snapshot
    assert probe.snapshot().free_bytes == 1000 * MiB
    probe.close()
