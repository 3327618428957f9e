"""`mai demo` end to end, run the way a newcomer runs it (`python -m mai demo`): it must tell the whole story (mode
changes, an on-demand VLM load and its unload, CLIP moves, a chat model chosen and made to yield, an idle unload),
write a real PNG and an event log that its JSON summary agrees with, and leave no process behind, also when
interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.system.harness import ROOT
from tests.system.harness import test_env as child_env

pytestmark = pytest.mark.slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _demo(out: Path, *args: str) -> subprocess.Popen[str]:
    # Its own process group, like a command started from a shell: a Ctrl-C reaches the demo, not this test.
    return subprocess.Popen([sys.executable, "-m", "mai", "demo", "--out", str(out), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
                            start_new_session=True)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _index(records: list[dict], start: int = 0, **match: object) -> int:
    """Position of the first record from `start` whose fields equal `match`."""
    for i in range(start, len(records)):
        if all(records[i].get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no record {match} after position {start}")


def _left_behind(summary: dict) -> list[str]:
    """Processes of that run still alive: one it started, or one whose command line names its private directory."""
    alive = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if summary["state_dir"] in cmdline or (proc.info["pid"] in summary["pids"] and "mai" in cmdline):
            alive.append(f"{proc.info['pid']}: {cmdline}")
    return alive


def test_a_short_demo_tells_the_story_writes_its_files_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    demo = _demo(out, "--duration-s", "10")
    stdout, stderr = demo.communicate(timeout=110)
    assert demo.returncode == 0, stderr[-4000:]
    summary = json.loads(stdout)

    png = out / "timeline.png"
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert data[:8] == PNG_SIGNATURE and width >= 1000 and height >= 600 and len(data) > 40_000
    assert summary["timeline_png"] == str(png) and summary["events_jsonl"] == str(out / "events.jsonl")

    records = _records(out)
    assert summary["records"] == len(records)
    counted: dict[str, Counter] = {}
    for r in records:
        counted.setdefault(r["source"], Counter())[r["type"]] += 1
    assert summary["event_counts"] == {source: dict(c) for source, c in counted.items()}
    gpu = [r for r in records if r["source"] == "gpu"]
    assert summary["peak_vram_bytes"] == max(r["used_after"] for r in gpu) <= summary["gpu_total_bytes"]
    assert summary["over_commits"] == 0 and summary["overlapping_operations"] == 0
    waits = [r for r in records if r["source"] == "agent" and r["type"] == "Call" and (r["wait_s"] or 0) >= 0.5
             and r["what"].split()[0] in ("set_mode", "vlm_lease", "chat_turn")]
    assert [(s["what"], s["waited_s"]) for s in summary["stalls"]] == [(r["what"], r["wait_s"]) for r in waits]
    load_s = records[0]["timing"]["vlm_load_s"]
    on_demand = next(r for r in records if r["source"] == "agent" and r.get("what") == "vlm_lease")
    assert on_demand["wait_s"] >= load_s  # the agent's first VLM call waited for the load Mai made for it

    # The story, in order, from Mai's published events and the simulated GPU's record: whichever chat models Mai
    # picks, the first must give its VRAM back for the VLM in RECORDING, and the second turn gets another model.
    autopilot = _index(records, source="mai", type="ModeChanged", mode="autopilot")
    clip_on_gpu = _index(records, source="mai", type="PlacementChanged", component="clip", state="gpu")
    vlm_on_demand = _index(records, autopilot, source="mai", type="PlacementChanged", component="vlm", state="loaded",
                           reason="demand")
    vlm_unloaded = _index(records, vlm_on_demand, source="mai", type="PlacementChanged", component="vlm",
                          state="unloaded")
    first_chat = _index(records, vlm_unloaded, source="mai", type="ModelSwitched")
    first_model = records[first_chat]["model"]
    chat_yields = next(i for i in range(first_chat, len(records)) if records[i]["source"] == "gpu"
                       and records[i]["type"] == "free" and records[i]["owner"].endswith(first_model))
    clip_off = _index(records, first_chat, source="mai", type="PlacementChanged", component="clip", state="cpu")
    vlm_load_for_recording = _index(records, chat_yields, source="gpu", type="begin", op="load",
                                    owner="ollama:qwen2.5vl:7b")
    recording = _index(records, vlm_load_for_recording, source="mai", type="ModeChanged", mode="recording")
    second_chat = _index(records, recording, source="mai", type="ModelSwitched")
    idle = _index(records, second_chat, source="mai", type="ModeChanged", mode="idle")
    idle_unload = _index(records, idle, source="mai", type="IdleUnloaded")
    assert clip_on_gpu <= autopilot < vlm_on_demand < vlm_unloaded < first_chat < chat_yields \
        < vlm_load_for_recording < recording < second_chat < idle < idle_unload
    assert clip_off < vlm_load_for_recording  # RECORDING: CLIP leaves the GPU before the VLM load starts
    assert records[second_chat]["model"] != first_model
    assert summary["leftover_processes"] == [] and _left_behind(summary) == []
    assert not Path(summary["state_dir"]).exists()
    assert "What Mai did, and why" in stderr and "the idle timer unloaded qwen2.5vl:7b" in stderr


def test_ctrl_c_stops_everything_and_still_writes_the_record(tmp_path):
    out = tmp_path / "out"
    demo = _demo(out, "--duration-s", "60", "--no-plot")
    try:
        for line in demo.stderr:  # the script is playing once the first beat is announced
            if ">> " in line:
                break
        os.killpg(demo.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, stderr[-4000:]
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["timeline_png"] is None
    assert summary["leftover_processes"] == [] and _left_behind(summary) == []
    records = _records(out)
    assert records[0]["type"] == "DemoStarted" and records[-1]["type"] == "DemoEnded"
    assert records[-1]["interrupted"] is True
