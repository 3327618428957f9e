"""Control-plane overhead: client → Mai round trips next to a bare Thespian echo, measured in one run.

    python -m bench.control_plane [--n N] [--json] [--quick]

Mai runs on simulated backends (bench/system_runner.py) in RECORDING mode, so the VLM is loaded and every
operation measured is pure control plane: no backend call happens while it is timed. The echo is a trivial actor
in a second multiprocTCPBase system bound to loopback the same way, asked through `MaiClient`'s own ask path.

Each of the N iterations runs every operation once, in a shuffled order, so load from other programs falls on all
rows alike. Rows:
  echo                       one ask to the bare echo (the baseline)
  echo x2                    two consecutive echo asks (the baseline of the lease pair)
  ping coordinator           Mai's Ping to the coordinator: Thespian plus Mai's actor dispatch, no core logic
  get_status                 client.get_status()
  ensure_vlm_loaded (loaded) client.ensure_vlm_loaded() while the VLM is loaded
  lease acquire / release    client.vlm(...) then lease.release(), each one round trip
  lease acquire+release      both, timed as one operation (baseline: echo x2)
Target (issue #5): p99 at most 5 ms per round trip and at most 3x the baseline's p99.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.system_runner import (
    bench_system,
    echo_system,
    machine,
    machine_line,
    ms,
    percentile,
    table,
)

TARGET_P99_S = 0.005  # per round trip
TARGET_RATIO = 3.0

# name -> (round trips, baseline row)
ROWS = {
    "echo": (1, None),
    "echo x2": (2, None),
    "ping coordinator": (1, "echo"),
    "get_status": (1, "echo"),
    "ensure_vlm_loaded (loaded)": (1, "echo"),
    "lease acquire": (1, "echo"),
    "lease release": (1, "echo"),
    "lease acquire+release": (2, "echo x2"),
}


def measure(n: int, warmup: int, ports: dict[str, int], seed: int = 5) -> dict[str, list[float]]:
    """Seconds per operation, N samples each, taken interleaved against a live Mai and a live echo (whose admin
    ports go into `ports`, so a caller can check nothing is left listening)."""
    from messages.base import new_request_id
    from messages.system import Ping

    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in ROWS}
    with echo_system() as echo, bench_system() as system, system.client() as client:
        ports.update(mai=system.config.system.admin_port, echo=echo.port)
        client.set_mode("recording", wait=True, timeout_s=120)
        coordinator = client._address("coordinator")
        clock = time.perf_counter

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            began = clock()
            result = fn()
            samples[name].append(clock() - began)
            return result

        def echo_pair() -> None:
            began = clock()
            echo.ping()
            echo.ping()
            samples["echo x2"].append(clock() - began)

        def lease_pair() -> None:
            lease = timed("lease acquire", lambda: client.vlm(holder="bench"))
            timed("lease release", lease.release)
            samples["lease acquire+release"].append(samples["lease acquire"][-1] + samples["lease release"][-1])

        ops: list[Callable[[], None]] = [
            lambda: timed("echo", echo.ping),
            echo_pair,
            lambda: timed("ping coordinator", lambda: client._ask_address(coordinator, Ping(new_request_id()), 5.0)),
            lambda: timed("get_status", client.get_status),
            lambda: timed("ensure_vlm_loaded (loaded)", client.ensure_vlm_loaded),
            lease_pair,
        ]
        for i in range(warmup + n):
            if i == warmup:
                for values in samples.values():
                    values.clear()
            rng.shuffle(ops)
            for op in ops:
                op()
        if client.get_status().vlm.state != "loaded":
            raise RuntimeError("the VLM was not loaded throughout: a backend call may have been timed")
    return samples


def summarise(samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for name, (trips, baseline) in ROWS.items():
        values = samples[name]
        row: dict[str, Any] = {
            "operation": name, "round_trips": trips, "n": len(values),
            "p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99)), "max_ms": ms(max(values)),
            "baseline": baseline,
        }
        if baseline is not None:
            base_p99 = percentile(samples[baseline], 99)
            row["ratio_p50"] = round(percentile(values, 50) / percentile(samples[baseline], 50), 2)
            row["ratio_p99"] = round(percentile(values, 99) / base_p99, 2)
            row["target_p99_ms"] = ms(TARGET_P99_S * trips)
            row["pass"] = percentile(values, 99) <= TARGET_P99_S * trips and row["ratio_p99"] <= TARGET_RATIO
        rows.append(row)
    return rows


def render(result: dict[str, Any]) -> str:
    headers = ["operation", "trips", "n", "p50 ms", "p99 ms", "max ms", "vs", "p50 ratio", "p99 ratio", "target", "verdict"]
    body = []
    for r in result["rows"]:
        base = r["baseline"]
        body.append([r["operation"], r["round_trips"], r["n"], r["p50_ms"], r["p99_ms"], r["max_ms"], base or "-",
                     f"{r['ratio_p50']:.2f}x" if base else "-", f"{r['ratio_p99']:.2f}x" if base else "-",
                     f"p99<={r['target_p99_ms']:g} ms, <={TARGET_RATIO:g}x" if base else "baseline",
                     ("PASS" if r["pass"] else "MISS") if base else "-"])
    return "\n".join([
        "Control-plane round trips: client -> Mai (multiprocTCPBase, loopback) vs a bare Thespian echo, same run",
        machine_line(result["machine"]),
        (f"samples: {result['n']} per operation after {result['warmup']} warm-up iterations, interleaved in shuffled"
         f" order; wall {result['wall_s']:.1f} s"),
        "",
        table(headers, body),
        "",
        *_echo_note(result),
        f"overall: {'PASS' if result['pass'] else 'MISS'}",
    ])


def _echo_note(result: dict[str, Any]) -> list[str]:
    echo = next(r for r in result["rows"] if r["operation"] == "echo")
    if echo["p99_ms"] <= TARGET_P99_S * 1000:
        return []
    return [(f"note: the bare echo's own p99 is {echo['p99_ms']:.2f} ms, above the {TARGET_P99_S * 1000:g} ms target: on"
             " this machine at this load the absolute target is out of reach for any actor; the ratios compare Mai with it")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="samples per operation (default 2000; --quick: 50)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quick", action="store_true", help="a few samples: checks the benchmark runs, not the figures")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (50 if args.quick else 2000)
    if n < 1:
        parser.error(f"--n must be at least 1, got {n}")
    warmup = 5 if args.quick else 100
    began = time.monotonic()
    ports: dict[str, int] = {}
    samples = measure(n, warmup, ports)
    rows = summarise(samples)
    result = {"bench": "control_plane", "machine": machine(), "n": n, "warmup": warmup, "quick": args.quick, "ports": ports,
              "wall_s": round(time.monotonic() - began, 1), "rows": rows,
              "pass": all(r["pass"] for r in rows if r["baseline"] is not None)}
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
