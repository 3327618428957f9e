"""The `mai demo` timeline: VRAM per owner stacked over time, modes shaded, loads hatched, the agent's waits marked.

Drawn only from the run's record (`events.jsonl`), so a saved record can be drawn again:
`plot_timeline(read_events(path), out_png)`. matplotlib is imported inside the function, with the non-interactive
Agg backend, so no other command pays for it and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mai.demo_story import (
    STALL_MIN_S,
    header,
    owner_kind,
    owner_label,
    stalls,
    vram_steps,
)

GiB = 2**30
MODE_COLOURS = {"autopilot": "#fff1c1", "recording": "#fbd9d3", "idle": "#ececec"}
KIND_COLOURS = {"vlm": ["#3b6fb6"], "clip": ["#3a9a5b"], "chat": ["#8c62b8", "#e08a2c", "#b85c8c", "#6a8c2c"],
                "other": ["#888888"]}
WORK_COLOURS = {"clip_embed": "#3a9a5b", "vlm_call": "#3b6fb6", "chat_turn": "#8c62b8"}
STALL_COLOUR = "#d62728"


def plot_timeline(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    start = header(records)
    total = start.get("gpu_total_bytes") or max((r.get("used_after", 0) for r in records), default=GiB)
    reserve = start.get("reserve_bytes") or 0
    vlm_model = start.get("vlm_model", "")
    end_s = max((r["t_s"] for r in records), default=1.0)
    begin_s = -0.5  # Mai's start-up is not part of the story: the script begins at 0

    fig, (ax, lane) = plt.subplots(2, 1, figsize=(14, 7.2), sharex=True, gridspec_kw={"height_ratios": [4, 1.1]})
    fig.subplots_adjust(left=0.075, right=0.77, top=0.92, bottom=0.085, hspace=0.08)
    top_gb = total / GiB * 1.22

    # Modes: a band starts when its mode is reached (Mai starts in IDLE).
    mode, since = "idle", begin_s
    for r in records:
        if r["source"] == "mai" and r["type"] == "ModeChanged":
            _band(ax, since, r["t_s"], mode, top_gb, end_s - begin_s)
            mode, since = r["mode"], r["t_s"]
    _band(ax, since, end_s, mode, top_gb, end_s - begin_s)

    # VRAM per owner, stacked, from the ledger's record.
    times, series = vram_steps(records)
    owners = sorted(series, key=lambda o: (["vlm", "clip", "chat", "other"].index(owner_kind(o, vlm_model)), o))
    colours = _owner_colours(owners, vlm_model)
    if times:
        times = times + [end_s]
        stacks = [[v / GiB for v in series[o]] + [series[o][-1] / GiB] for o in owners]
        ax.stackplot(times, *stacks, step="post", colors=[colours[o] for o in owners],
                     labels=[owner_label(o, vlm_model) for o in owners], alpha=0.9, zorder=2)
        _hatch_loads(ax, records, owners, times, stacks)
    ax.axhline(total / GiB, color="black", lw=1.4, zorder=3, label=f"capacity {total / GiB:.1f} GB")
    if reserve:
        ax.axhline((total - reserve) / GiB, color="black", lw=1, ls="--", zorder=3,
                   label=f"less the {reserve / GiB:.1f} GB reserve: Mai plans below")

    # What Mai decided at a moment worth a label.
    for r in records:
        label = _moment(r)
        if label:
            ax.axvline(r["t_s"], color="#444444", lw=0.8, ls=":", zorder=4)
            ax.text(r["t_s"], total / GiB * 0.97, label, rotation=90, va="top", ha="right", fontsize=7.5,
                    color="#222222", zorder=5, bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})

    # The agent: what it was doing, and where it waited on Mai.
    for r in records:
        if r["source"] != "agent" or r["type"] != "Call":
            continue
        kind = r["what"].split()[0]
        if kind in WORK_COLOURS:
            start_work = r["t_s"] + (r["wait_s"] or 0 if kind == "chat_turn" else 0)
            lane.broken_barh([(start_work, max(r["t_end"] - r["t"] - (start_work - r["t_s"]), 0.08))], (1.15, 0.7),
                             color=WORK_COLOURS[kind])
        if r.get("wait_s") and r["wait_s"] >= 0.05:
            lane.broken_barh([(r["t_s"], r["wait_s"])], (0.15, 0.7), color=STALL_COLOUR,
                             alpha=1.0 if r["wait_s"] >= STALL_MIN_S else 0.35)
    for stall in stalls(records):
        ax.plot([stall["at_s"], stall["at_s"] + stall["waited_s"]], [top_gb * 0.955] * 2, color=STALL_COLOUR, lw=4,
                solid_capstyle="butt", zorder=6)
        ax.text(stall["at_s"] + stall["waited_s"] / 2, top_gb * 0.975, f"waited {stall['waited_s']:.1f} s",
                ha="center", va="bottom", fontsize=7.5, color=STALL_COLOUR, zorder=6)

    ax.set_ylim(0, top_gb)
    ax.set_xlim(begin_s, end_s)
    ax.set_ylabel("VRAM (GB)")
    ax.grid(axis="y", color="#cccccc", lw=0.5, zorder=0)
    handles = ax.get_legend_handles_labels()[0]
    handles += [Patch(facecolor=MODE_COLOURS[m], label=f"mode {m.upper()}") for m in MODE_COLOURS]
    handles += [Patch(facecolor="white", edgecolor="#555555", hatch="////", label="loading / moving"),
                Patch(facecolor=STALL_COLOUR, label=f"the agent waited on Mai ≥ {STALL_MIN_S} s")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"mai demo: one simulated {total / GiB:.0f} GB GPU shared by a VLM, CLIP and a chat model "
                 f"({end_s:.0f} s)", fontsize=12, loc="left")

    lane.set_yticks([0.5, 1.5], ["waiting on Mai", "agent working"], fontsize=8)
    lane.set_ylim(0, 2)
    lane.set_xlabel("seconds since the script began")
    lane.grid(axis="x", color="#dddddd", lw=0.5)
    lane.legend(handles=[Patch(facecolor=c, label=k.replace("_", " ")) for k, c in WORK_COLOURS.items()],
                loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(ax: Any, x0: float, x1: float, mode: str, top_gb: float, span_s: float) -> None:
    if x1 <= x0:
        return
    ax.axvspan(x0, x1, color=MODE_COLOURS.get(mode, "#f4f4f4"), zorder=0, lw=0)
    if (x1 - x0) / span_s < 0.05:
        return  # too narrow for its name
    ax.text((x0 + x1) / 2, top_gb * 0.915, mode.upper(), ha="center", va="top", fontsize=9, color="#555555",
            fontweight="bold", zorder=1, clip_on=True)


def _owner_colours(owners: list[str], vlm_model: str | None) -> dict[str, str]:
    used: dict[str, int] = {}
    colours = {}
    for owner in owners:
        kind = owner_kind(owner, vlm_model)
        palette = KIND_COLOURS[kind]
        colours[owner] = palette[used.get(kind, 0) % len(palette)]
        used[kind] = used.get(kind, 0) + 1
    return colours


def _hatch_loads(ax: Any, records: list[dict[str, Any]], owners: list[str], times: list[float],
                 stacks: list[list[float]]) -> None:
    """Hatch an owner's block while its load or move runs (between the ledger's begin and end markers). The block
    drawn is the owner's tallest during the operation: a load allocates at its start, a move at its end."""
    lower = [0.0] * len(times)
    bounds = {}
    for owner, values in zip(owners, stacks):
        upper = [low + v for low, v in zip(lower, values)]
        bounds[owner] = (lower, upper)
        lower = upper
    opened: dict[tuple[str, str], float] = {}
    for r in records:
        if r["source"] != "gpu" or r["type"] not in ("begin", "end") or r["owner"] not in bounds:
            continue
        key = (r["owner"], r["op"])
        if r["type"] == "begin":
            opened[key] = r["t_s"]
            continue
        began = opened.pop(key, None)
        if began is None:
            continue
        low, high = bounds[r["owner"]]
        during = [i for i, t in enumerate(times) if began <= t <= r["t_s"]]
        before = [i for i, t in enumerate(times) if t < began][-1:]
        best = max(during + before, key=lambda i: high[i] - low[i], default=None)
        if best is not None and high[best] > low[best]:
            ax.fill_between([began, max(r["t_s"], began + 0.05)], low[best], high[best], facecolor="none",
                            edgecolor="white", hatch="////", lw=0, zorder=3)


def _moment(r: dict[str, Any]) -> str | None:
    """A short label for a decision worth pointing at on the timeline."""
    if r["source"] == "mai" and r["type"] == "IdleUnloaded":
        return "idle timer unloads the VLM"
    if r["source"] == "mai" and r["type"] == "ModelSwitched":
        return f"chat model: {r['model']}"
    if r["source"] == "log" and r["type"] == "chat.unloaded" and str(r.get("reason", "")).startswith("yield"):
        return "chat model yields to the VLM"
    if r["source"] == "mai" and r["type"] == "PlanRefused":
        return f"refused: {r['step']}"
    return None
