"""What a `mai demo` run did, told from its record (`events.jsonl`): pure functions, no I/O, no clock.

A record is a dict with `source` ("demo", "mai", "gpu", "agent", "log"), `type`, `t` (Unix time) and `t_s`
(seconds since the script began), plus the fields of what it records. The plot (`mai.demo_plot`) and the summary
are both drawn from the same list, so the PNG, the narrative and the JSON summary always agree with the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

STALL_MIN_S = 0.5  # an agent call that waited on Mai at least this long is a stall worth marking
WAITING_CALLS = ("set_mode", "vlm_lease", "chat_turn")
# Mai's log events worth keeping in the record: its decisions, not its plumbing.
LOG_PREFIXES = ("mode.", "plan.", "step.failed", "request.failed", "vlm.", "clip.moved", "clip.pinned", "clip.move_failed",
                "clip.unavailable", "chat.", "vram.", "lease.", "part.", "child.")
LOG_DROP_FIELDS = ("ts", "level", "logger", "actor", "event", "timestamp")


# --- owners of the simulated GPU ---------------------------------------------------------------------------------------
def owner_kind(owner: str, vlm_model: str) -> str:
    """'vlm', 'clip', 'chat' or 'other' for a ledger owner ("ollama:<model>", "clip", "lmstudio:<id>")."""
    if owner == "clip":
        return "clip"
    if owner.startswith("ollama:"):
        return "vlm" if owner.split(":", 1)[1] == vlm_model else "chat"
    if owner.startswith("lmstudio:"):
        return "chat"
    return "other"


def owner_letter(owner: str, vlm_model: str) -> str:
    """The status bar's letter: V the VLM, C CLIP, L a chat model on LM Studio, O one on Ollama, ? anything else."""
    kind = owner_kind(owner, vlm_model)
    if kind == "chat":
        return "L" if owner.startswith("lmstudio:") else "O"
    return {"vlm": "V", "clip": "C"}.get(kind, "?")


def owner_label(owner: str, vlm_model: str) -> str:
    kind = owner_kind(owner, vlm_model)
    name = owner.split(":", 1)[1] if ":" in owner else owner
    name = name.removeprefix("mai:")  # the LM Studio identifier Mai gives a model it loads
    if kind == "vlm":
        return f"VLM {name} (Ollama)"
    if kind == "clip":
        return "CLIP"
    if kind == "chat":
        return f"chat {name} ({'LM Studio' if owner.startswith('lmstudio:') else 'Ollama'})"
    return owner


def vram_steps(records: Iterable[dict[str, Any]]) -> tuple[list[float], dict[str, list[int]]]:
    """VRAM held per owner after each ledger change: times (t_s) and, per owner, bytes at those times. A delayed
    free counts until the ledger records the bytes as released, as the device would show them."""
    held: dict[str, int] = {}
    times: list[float] = []
    series: dict[str, list[int]] = {}
    for r in records:
        if r["source"] != "gpu" or r["type"] not in ("alloc", "free"):
            continue
        owner = r["owner"]
        if r["type"] == "alloc":
            held[owner] = held.get(owner, 0) + r["nbytes"]
        elif r["op"] == "released":
            held[owner] = max(0, held.get(owner, 0) - r["nbytes"])
        else:
            continue
        if owner not in series:
            series[owner] = [0] * len(times)
        times.append(r["t_s"])
        for name, values in series.items():
            values.append(held.get(name, 0))
    return times, series


def peak_used_bytes(records: Iterable[dict[str, Any]]) -> int:
    return max((r["used_after"] for r in records if r["source"] == "gpu"), default=0)


# --- the agent's waits -----------------------------------------------------------------------------------------------
def stalls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent calls that waited on Mai at least `STALL_MIN_S`, each with what Mai was doing meanwhile."""
    vlm_model = header(records).get("vlm_model", "")
    found = []
    for r in records:
        if r["source"] != "agent" or r["type"] != "Call" or r.get("wait_s") is None or r["wait_s"] < STALL_MIN_S:
            continue
        if not r["what"].startswith(WAITING_CALLS):
            continue
        end = r["t"] + r["wait_s"]
        found.append({"what": r["what"], "at_s": r["t_s"], "waited_s": r["wait_s"], "ok": r["ok"],
                      "why": _why_waiting(records, r["t"], end, vlm_model)})
    return found


def _why_waiting(records: list[dict[str, Any]], start: float, end: float, vlm_model: str) -> str:
    """The GPU operations that ran while the agent waited, from the ledger's begin/end markers."""
    ops = []
    for r in records:
        if r["source"] == "gpu" and r["type"] == "begin" and start - 0.05 <= r["t"] <= end:
            what = owner_label(r["owner"], vlm_model)
            ops.append({"move_gpu": f"{what} to the GPU", "move_cpu": f"{what} to the CPU"}.get(r["op"], f"{r['op']} {what}"))
    return ", then ".join(dict.fromkeys(ops)) or "waiting for its turn at the GPU gate"


# --- Mai's log --------------------------------------------------------------------------------------------------------
def log_record(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A line of Mai's JSON log as a record (`type` = its event, `t` = its time), or None when it is plumbing."""
    event = str(entry.get("event", ""))
    if not event.startswith(LOG_PREFIXES) or "ts" not in entry:
        return None
    fields = {k: v for k, v in entry.items() if k not in LOG_DROP_FIELDS}
    if entry.get("level") in ("warning", "error"):
        fields["level"] = entry["level"]
    return {"type": event, "t": float(entry["ts"]), **fields}


# --- the narrative --------------------------------------------------------------------------------------------------
def _gb(nbytes: int | float) -> str:
    return f"{nbytes / 2**30:.1f} GB"


def header(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The DemoStarted record: the GPU's size, the reserve, the models and the timing of the run."""
    return next((r for r in records if r["source"] == "demo" and r["type"] == "DemoStarted"), {})


def narrate(records: list[dict[str, Any]]) -> list[str]:
    """One line per thing Mai decided, with its reason, in time order: mode changes with their steps, loads on
    demand, unloads after a grace or an idle timeout, chat model choices with what the GPU gate could grant, chat
    yields, refusals, degraded parts, and the agent's failed calls."""
    timing = header(records).get("timing", {})
    lines: list[str] = []
    mode, transition = "idle", False
    grantable: int | None = None
    choice: dict[str, Any] = {}
    for r in records:
        source, kind = r["source"], r["type"]
        text = None
        if source == "log" and kind == "mode.requested":
            transition = True
        elif source == "log" and kind == "chat.grantable":
            grantable = r.get("grantable_bytes")
        elif source == "log" and kind == "chat.choose":
            choice = r
        elif source == "log" and kind == "chat.unloaded" and str(r.get("reason", "")).startswith("yield"):
            why = str(r["reason"]).split(" for ", 1)
            text = f"the chat model {r.get('model')} gave its VRAM back" + (f" for {why[1]}" if len(why) == 2 else "")
        elif source == "mai" and kind == "ModeChanged":
            mode, transition = r["mode"], False
            steps = [step for step in r["steps"] if step != "read VRAM again"]  # a fresh reading, not a change
            text = (f"{r['mode'].upper()} reached in {r['duration_s']:.1f} s: "
                    + ("; ".join(steps) if steps else "nothing to change, the VLM and CLIP stay where they are"))
        elif source == "mai" and kind == "PlacementChanged":
            text = _placement(r, records, mode, transition, timing)
        elif source == "mai" and kind == "IdleUnloaded":
            text = (f"the idle timer unloaded {r['model']}: no lease for {r['idle_s']:.1f} s "
                    f"(idle_timeout_s {timing.get('idle_timeout_s', '?')})")
        elif source == "mai" and kind == "ModelSwitched":
            verb = f"switched from {r['previous']} to" if r["previous"] else "chose"
            if choice.get("model") == r["model"] and grantable is not None:
                text = (f"chat turn: the GPU gate could grant {_gb(grantable)}, so Mai {verb} {r['model']} "
                        f"({choice.get('reason')})")
            else:
                text = f"chat: Mai {verb} {r['model']} ({r['reason']})"
        elif source == "mai" and kind == "PlanRefused":
            text = f"refused to {r['step']}: {r['reason']}"
        elif source == "mai" and kind in ("Degraded", "Recovered"):
            text = f"{kind.lower()}: {r['part']}" + (f" ({r['reason']})" if r.get("reason") else "")
        elif source == "agent" and kind == "Call" and not r["ok"]:
            text = f"the agent's {r['what']} failed: {r.get('error')}"
        if text:
            lines.append(f"{r['t_s']:5.1f}s  {text}")
    return lines


def _placement(r: dict[str, Any], records: list[dict[str, Any]], mode: str, transition: bool,
               timing: dict[str, Any]) -> str | None:
    """A VLM or CLIP move the mode change that caused it does not already tell."""
    if r["component"] == "chat":
        return None  # told by the log's chat.unloaded line, which names what the VRAM was given to
    what = "the VLM" if r["component"] == "vlm" else "CLIP"
    if r["reason"] == "idle" or (r["reason"] == "mode" and transition):
        return None  # told by IdleUnloaded, or by the ModeChanged that ends the transition
    if r["component"] == "vlm" and r["state"] == "loaded" and r["reason"] == "demand":
        lease = next((c for c in records if c["source"] == "agent" and c["type"] == "Call" and c["what"] == "vlm_lease"
                      and c["t"] <= r["t"] <= c["t_end"] + 0.05), None)
        waited = f" (the agent waited {lease['wait_s']:.1f} s)" if lease else ""
        return f"the agent asked for a VLM lease in {mode.upper()}: Mai loaded the VLM on demand{waited}"
    if r["component"] == "vlm" and r["state"] == "unloaded" and r["reason"] == "grace_ended":
        grace = timing.get("grace_s")
        return (f"{what} unloaded: {mode.upper()} keeps an on-demand VLM only "
                + (f"{grace:.1f} s " if grace is not None else "") + "after its last lease")
    return f"{what} {'moved to the ' + r['state'].upper() if r['component'] == 'clip' else r['state']} (reason: {r['reason']})"


def stall_lines(found: list[dict[str, Any]]) -> list[str]:
    """The agent's waits on Mai, one line each, after a line with their count and total."""
    if not found:
        return [f"The agent never waited {STALL_MIN_S} s or more on Mai."]
    total = sum(s["waited_s"] for s in found)
    lines = [f"The agent waited on Mai {len(found)} times ({STALL_MIN_S} s or more), {total:.1f} s in all:"]
    for s in found:
        lines.append(f"{s['at_s']:5.1f}s  {s['what'].replace('_', ' '):<20} {s['waited_s']:4.1f} s  {s['why']}")
    return lines


# --- the summary ------------------------------------------------------------------------------------------------------
def event_counts(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many records of each type, per source."""
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r["source"], Counter())[r["type"]] += 1
    return {source: dict(sorted(c.items())) for source, c in sorted(counts.items())}


def summarize(records: list[dict[str, Any]], *, events_path: Path, png_path: Path | None) -> dict[str, Any]:
    from mai.sim.gpu_ledger import LedgerEvent, over_commits, overlapping_operations

    start = header(records)
    end = next((r for r in records if r["type"] == "DemoEnded"), {})
    ledger = [LedgerEvent(r["seq"], r["t"], r["type"], r["owner"], r["op"], r["nbytes"], r["used_after"])
              for r in records if r["source"] == "gpu"]
    total = start.get("gpu_total_bytes", 0)
    return {
        "events_jsonl": str(events_path),
        "timeline_png": str(png_path) if png_path else None,
        "duration_s": round(end.get("t", 0) - start.get("t", 0), 1) if start and end else None,
        "gpu_total_bytes": total,
        "reserve_bytes": start.get("reserve_bytes"),
        "records": len(records),
        "event_counts": event_counts(records),
        "peak_vram_bytes": peak_used_bytes(records),
        "over_commits": len(over_commits(ledger, total)) if total else None,
        "overlapping_operations": len(overlapping_operations(ledger)),
        "stalls": stalls(records),
        "narrative": narrate(records),
        "admin_port": start.get("admin_port"),
        "state_dir": start.get("state_dir"),
        "pids": end.get("pids", []),
        "killed_at_stop": end.get("killed", []),
        "leftover_processes": end.get("leftovers", []),
    }
