"""`mai events` without --json: each event as one line a person reads at a glance."""

from __future__ import annotations

import pytest

from mai.cli import _event_text
from messages.events import (
    Degraded,
    IdleUnloaded,
    ModeChanged,
    ModelSwitched,
    PlacementChanged,
    PlanRefused,
    Recovered,
    ResourceChanged,
)
from messages.resources import VramSnapshot

MIB = 2**20


@pytest.mark.parametrize("event, text", [
    (ModeChanged("recording", "autopilot", 0.516345, ("move CLIP to cpu", "load qwen2.5vl:7b"), at=0.0),
     "ModeChanged: autopilot -> recording in 0.52 s: move CLIP to cpu; load qwen2.5vl:7b"),
    (ModeChanged("idle", "autopilot", 0.0, (), at=0.0), "ModeChanged: autopilot -> idle in 0.00 s"),
    (PlacementChanged("vlm", "unloaded", "grace_ended", at=0.0), "PlacementChanged: vlm unloaded (reason: grace_ended)"),
    (IdleUnloaded("qwen2.5vl:7b", 300.4, at=0.0), "IdleUnloaded: qwen2.5vl:7b unloaded after 300 s without a request"),
    (Degraded("vlm", "Ollama at http://127.0.0.1:11434 is unreachable", at=0.0),
     "Degraded: vlm: Ollama at http://127.0.0.1:11434 is unreachable"),
    (Recovered("vlm", at=0.0), "Recovered: vlm works again"),
    (PlanRefused("load qwen2.5vl:7b", "insufficient_vram", 6144 * MIB, 2048 * MIB, at=0.0),
     "PlanRefused: load qwen2.5vl:7b: insufficient_vram (needs 6,144 MiB, 2,048 MiB free)"),
    (ModelSwitched(None, "qwen2.5-3b-instruct", "best usable model", at=0.0),
     "ModelSwitched: - -> qwen2.5-3b-instruct (best usable model)"),
    (ResourceChanged(VramSnapshot(12288 * MIB, 6144 * MIB, 6144 * MIB, "nvml", "RTX", 0.0), 6144 * MIB, at=0.0),
     "ResourceChanged: used 6,144 MiB of 12,288 MiB (+6,144 MiB)"),
])
def test_each_event_reads_as_what_changed_and_why(event, text):
    line = _event_text(event)
    assert line[9:] == text  # after the local "HH:MM:SS "
