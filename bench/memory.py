"""Memory: RSS of each of Mai's processes at rest and after hours of simulated agent traffic; it must stay bounded.

    python -m bench.memory [--n N] [--json] [--quick] [--clip-model ViT-B-32|ViT-Tiny-test]

Mai runs on simulated backends (bench/system_runner.py) with the real ViT-B-32 architecture (random weights) as CLIP. After start-up and a few seconds of rest, every process of
the system is measured: RSS, and USS (the pages only that process holds) for the totals, because forked actors
share pages with the admin and a sum of RSS counts those once per process. Then N rounds (default 2) each replay one hour of an ExecutionLoop's control traffic as fast
as Mai takes it, and the processes are measured again after each round:

  every  1 s  get_status                             3600 / hour
  every  2 s  embed 4 images (64x64, shared memory;   1800 / hour
              every 10th call as PNG file paths)
  every  6 s  embed 8 texts                            600 / hour
  every 10 s  VLM lease acquire + release              360 / hour
  every 30 s  set_mode(wait=True): recording,          120 / hour
              autopilot, ... (every 10th: idle)
  throughout  one subscriber, re-subscribing every 2 s (wall) and reading every event

Time is compressed, not simulated: Mai's own timers (idle unload, lease TTLs, the grace after a lease) run on the
wall clock, so they fire as often as the replay's wall time allows. Round 1 includes one-time growth (first
embeddings, first load, caches); bounded means the later rounds add nothing that matters:
each process grows by at most max(2 MiB, 2 % of its RSS) per round after the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.system_runner import (
    BENCH_CLIP,
    CLIP_MODELS,
    BenchSystem,
    MiB,
    ProcessRss,
    bench_system,
    clip_facts,
    clip_line,
    machine,
    machine_line,
    table,
)

HOUR_S = 3600
REST_S = 5.0  # settle time before each measurement: logs drain, timers fire, allocations return
QUICK_REST_S = 1.0
QUICK_S = 20  # simulated seconds per round with --quick: one switch, two leases, a few embeddings
TOLERANCE_MIB = 2.0
TOLERANCE_FRACTION = 0.02


def schedule(seconds: int) -> list[str]:
    """The operations of `seconds` simulated seconds of an agent, in order (a pure function of the duration)."""
    ops = []
    for t in range(seconds):
        if t % 30 == 0:
            ops.append("switch")
        if t % 10 == 0:
            ops.append("lease")
        if t % 6 == 0:
            ops.append("embed_texts")
        if t % 2 == 0:
            ops.append("embed_images")
        ops.append("status")
    return ops


class Agent:
    """Replays a schedule against Mai through the client API, as an ExecutionLoop would."""

    def __init__(self, client: Any, workdir: Path) -> None:
        self.client = client
        self.rng = np.random.default_rng(0)
        self.switches = 0
        self.image_calls = 0
        self.text_calls = 0
        self.busy_s: dict[str, float] = {}  # wall time spent per kind of operation
        self.paths = []
        from PIL import Image

        for i in range(4):
            path = workdir / f"crop{i}.png"
            Image.fromarray(self.rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
            self.paths.append(str(path))

    def run(self, op: str) -> None:
        began = time.perf_counter()
        self._run(op)
        self.busy_s[op] = self.busy_s.get(op, 0.0) + time.perf_counter() - began

    def _run(self, op: str) -> None:
        if op == "status":
            self.client.get_status()
        elif op == "embed_images":
            self.image_calls += 1
            if self.image_calls % 10 == 0:
                self.client.embed_images(self.paths)
            else:
                self.client.embed_images(self.rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
        elif op == "embed_texts":
            self.text_calls += 1
            self.client.embed_texts([f"button {self.text_calls} {i}" for i in range(8)])
        elif op == "lease":
            with self.client.vlm(holder="bench-agent", ttl_s=60):
                pass
        elif op == "switch":
            self.switches += 1
            mode = "idle" if self.switches % 10 == 0 else ("recording", "autopilot")[self.switches % 2]
            self.client.set_mode(mode, wait=True, timeout_s=120)
        else:
            raise ValueError(f"unknown operation {op!r}; accepted: status, embed_images, embed_texts, lease, switch")


def _subscriber(client: Any, stop: threading.Event, counts: dict[str, int]) -> None:
    while not stop.is_set():
        for _event in client.subscribe(ttl_s=10, duration_s=2.0):
            counts["events"] += 1
        counts["subscriptions"] += 1


def _snapshot(system: BenchSystem, client: Any, rest_s: float) -> list[ProcessRss]:
    time.sleep(rest_s)
    return system.processes(client)


def measure(rounds: int, seconds: int, rest_s: float, clip_model: str = BENCH_CLIP) -> dict[str, Any]:
    ops = schedule(seconds)
    snapshots: list[list[ProcessRss]] = []
    round_s: list[float] = []
    counts = {"events": 0, "subscriptions": 0}
    with bench_system(clip_model=clip_model) as system, system.client() as client:
        port = system.config.system.admin_port
        snapshots.append(_snapshot(system, client, rest_s))
        agent = Agent(client, system.workdir)
        stop = threading.Event()
        listening = system.client()  # the agent's event loop has a connection of its own
        listener = threading.Thread(target=_subscriber, args=(listening, stop, counts), daemon=True)
        listener.start()
        try:
            for _ in range(rounds):
                began = time.monotonic()
                for op in ops:
                    agent.run(op)
                round_s.append(time.monotonic() - began)
                snapshots.append(_snapshot(system, client, rest_s))
        finally:
            stop.set()
            listener.join(10)
            listening.close()
    per_round = {op: ops.count(op) for op in dict.fromkeys(ops)}
    mean_ms = {op: round(agent.busy_s[op] / (per_round[op] * rounds) * 1000, 2) for op in per_round}
    return {"snapshots": snapshots, "ports": {"mai": port}, "round_s": round_s, "ops": per_round, "op_mean_ms": mean_ms,
            "subscriber": counts}


def summarise(snapshots: list[list[ProcessRss]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per process (matched by role; a restarted actor would show as a new pid) and the totals."""
    rows = []
    for proc in snapshots[0]:
        series = []
        for snap in snapshots:
            match = next((p for p in snap if p.role == proc.role), None)
            series.append(match)
        rss = [p.rss_bytes if p else None for p in series]
        later = [rss[i + 1] - rss[i] for i in range(1, len(rss) - 1) if rss[i] is not None and rss[i + 1] is not None]
        allowed = max(TOLERANCE_MIB * MiB, TOLERANCE_FRACTION * (rss[1] or 0))
        rows.append({
            "process": proc.role, "pids": sorted({p.pid for p in series if p}),
            "rss_mib": [round(r / MiB, 1) if r is not None else None for r in rss],
            "growth_first_mib": round((rss[1] - rss[0]) / MiB, 1) if None not in rss[:2] else None,
            "growth_later_mib": [round(g / MiB, 1) for g in later],
            "allowed_mib": round(allowed / MiB, 1),
            "pass": None not in rss and len({p.pid for p in series}) == 1 and all(g <= allowed for g in later),
        })
    totals = {
        "rss_sum_mib": [round(sum(p.rss_bytes for p in snap) / MiB, 1) for snap in snapshots],
        "uss_sum_mib": [round(sum(p.uss_bytes for p in snap) / MiB, 1) for snap in snapshots],
    }
    return rows, totals


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(result: dict[str, Any]) -> str:
    rounds = len(result["round_s"])
    headers = ["process", "at rest"] + [f"after {i + 1}" for i in range(rounds)] + ["round 1 growth"] + \
              [f"round {i + 2} growth" for i in range(rounds - 1)] + ["allowed/round", "verdict"]
    body = []
    for r in result["rows"]:
        body.append([r["process"], *map(_mib, r["rss_mib"]), _mib(r["growth_first_mib"]), *map(_mib, r["growth_later_mib"]),
                     _mib(r["allowed_mib"]), "PASS" if r["pass"] else "MISS"])
    t = result["totals"]
    for key, label in (("rss_sum_mib", "total RSS (sum)"), ("uss_sum_mib", "total USS (sum)")):
        series = t[key]
        growth = [round(series[i + 1] - series[i], 1) for i in range(len(series) - 1)]
        body.append([label, *map(_mib, series), *map(_mib, growth), "", ""])
    simulated = result["simulated_s"]
    length = f"{simulated / HOUR_S:g} simulated hour" if simulated >= HOUR_S else f"{simulated} simulated seconds"
    ops = ", ".join(f"{v} {k}" for k, v in result["ops"].items())
    return "\n".join([
        "Memory of Mai's processes (MiB): at rest, then after each round of simulated agent traffic",
        machine_line(result["machine"]),
        clip_line(result["clip"]),
        f"rounds: {rounds} x {length} each ({ops}); round wall times "
        + ", ".join(f"{s:.0f} s" for s in result["round_s"])
        + f"; subscriber: {result['subscriber']['events']} events over {result['subscriber']['subscriptions']} subscriptions",
        "mean wall per operation: " + ", ".join(f"{k} {v:.1f} ms" for k, v in result["op_mean_ms"].items()),
        "",
        table(headers, body),
        "",
        (f"bounded: growth per round after the first at most max({TOLERANCE_MIB:g} MiB, {TOLERANCE_FRACTION:.0%} of the"
         " process's RSS after round 1), same pid throughout"),
        f"overall: {'PASS' if result['pass'] else 'MISS'}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2, help="rounds of simulated traffic (at least 2, default 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quick", action="store_true", help=f"rounds of {QUICK_S} simulated seconds: checks the benchmark runs")
    parser.add_argument("--clip-model", choices=CLIP_MODELS, default=BENCH_CLIP,
                        help=f"CLIP architecture, random weights (default {BENCH_CLIP}; the tiny test model only checks the benchmark runs)")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2 (growth is judged on the rounds after the first), got {args.n}")
    seconds = QUICK_S if args.quick else HOUR_S
    began = time.monotonic()
    measured = measure(args.n, seconds, QUICK_REST_S if args.quick else REST_S, args.clip_model)
    rows, totals = summarise(measured["snapshots"])
    result = {"bench": "memory", "machine": machine(), "clip": clip_facts(args.clip_model), "n": args.n, "quick": args.quick, "ports": measured["ports"],
              "simulated_s": seconds,
              "wall_s": round(time.monotonic() - began, 1), "round_s": [round(s, 1) for s in measured["round_s"]],
              "ops": measured["ops"], "op_mean_ms": measured["op_mean_ms"], "subscriber": measured["subscriber"], "rows": rows, "totals": totals,
              "pass": all(r["pass"] for r in rows)}
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
