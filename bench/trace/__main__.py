"""`python -m bench.trace [--hours H] [--seed S] [--gpus 8,12,16,24] [--json] [--quick]` (see bench/trace/__init__)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.trace.params import GPU_SIZES_GIB, default_params
from bench.trace.report import as_json, default_trace, run, table

DEFAULT_HOURS = 8.0
QUICK_HOURS = 0.5


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trace",
                                     description="Replay simulated agent days against Mai and the baselines.")
    parser.add_argument("--hours", type=float, default=None,
                        help=f"hours of trace (default {DEFAULT_HOURS:g}; {QUICK_HOURS:g} with --quick)")
    parser.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    parser.add_argument("--gpus", default=",".join(str(g) for g in GPU_SIZES_GIB),
                        help="GPU sizes in GiB, comma-separated (default 8,12,16,24)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help=f"a short trace ({QUICK_HOURS:g} h): seconds, not minutes")
    args = parser.parse_args(argv)
    try:
        args.gpus = [float(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        parser.error(f"--gpus: got {args.gpus!r}; accepted: numbers of GiB separated by commas, e.g. 8,12,16,24")
    if not args.gpus or any(g <= 0 for g in args.gpus):
        parser.error(f"--gpus: got {args.gpus!r}; accepted: at least one size > 0")
    if args.hours is None:
        args.hours = QUICK_HOURS if args.quick else DEFAULT_HOURS
    if args.hours <= 0:
        parser.error(f"--hours: got {args.hours!r}; accepted: a number > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.perf_counter()
    trace = default_trace(args.hours, args.seed)
    params = default_params()
    results = run(trace, args.gpus, params)
    if args.json:
        json.dump(as_json(trace, results, params), sys.stdout, indent=1)
        print()
        return 0
    counts = trace.counts()
    print(f"Trace: {trace.hours:g} h, seed {args.seed}: {counts['vlm']} VLM calls, {counts['clip']} CLIP embeddings, "
          f"{counts['chat']} chat turns, {counts['mode']} mode changes")
    for result in results:
        print()
        print(table(result))
    print(f"\n({time.perf_counter() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
