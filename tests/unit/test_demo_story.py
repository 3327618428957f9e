"""`mai demo`'s pure parts: the record's VRAM series, stalls and narrative, the status bar, the script's timing,
its configuration, argument errors, and drawing a saved record again."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import load_config
from mai.cli import main
from mai.demo import script
from mai.demo_agent import Agent, status_line
from mai.demo_story import log_record, narrate, stalls, summarize, vram_steps
from mai.demo_world import DemoTiming, demo_config

GiB = 2**30
T0 = 1_800_000_000.0


def rec(source: str, type_: str, t_s: float, **fields) -> dict:
    return {"source": source, "type": type_, "t": T0 + t_s, "t_s": t_s, **fields}


def gpu(kind: str, t_s: float, owner: str, op: str, nbytes: int, used_after: int, seq: int) -> dict:
    return rec("gpu", kind, t_s, owner=owner, op=op, nbytes=nbytes, used_after=used_after, seq=seq)


RUN = [
    rec("demo", "DemoStarted", 0.0, gpu_total_bytes=8 * GiB, reserve_bytes=GiB // 2, vlm_model="qwen2.5vl:7b",
        timing={"grace_s": 4.8, "idle_timeout_s": 8.1}),
    rec("log", "mode.requested", 0.0, mode="autopilot"),
    gpu("begin", 0.01, "clip", "move_gpu", 0, 0, 1),
    gpu("alloc", 0.05, "clip", "allocate", GiB // 2, GiB // 2, 2),
    gpu("end", 0.06, "clip", "move_gpu", 0, GiB // 2, 3),
    rec("mai", "PlacementChanged", 0.06, component="clip", state="gpu", reason="mode"),
    rec("mai", "ModeChanged", 0.07, mode="autopilot", previous="idle", duration_s=0.07,
        steps=["read VRAM again", "move CLIP to gpu"]),
    rec("agent", "Call", 5.0, what="vlm_lease", t_end=T0 + 7.5, wait_s=2.5, ok=True),
    gpu("begin", 5.01, "ollama:qwen2.5vl:7b", "load", 0, GiB // 2, 4),
    gpu("alloc", 5.02, "ollama:qwen2.5vl:7b", "allocate", 6 * GiB, 6 * GiB + GiB // 2, 5),
    gpu("end", 7.4, "ollama:qwen2.5vl:7b", "load", 0, 6 * GiB + GiB // 2, 6),
    rec("mai", "PlacementChanged", 7.45, component="vlm", state="loaded", reason="demand"),
    gpu("free", 12.0, "ollama:qwen2.5vl:7b", "scheduled", 6 * GiB, 6 * GiB + GiB // 2, 7),
    gpu("free", 12.5, "ollama:qwen2.5vl:7b", "released", 6 * GiB, GiB // 2, 8),
    rec("mai", "PlacementChanged", 12.5, component="vlm", state="unloaded", reason="grace_ended"),
    rec("agent", "Call", 14.0, what="embed", t_end=T0 + 15.0, wait_s=None, ok=True),
    rec("agent", "Call", 16.0, what="set_mode idle", t_end=T0 + 16.1, wait_s=0.1, ok=True),
    rec("log", "chat.grantable", 18.0, grantable_bytes=7 * GiB),
    rec("log", "chat.choose", 18.0, model="qwen2.5-7b-instruct", reason="best usable model (tier 3)"),
    rec("mai", "ModelSwitched", 19.0, previous=None, model="qwen2.5-7b-instruct", reason="chosen"),
    rec("log", "chat.unloaded", 24.0, model="qwen2.5-7b-instruct",
        reason="yield: yield chat qwen2.5-7b-instruct for load qwen2.5vl:7b (mode recording)"),
    rec("mai", "IdleUnloaded", 59.0, model="qwen2.5vl:7b", idle_s=8.4),
    rec("agent", "Call", 60.0, what="chat_turn", t_end=T0 + 90.0, wait_s=30.0, ok=False, error="timeout"),
    rec("demo", "DemoEnded", 61.0, killed=[], leftovers=[], pids=[1, 2]),
]


def test_vram_per_owner_follows_the_ledger_and_a_delayed_free_counts_until_released():
    times, series = vram_steps(RUN)
    assert times == [0.05, 5.02, 12.5]
    assert series == {"clip": [GiB // 2] * 3, "ollama:qwen2.5vl:7b": [0, 6 * GiB, 0]}


def test_a_stall_is_a_wait_on_mai_of_half_a_second_or_more_and_says_what_ran_meanwhile():
    found = stalls(RUN)
    assert [(s["what"], s["waited_s"]) for s in found] == [("vlm_lease", 2.5), ("chat_turn", 30.0)]
    assert found[0]["why"] == "load VLM qwen2.5vl:7b (Ollama)"
    assert found[1]["why"] == "waiting for its turn at the GPU gate" and found[1]["ok"] is False


def test_the_narrative_says_what_mai_did_and_why_without_repeating_itself():
    lines = narrate(RUN)
    assert lines == [
        "  0.1s  AUTOPILOT reached in 0.1 s: move CLIP to gpu",
        "  7.5s  the agent asked for a VLM lease in AUTOPILOT: Mai loaded the VLM on demand (the agent waited 2.5 s)",
        " 12.5s  the VLM unloaded: AUTOPILOT keeps an on-demand VLM only 4.8 s after its last lease",
        " 19.0s  chat turn: the GPU gate could grant 7.0 GB, so Mai chose qwen2.5-7b-instruct (best usable model (tier 3))",
        " 24.0s  the chat model qwen2.5-7b-instruct gave its VRAM back for load qwen2.5vl:7b (mode recording)",
        " 59.0s  the idle timer unloaded qwen2.5vl:7b: no lease for 8.4 s (idle_timeout_s 8.1)",
        " 60.0s  the agent's chat_turn failed: timeout",
    ]


def test_the_summary_counts_what_the_record_holds(tmp_path):
    summary = summarize(RUN, events_path=tmp_path / "events.jsonl", png_path=None)
    assert summary["records"] == len(RUN) and summary["timeline_png"] is None
    assert summary["event_counts"]["gpu"] == {"alloc": 2, "begin": 2, "end": 2, "free": 2}
    assert summary["peak_vram_bytes"] == 6 * GiB + GiB // 2
    assert summary["over_commits"] == 0 and summary["overlapping_operations"] == 0
    assert summary["pids"] == [1, 2] and summary["duration_s"] == 61.0


def test_mai_log_lines_become_records_only_when_they_are_decisions():
    decision = {"ts": T0, "level": "warning", "logger": "x", "actor": "A", "event": "chat.unloaded", "model": "m",
                "reason": "yield: ..."}
    assert log_record(decision) == {"type": "chat.unloaded", "t": T0, "model": "m", "reason": "yield: ...",
                                    "level": "warning"}
    assert log_record({"ts": T0, "level": "info", "event": "actor.init", "role": "clip"}) is None


def test_the_status_bar_gives_each_owner_its_share_and_shows_the_reserve():
    usage = {"clip": GiB // 2, "ollama:qwen2.5vl:7b": 6 * GiB, "lmstudio:mai:qwen2.5-3b-instruct": GiB}
    line = status_line("autopilot", "recording", usage, 8 * GiB, GiB // 2, "load qwen2.5vl:7b", "qwen2.5vl:7b",
                       width=16)
    assert line == "autopilot->recording [VVVVVVVVVVVVCLL:]  7.5/8.0 GB  now: load qwen2.5vl:7b"
    assert status_line("idle", "idle", {}, 8 * GiB, GiB, None, "qwen2.5vl:7b", width=8) == \
        f"{'idle':<20} [.......:]  0.0/8.0 GB"


@pytest.mark.parametrize("duration_s", [10.0, 15.0, 60.0, 600.0])
def test_the_script_tells_the_same_story_at_any_duration(duration_s):
    timing = DemoTiming.for_duration(duration_s)
    beats = script(timing)
    assert all(callable(getattr(Agent, b.action)) for b in beats)
    assert [b.at_fraction for b in beats] == sorted(b.at_fraction for b in beats)
    recording = [b.at_fraction * duration_s for b in beats if b.phase in ("recording", "chat")
                 and b.action == "describe_screen"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(recording)]
    assert max(gaps) < timing.idle_timeout_s  # the VLM is not idle-unloaded while the agent records
    assert beats[-1].action == "wait_until_vlm_unloaded" and beats[-2].action == "describe_screen"
    assert timing.grace_s < timing.idle_timeout_s


def test_a_one_minute_run_shows_real_waits():
    timing = DemoTiming.for_duration(60.0)
    assert 1.5 <= timing.vlm_load_s <= 3.0 and timing.chat_load_s < timing.vlm_load_s


def test_the_demo_configuration_is_valid_and_private(tmp_path):
    cfg_dict = demo_config(tmp_path / "state", tmp_path / "gpu.sqlite", 23456, "http://127.0.0.1:1", "127.0.0.1:2",
                           8192, DemoTiming.for_duration(60.0))
    path = tmp_path / "mai.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path, env={})
    assert cfg.system.admin_port == 23456 and str(cfg.system.state_dir).startswith(str(tmp_path))
    assert cfg.gpu.backend == "simulated" and cfg.clip.backend == "simulated"
    assert cfg.modes.table["autopilot"].vlm_grace_s == 4.8 and cfg.clip.footprint_mb == 600


@pytest.mark.parametrize("argv, message", [
    (["demo", "--duration-s", "5"], "--duration-s: got 5; accepted: 10 to 600 seconds"),
    (["demo", "--gpu-mb", "100"], "--gpu-mb: got 100; accepted: 2048 to 262144 MiB"),
])
def test_bad_arguments_are_refused_before_anything_starts(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output directory was made


def test_help_says_what_it_does_what_it_writes_and_how_long_it_takes(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "timeline.png" in text and "events.jsonl" in text and "takes about" in text and "Ctrl-C" in text


def test_a_saved_record_can_be_drawn_again(tmp_path):
    from mai.demo_plot import plot_timeline

    png = plot_timeline(RUN, tmp_path / "timeline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_commands_do_not_import_what_the_demo_needs():
    probe = ("import sys; from mai.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('matplotlib', 'numpy', 'thespian', 'yaml', 'psutil') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
