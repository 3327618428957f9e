"""NVML's per-process figures (issue 11, item 6's last sentence): the probe reads them where NVML reports them and says
why not where it does not (WDDM's None, WSL2's NotSupported: real-servers.md N2); `mai.core.attribution` tells
Mai's models apart from other programs; a footprint is what the loading part's own processes grew by, so another
program's allocation during the load does not pollute it; status shows who holds the GPU."""

from __future__ import annotations

import os

import psutil
import pynvml
import pytest

from backends import vram
from backends.vram import NvmlProbe
from mai.cli import processes_text, status_text
from mai.core.attribution import Owner, growth, owner_of, split_use
from mai.core.footprints import judge_delta
from mai.sim.gpu_ledger import GpuLedger
from mai.sim.nvml import SimGpu, SimProcess, SimulatedNvml
from messages.errors import InvalidRequest
from messages.requests import EnsureVlm
from messages.resources import GpuProcess, VramSnapshot
from tests.unit.test_coordinator import GIB, MIB, MODEL, settings, world

UUID = "GPU-0a1b2c3d-0000-4000-8000-000000000001"
TOTAL = 24 * GIB


@pytest.fixture(autouse=True)
def fresh_nvml_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vram, "_nvml_library_missing", None)


def row(pid: int, name: str, nbytes: int, parent: str = "") -> GpuProcess:
    return GpuProcess(pid, name, nbytes, parent)


def reading(free: int, rows: tuple[GpuProcess, ...] | None, at: float = 0.0) -> VramSnapshot:
    return VramSnapshot(TOTAL, TOTAL - free, free, "nvml", "gpu", at, processes=rows or (),
                        per_process=rows is not None)


# --- attribution ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process, owner", [
    (row(7, "python3", 1), Owner.CLIP),  # CLIP's own pid, whatever its name
    (row(8, "llama-server", 1, parent="ollama"), Owner.OLLAMA),  # fb30760's runner
    (row(8, "ollama", 1, parent="ollama"), Owner.OLLAMA),  # `ollama runner`
    (row(8, "ollama_llama_server.exe", 1, parent="ollama.exe"), Owner.OLLAMA),  # older runners, on Windows
    (row(8, "LM Studio Helper", 1), Owner.LMSTUDIO),
    (row(8, "node", 1, parent="lm-studio"), Owner.LMSTUDIO),
    (row(8, "llmster", 1), Owner.LMSTUDIO),
    (row(8, "llama-server", 1, parent="bash"), Owner.OTHER),  # a user's own llama.cpp server is not Mai's
    (row(8, "python3", 1), Owner.OTHER),  # another python process
    (row(8, "", 1), Owner.OTHER),  # psutil could not name it
])
def test_each_process_is_attributed_by_pid_or_name(process: GpuProcess, owner: Owner) -> None:
    assert owner_of(process, clip_pid=7) is owner


def test_other_programs_are_summed_by_name_largest_first() -> None:
    rows = [row(1, "firefox", 500 * MIB), row(2, "firefox", 300 * MIB), row(3, "Xorg", 400 * MIB),
            row(4, "llama-server", 5 * GIB, "ollama"), row(5, "python3", 600 * MIB), row(6, "", 10 * MIB)]
    use = split_use(rows, clip_pid=5)
    assert use.mai == ((Owner.OLLAMA, 5 * GIB), (Owner.CLIP, 600 * MIB))
    assert use.others == (("firefox", 800 * MIB), ("Xorg", 400 * MIB), ("pid 6", 10 * MIB))
    assert use.other_bytes == 1210 * MIB


def test_growth_counts_the_runner_that_appeared_or_grew_not_the_one_evicted() -> None:
    before = [row(10, "llama-server", 3 * GIB, "ollama"), row(11, "llama-server", GIB, "ollama")]
    after = [row(11, "llama-server", GIB + 100 * MIB, "ollama"), row(12, "llama-server", 5 * GIB, "ollama"),
             row(20, "game", 8 * GIB)]
    assert growth(before, after, Owner.OLLAMA, clip_pid=0) == 5 * GIB + 100 * MIB  # pid 10 was evicted: not counted
    assert growth(before, after, Owner.CLIP, clip_pid=0) is None  # no CLIP process: nothing to tell apart


# --- the footprint rule with per-process rows ----------------------------------------------------------------------


def test_another_program_allocating_during_the_load_does_not_pollute_a_per_process_footprint() -> None:
    before = reading(20 * GIB, (row(30, "firefox", GIB),))
    after = reading(7 * GIB, (row(30, "firefox", GIB), row(40, "game", 8 * GIB),
                              row(41, "llama-server", 5 * GIB, "ollama")), at=1.0)
    verdict = judge_delta(before, after, 6 * GIB, Owner.OLLAMA)
    assert (verdict.nbytes, verdict.reason) == (5 * GIB, "process_delta")
    # The same readings without per-process figures (WDDM, WSL2): 13 GiB device-wide, rejected as polluted.
    blind = judge_delta(reading(20 * GIB, None), reading(7 * GIB, None, at=1.0), 6 * GIB, Owner.OLLAMA)
    assert blind.nbytes is None and "another program allocated" in blind.reason


def test_without_the_parts_own_rows_the_device_wide_rule_applies() -> None:
    # A container: NVML's host PIDs name nothing here, so the runner is not recognised (N2).
    before, after = reading(20 * GIB, ()), reading(15 * GIB, (row(99123, "", 5 * GIB),), at=1.0)
    verdict = judge_delta(before, after, 6 * GIB, Owner.OLLAMA)
    assert (verdict.nbytes, verdict.reason) == (5 * GIB, "vram_delta")
    # CLIP's pid never came (0): the device-wide change, too.
    assert judge_delta(before, after, 6 * GIB, Owner.CLIP, clip_pid=0).reason == "vram_delta"


def test_an_implausible_per_process_growth_is_still_rejected() -> None:
    before = reading(20 * GIB, ())
    after = reading(4 * GIB, (row(41, "llama-server", 16 * GIB, "ollama"),), at=1.0)  # another client's model too
    verdict = judge_delta(before, after, 6 * GIB, Owner.OLLAMA)
    assert verdict.nbytes is None and "more than 2x" in verdict.reason


def test_the_coordinator_learns_the_runners_growth_while_a_game_starts() -> None:
    w = world(settings(), gpu_total_bytes=24 * GIB, vlm_true_bytes=5 * GIB, per_process=True)
    w.send(EnsureVlm("e1", True))
    w.advance(1.0)
    w.set_external_bytes(8 * GIB)  # the game that spoils the device-wide change (test_footprints rejects it)
    w.advance(10)
    assert w.vlm.state == "loaded" and w.persisted == {f"{MODEL}@8192": 5 * GIB}
    (measured,) = w.logs_of("footprint.measured")
    assert measured["reason"] == "process_delta"
    use = w.core.status("s", w.now).gpu_use
    assert use is not None and use.mai == (("ollama", 5 * GIB),) and use.others == (("firefox", 8 * GIB),)


# --- the probe -----------------------------------------------------------------------------------------------------


def sim_with(monkeypatch: pytest.MonkeyPatch, **kw) -> SimulatedNvml:
    gpu = SimGpu("NVIDIA Sim 24GB", UUID, TOTAL, 0, processes=[
        SimProcess(os.getpid(), "python3", 600 * MIB),
        SimProcess(50_001, "llama-server", 5 * GIB, parent_name="ollama"),
        SimProcess(50_002, "Xorg", 400 * MIB, graphics=True),
        SimProcess(50_003, "firefox", 800 * MIB, graphics=True),
        SimProcess(50_004, "game", 2 * GIB),
    ])
    gpu.used_bytes = sum(p.used_bytes for p in gpu.processes)
    return SimulatedNvml([gpu], **kw).install(monkeypatch)


def test_the_probe_reads_compute_and_graphics_processes_named_through_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sim_with(monkeypatch, clip_pid=os.getpid(), hidden_pids={50_004})
    sim.gpus[0].processes.append(SimProcess(os.getpid(), "python3", 600 * MIB, graphics=True))  # C+G: one context
    with NvmlProbe(UUID) as probe:
        snap = probe.snapshot()
    assert snap.per_process and snap.per_process_note == ""
    by_pid = {r.pid: r for r in snap.processes}
    assert by_pid[os.getpid()].used_bytes == 600 * MIB and by_pid[os.getpid()].name == psutil.Process().name()
    assert (by_pid[50_001].name, by_pid[50_001].parent_name) == ("llama-server", "ollama")
    assert by_pid[50_004].name == ""  # AccessDenied: name unknown, bytes kept
    use = split_use(snap.processes, os.getpid())
    assert dict(use.mai) == {Owner.CLIP: 600 * MIB, Owner.OLLAMA: 5 * GIB}
    assert use.others == (("pid 50004", 2 * GIB), ("firefox", 800 * MIB), ("Xorg", 400 * MIB))


@pytest.mark.parametrize("mode, why", [
    ("wddm", "usedGpuMemory is None"),
    ("not_supported", "Not Supported"),
])
def test_wddm_and_wsl2_leave_the_device_wide_reading_and_say_why(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                                 why: str) -> None:
    sim_with(monkeypatch, process_memory=mode)
    with NvmlProbe(0) as probe:
        snap = probe.snapshot()
    assert not snap.per_process and snap.processes == () and why in snap.per_process_note
    assert snap.used_bytes == 600 * MIB + 5 * GIB + 400 * MIB + 800 * MIB + 2 * GIB  # the reading itself stands


def test_a_driver_without_the_v3_queries_is_read_with_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    sim_with(monkeypatch, process_memory="no_v3")
    calls: list[str] = []
    real_v2 = pynvml.nvmlDeviceGetComputeRunningProcesses_v2
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2", lambda h: calls.append("v2") or real_v2(h))
    with NvmlProbe(0) as probe:
        first, second = probe.snapshot(), probe.snapshot()
    assert first.per_process and len(first.processes) == 5 and second.processes == first.processes
    assert calls == ["v2", "v2"]


def test_the_simulated_nvml_follows_the_ledgers_owners(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ledger = GpuLedger(tmp_path / "gpu.db", total_bytes=TOTAL)
    sim = SimulatedNvml([SimGpu("NVIDIA Sim 24GB", UUID, TOTAL, 0)], ledger=ledger, clip_pid=os.getpid())
    sim.install(monkeypatch)
    ledger.allocate("clip", 600 * MIB)
    ledger.allocate("ollama:qwen2.5vl:7b", 5 * GIB)
    ledger.allocate("lmstudio:qwen3-8b", 4 * GIB)
    ledger.allocate("other:firefox", 800 * MIB)
    with NvmlProbe(0) as probe:
        snap = probe.snapshot()
    assert snap.used_bytes == 600 * MIB + 9 * GIB + 800 * MIB
    use = split_use(snap.processes, os.getpid())
    assert dict(use.mai) == {Owner.CLIP: 600 * MIB, Owner.OLLAMA: 5 * GIB, Owner.LMSTUDIO: 4 * GIB}
    assert use.others == (("firefox", 800 * MIB),)


def test_a_snapshot_refuses_rows_it_does_not_vouch_for() -> None:
    with pytest.raises(InvalidRequest, match="unless per_process"):
        VramSnapshot(TOTAL, 0, TOTAL, "nvml", "gpu", 0.0, processes=(row(1, "x", 1),))
    with pytest.raises(InvalidRequest, match="distinct pids"):
        VramSnapshot(TOTAL, 0, TOTAL, "nvml", "gpu", 0.0, processes=(row(1, "x", 1), row(1, "y", 2)),
                     per_process=True)
    with pytest.raises(InvalidRequest, match="GpuProcess.used_bytes"):
        GpuProcess(1, "x", -1)


# --- status -----------------------------------------------------------------------------------------------------------


def test_status_names_mais_models_and_the_other_programs() -> None:
    w = world(settings(), gpu_total_bytes=24 * GIB, per_process=True, clip_device="gpu")
    w.set_external_bytes(1_200_000_000)
    status = w.core.status("s", w.now)
    data = {"version": "x", "address": "a", "uptime_s": 1, "config": {}, "actors": [], "gpu": status.to_dict()}
    text = status_text(data)
    assert "processes  mai 0.6 GB (clip 0.6 GB); other programs: 1.2 GB (firefox 1.2 GB)" in text


def test_status_says_when_per_process_figures_are_missing() -> None:
    vram = reading(20 * GIB, None).__dict__ | {"per_process_note": "NVML cannot list the GPU's processes here "
                                                                  "(Not Supported; WSL2 answers NotSupported)"}
    assert processes_text(None, vram, "NVML").startswith("no per-process figures (NVML cannot list")
    assert "the simulated GPU ledger does not report them" in processes_text(None, {"per_process_note": ""},
                                                                              "the simulated GPU ledger")
