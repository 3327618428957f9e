"""The soak of `bench/soak.py`, short: 45 s of random operations from three client processes with an actor killed,
the Ollama double answering 500 and the double killed and started again. Every Mai process must stay bounded in
memory after warm-up (a generous bound: this checks for a leak, not for a size), no operation may raise anything
but a typed MaiError, and after `mai stop` no process of Mai or of the double, and no socket Mai listened on, may
be left. The full ten minutes: `python -m bench.soak`."""

from __future__ import annotations

import pytest

from bench.soak import report_text, soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_a_short_soak_with_faults_stays_bounded_and_leaves_nothing_behind():
    report = soak(45, clients=3, seed=7, fault_every_s=8, warmup_s=15, bound_mb=64)
    print("\n" + report_text(report))
    assert {entry["fault"] for entry in report["faults"]} == {"kill_actor", "ollama_500", "kill_ollama"}
    killed = [entry for entry in report["faults"] if entry["fault"] == "kill_actor"]
    assert all(entry.get("restarted") for entry in killed), killed  # the supervisor brought it back
    assert not report["problems"], report["problems"]  # every client finished; mai stop answered in JSON
    assert not report["unexpected"], report["unexpected"]
    assert {row["role"] for row in report["rss"]} >= {"admin", "supervisor", "coordinator", "clip"}
    assert all(row["bounded"] for row in report["rss"]), report["rss"]
    assert report["leftovers"] == []
    assert sum(row["ok"] for row in report["operations"]) > 0
