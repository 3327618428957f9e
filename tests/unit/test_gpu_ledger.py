"""The simulated GPU ledger: accounting, OOM, delayed frees, multi-process consistency and the invariant helpers."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from mai.sim.gpu_ledger import GpuLedger, LedgerEvent, over_commits, overlapping_operations, peak_used
from messages.errors import InvalidRequest, OutOfMemory

MiB = 1024 * 1024


@pytest.fixture
def ledger(tmp_path) -> GpuLedger:
    return GpuLedger(tmp_path / "gpu.sqlite", total_bytes=1000 * MiB, device_name="Test GPU")


def test_allocate_and_free_update_usage_and_snapshot(ledger: GpuLedger) -> None:
    assert ledger.allocate("clip", 300 * MiB) == 300 * MiB
    assert ledger.allocate("ollama:qwen2.5vl:7b", 500 * MiB) == 500 * MiB
    assert ledger.allocate("clip", 100 * MiB) == 100 * MiB
    assert ledger.usage() == {"clip": 400 * MiB, "ollama:qwen2.5vl:7b": 500 * MiB}

    snap = ledger.snapshot()
    assert (snap.total_bytes, snap.used_bytes, snap.free_bytes) == (1000 * MiB, 900 * MiB, 100 * MiB)
    assert snap.source == "simulated" and snap.gpu_present and snap.device_name == "Test GPU"

    assert ledger.free("clip") == 400 * MiB
    assert ledger.free("clip") == 0  # idempotent
    assert ledger.usage() == {"ollama:qwen2.5vl:7b": 500 * MiB}
    assert [e.kind for e in ledger.events()] == ["alloc", "alloc", "alloc", "free"]
    assert ledger.events()[-1].used_after == 500 * MiB


def test_oom_is_raised_and_recorded(ledger: GpuLedger) -> None:
    ledger.allocate("clip", 800 * MiB)
    with pytest.raises(OutOfMemory) as info:
        ledger.allocate("ollama:big", 300 * MiB)
    assert info.value.details == {"needed_bytes": 300 * MiB, "free_bytes": 200 * MiB, "owner": "ollama:big"}
    last = ledger.events()[-1]
    assert (last.kind, last.owner, last.nbytes, last.used_after) == ("oom", "ollama:big", 300 * MiB, 800 * MiB)
    assert ledger.usage() == {"clip": 800 * MiB}


def test_partial_allocation_takes_what_is_free(ledger: GpuLedger) -> None:
    ledger.allocate("clip", 700 * MiB)
    assert ledger.allocate("ollama:big", 600 * MiB, allow_partial=True) == 300 * MiB
    assert ledger.allocate("other", 10 * MiB, allow_partial=True) == 0
    assert ledger.snapshot().free_bytes == 0


def test_delayed_free_counts_until_due(ledger: GpuLedger) -> None:
    ledger.allocate("ollama:m", 600 * MiB)
    assert ledger.free("ollama:m", delay_s=0.3) == 600 * MiB
    assert ledger.usage() == {"ollama:m": 600 * MiB}
    with pytest.raises(OutOfMemory):
        ledger.allocate("clip", 500 * MiB)
    time.sleep(0.35)
    assert ledger.usage() == {}
    assert ledger.allocate("clip", 500 * MiB) == 500 * MiB
    frees = [(e.op, e.nbytes, e.used_after) for e in ledger.events() if e.kind == "free"]
    assert frees == [("scheduled", 600 * MiB, 600 * MiB), ("released", 600 * MiB, 0)]


def test_existing_ledger_keeps_size_unless_reset(tmp_path) -> None:
    path = tmp_path / "gpu.sqlite"
    with pytest.raises(InvalidRequest):
        GpuLedger(path)
    GpuLedger(path, total_bytes=100).allocate("a", 60)
    reopened = GpuLedger(path, total_bytes=999)
    assert reopened.total_bytes == 100 and reopened.usage() == {"a": 60}
    reopened.reset(total_bytes=500)
    assert reopened.total_bytes == 500 and reopened.usage() == {} and reopened.events() == []
    assert GpuLedger(path, total_bytes=50, reset=True).total_bytes == 50


def _worker(path: str, owner: str, rounds: int) -> None:
    ledger = GpuLedger(path)
    for i in range(rounds):
        try:
            ledger.allocate(owner, 30 * MiB)
        except OutOfMemory:
            pass
        ledger.begin(owner, "load")
        ledger.end(owner, "load")
        if i % 3 == 2:
            ledger.free(owner)


def test_concurrent_processes_keep_totals_consistent(ledger: GpuLedger) -> None:
    owners = [f"proc{i}" for i in range(4)]
    ctx = multiprocessing.get_context("spawn")  # like the real doubles: separate interpreters
    procs = [ctx.Process(target=_worker, args=(str(ledger.path), owner, 40)) for owner in owners]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    events = ledger.events()
    assert len(events) == 4 * (40 * 3 + 40 // 3)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert all(a.t <= b.t for a, b in zip(events, events[1:]))
    assert over_commits(events, ledger.total_bytes) == []
    # Replaying the log reproduces every recorded used_after and the final usage.
    held: dict[str, int] = {}
    for e in events:
        if e.kind == "alloc":
            held[e.owner] = held.get(e.owner, 0) + e.nbytes
        elif e.kind == "free":
            held.pop(e.owner, None)
        assert sum(held.values()) == e.used_after, e
    assert {o: n for o, n in held.items() if n} == ledger.usage()
    assert ledger.snapshot().used_bytes == sum(ledger.usage().values())


def _ev(seq: int, kind: str, owner: str, op: str = "load", used: int = 0) -> LedgerEvent:
    return LedgerEvent(seq=seq, t=float(seq), kind=kind, owner=owner, op=op, nbytes=0, used_after=used)


def test_helpers_detect_overlaps_and_over_commit() -> None:
    events = [
        _ev(1, "begin", "clip", "move_gpu"),
        _ev(2, "alloc", "clip", "allocate", used=400),
        _ev(3, "end", "clip", "move_gpu", used=400),
        _ev(4, "begin", "ollama:a", "load", used=400),
        _ev(5, "begin", "clip", "move_cpu", used=400),  # overlaps ollama:a's load
        _ev(6, "alloc", "ollama:a", "allocate", used=1200),
        _ev(7, "end", "ollama:a", "load", used=1200),
        _ev(8, "end", "clip", "move_cpu", used=1200),
        _ev(9, "begin", "ollama:a", "unload", used=1200),  # same owner nested: not an overlap
        _ev(10, "begin", "ollama:a", "load", used=1200),
        _ev(11, "end", "ollama:a", "unload", used=1200),
        _ev(12, "end", "ollama:a", "load", used=1200),
        _ev(13, "begin", "lmstudio:x", "load", used=1200),  # never ended: open until the end of the log
        _ev(14, "begin", "clip", "move_gpu", used=1200),
    ]
    assert peak_used(events) == 1200
    assert peak_used([]) == 0
    assert [e.seq for e in over_commits(events, 1000)] == [6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert over_commits(events, 1200) == []
    assert [(a.seq, b.seq) for a, b in overlapping_operations(events)] == [(4, 5), (13, 14)]
