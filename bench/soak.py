"""Soak: Mai under random operations from several client processes, with faults injected, for minutes.

    python -m bench.soak [--minutes 10] [--clients 4] [--seed 1] [--json] [--clip-model ViT-B-32|ViT-Tiny-test]

A private Mai on the simulated GPU with the Ollama double (`bench.system_runner.bench_system`), CLIP the real
ViT-B-32 architecture with random weights. Client processes
run random operations (mode switches, VLM leases, text and image embeddings, status) until the end; meanwhile
faults are injected in turn: an actor process killed with SIGKILL, the Ollama double killed then started again,
the double answering 500 for a while. Every few seconds the RSS of each Mai process (admin, logger, supervisor,
each actor) is sampled. At the end `mai stop`, then a search for any Mai or double process, or any socket Mai
listened on, still there.

Printed: RSS per actor process (start after warm-up, max, end, slope) with a bounded verdict, operations and
errors by kind with p50/p99 latency, faults injected, restarts seen, leftovers. Exit status 0 when every actor
stayed bounded, no operation raised anything but a typed `MaiError`, no client hung and nothing was left.

`client_process` is also the load generator of `tests/system/test_load.py`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bench.system_runner import (BENCH_CLIP, CLIP_MODELS, bench_system, clip_facts, clip_line, machine, machine_line,
                                 percentile)

MiB = 2**20
MODES = ("autopilot", "recording", "idle")
OPERATIONS = ("set_mode", "lease", "embed_texts", "embed_images", "get_status")
WEIGHTS = (0.25, 0.2, 0.2, 0.15, 0.2)
ACTOR_ROLES = ("sampler", "vlm", "clip", "chat", "coordinator")
RSS_BOUND_MB = 64.0  # growth after warm-up beyond which an actor process is not called bounded
SAMPLE_EVERY_S = 3.0


# --- the client processes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientPlan:
    """What one client process does: `operations` random operations, or as many as fit before `until` (time.time)."""

    name: str
    config_path: str
    seed: int
    out_path: str
    image_paths: tuple[str, ...]
    operations: int | None = None
    until: float | None = None
    timeout_s: float = 30.0


@dataclass
class OpRecord:
    client: str
    kind: str
    sent: float  # time.time() when the call began
    done: float  # time.time() when it returned or raised
    outcome: str  # "ok", a MaiError reason ("timeout", ...), or "unexpected: <type>: <message>"
    mode: str = ""  # set_mode: the mode asked

    @property
    def latency_s(self) -> float:
        return self.done - self.sent


def client_process(plan: ClientPlan) -> None:
    """Entry point of a client process (spawned): run the plan, write every record as JSON to `plan.out_path`."""
    import numpy as np

    from config import load_config
    from mai.client import connect
    from messages.errors import MaiError

    rng = random.Random(plan.seed)
    cfg = load_config(plan.config_path, env={})
    records: list[OpRecord] = []
    client = None

    def call(kind: str) -> tuple[str, str]:
        """One operation; returns (mode asked or "", outcome)."""
        nonlocal client
        if client is None:
            client = connect(config=cfg)
        if kind == "set_mode":
            mode = rng.choice(MODES)
            client.set_mode(mode, wait=rng.random() < 0.2, timeout_s=plan.timeout_s)
            return mode, "ok"
        if kind == "lease":
            lease = client.vlm(holder=plan.name, ttl_s=60, timeout_s=plan.timeout_s)
            time.sleep(rng.uniform(0.0, 0.05))  # the client would call Ollama here
            lease.release()
        elif kind == "embed_texts":
            client.embed_texts([f"button {rng.randrange(1000)}" for _ in range(rng.randint(1, 4))], timeout_s=plan.timeout_s)
        elif kind == "embed_images":
            if plan.image_paths and rng.random() < 0.5:
                client.embed_images(list(plan.image_paths), timeout_s=plan.timeout_s)
            else:
                pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
                client.embed_images(pixels, timeout_s=plan.timeout_s)
        else:
            client.get_status(timeout_s=min(plan.timeout_s, 10.0))
        return "", "ok"

    error = None
    try:
        while (plan.operations is None or len(records) < plan.operations) and (
                plan.until is None or time.time() < plan.until):
            kind = rng.choices(OPERATIONS, WEIGHTS)[0]
            sent = time.time()
            try:
                mode, outcome = call(kind)
            except MaiError as err:
                mode, outcome = "", err.reason.value
                if outcome in ("not_running", "timeout") and client is not None:
                    client.close()  # the actor may be restarting at a new address: attach again next time
                    client = None
            except Exception as err:  # noqa: BLE001 - recorded: the test and the soak count these as failures
                mode, outcome = "", f"unexpected: {type(err).__name__}: {err}"
            records.append(OpRecord(plan.name, kind, sent, time.time(), outcome, mode))
            if outcome.startswith("unexpected") or outcome == "not_running":
                time.sleep(0.2)  # do not spin while Mai is away
    except BaseException:  # noqa: BLE001 - written out, so the parent can say what happened
        error = traceback.format_exc()
    finally:
        if client is not None:
            client.close()
        Path(plan.out_path).write_text(json.dumps({"records": [asdict(r) for r in records], "error": error}))


def run_clients(plans: Sequence[ClientPlan], deadline_s: float) -> tuple[list[OpRecord], list[str]]:
    """Run each plan in its own spawned process; return every record and the problems (a client that raised, or
    was still running at `deadline_s` from now and had to be killed: a hang)."""
    context = multiprocessing.get_context("spawn")  # never fork a process that holds an actor system handle
    processes = [context.Process(target=client_process, args=(plan,), name=plan.name) for plan in plans]
    for process in processes:
        process.start()
    end = time.monotonic() + deadline_s
    problems: list[str] = []
    for process in processes:
        process.join(max(0.1, end - time.monotonic()))
        if process.is_alive():
            problems.append(f"{process.name} still running after {deadline_s:.0f} s: killed (a hang)")
            process.kill()
            process.join(5)
    records: list[OpRecord] = []
    for plan in plans:
        try:
            data = json.loads(Path(plan.out_path).read_text())
        except (OSError, ValueError):
            problems.append(f"{plan.name} wrote no results")
            continue
        if data["error"]:
            problems.append(f"{plan.name} failed: {data['error']}")
        records += [OpRecord(**r) for r in data["records"]]
    return records, problems


def write_images(directory: Path, count: int = 2) -> tuple[str, ...]:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(np.random.default_rng(7).integers(0, 255, (count, 48, 48, 3), dtype=np.uint8)):
        path = directory / f"crop{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return tuple(paths)


# --- figures ------------------------------------------------------------------------------------------------------
def operation_summary(records: Sequence[OpRecord]) -> list[dict[str, Any]]:
    """Per kind: count, outcomes, p50/p99 latency (ms) of every call, answered or not."""
    rows = []
    for kind in OPERATIONS:
        mine = [r for r in records if r.kind == kind]
        if not mine:
            continue
        outcomes: dict[str, int] = {}
        for r in mine:
            key = r.outcome.split(":")[0] if r.outcome.startswith("unexpected") else r.outcome
            outcomes[key] = outcomes.get(key, 0) + 1
        latencies = [r.latency_s * 1000 for r in mine]
        rows.append({"kind": kind, "count": len(mine), "ok": outcomes.pop("ok", 0), "errors": outcomes,
                     "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1),
                     "max_ms": round(max(latencies), 1)})
    return rows


def latency_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'operation':<13} {'count':>6} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  errors"]
    for row in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "-"
        lines.append(f"{row['kind']:<13} {row['count']:>6} {row['ok']:>6} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                     f"{row['max_ms']:>8.1f}  {errors}")
    return "\n".join(lines)


def last_writer_candidates(records: Sequence[OpRecord]) -> set[str]:
    """Modes one of which the coordinator must have ended on: a set_mode whose answer came back before another one
    was sent was certainly handled before it, so only those answered after the last send can have been last."""
    asked = [r for r in records if r.kind == "set_mode" and r.mode]
    if not asked:
        return set()
    last_sent = max(r.sent for r in asked)
    return {r.mode for r in asked if r.done >= last_sent}


@dataclass
class RssSeries:
    """RSS samples of one process (a role and a pid: a restarted actor starts a new series)."""

    role: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, rss bytes)

    def summary(self, warmup_s: float, bound_mb: float) -> dict[str, Any] | None:
        """Start, max, end, least-squares slope and growth of the samples taken `warmup_s` after this process was
        first seen (a restarted actor warms up again: CLIP creates its model)."""
        first = self.samples[0][0] if self.samples else 0.0
        steady = [(t, b) for t, b in self.samples if t >= first + warmup_s]
        if len(steady) < 3:
            return None  # too short-lived to judge (killed, or started just before the end)
        times, values = [t for t, _ in steady], [b / MiB for _, b in steady]
        mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
        spread = sum((t - mean_t) ** 2 for t in times)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread if spread else 0.0
        growth = max(values) - values[0]
        return {"role": self.role, "pid": self.pid, "start_mb": round(values[0], 1), "max_mb": round(max(values), 1),
                "end_mb": round(values[-1], 1), "slope_mb_per_min": round(slope * 60, 2), "growth_mb": round(growth, 1),
                "samples": len(steady), "bounded": growth <= bound_mb}


def rss_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'process':<12} {'pid':>7} {'start MB':>9} {'max MB':>8} {'end MB':>8} {'MB/min':>7}  verdict"]
    for row in rows:
        verdict = "bounded" if row["bounded"] else f"NOT bounded (+{row['growth_mb']} MB)"
        lines.append(f"{row['role']:<12} {row['pid']:>7} {row['start_mb']:>9.1f} {row['max_mb']:>8.1f} "
                     f"{row['end_mb']:>8.1f} {row['slope_mb_per_min']:>7.2f}  {verdict}")
    return "\n".join(lines)


# --- watching Mai's processes -------------------------------------------------------------------------------------
class ProcessWatch:
    """Samples the RSS of every process of the system on `port`, names each by the actor it runs, and remembers
    every pid and listening port it saw (for the leftover check after `mai stop`)."""

    def __init__(self, client: Any, port: int) -> None:
        self.client = client
        self.port = port
        self.began = time.monotonic()
        self.roles: dict[int, str] = {}
        self.series: dict[int, RssSeries] = {}
        self.listening_ports: set[int] = {port}
        self.lock = threading.Lock()

    def role_pids(self) -> dict[str, int]:
        """role → pid of the actors answering a ping now (the supervisor included)."""
        from messages.base import new_request_id
        from messages.errors import MaiError
        from messages.system import Ping

        pids = {role: pong.pid for role, pong in self.client.ping_all(timeout_s=3.0).items() if pong is not None}
        try:
            pids["supervisor"] = self.client._ask_address(self.client._supervisor, Ping(new_request_id()), 3.0).pid
        except MaiError:
            pass
        return pids

    def sample(self) -> None:
        import psutil

        from bootstrap.system import system_processes
        from messages.errors import MaiError

        procs = system_processes(self.port)
        pids = {p.pid for p in procs}
        if any(p.pid not in self.roles for p in procs):
            try:
                for role, pid in self.role_pids().items():
                    self.roles[pid] = role
            except MaiError:
                pass
        now = time.monotonic() - self.began
        for proc in procs:
            try:
                # A process that never answers a ping is Thespian's logger (or an actor not answering yet: its
                # series is renamed once it does).
                role = self.roles.get(proc.pid) or ("admin" if proc.ppid() not in pids else "logger")
                rss = proc.memory_info().rss
                for conn in proc.net_connections("tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr:
                        self.listening_ports.add(conn.laddr.port)
            except psutil.Error:
                continue
            with self.lock:
                series = self.series.setdefault(proc.pid, RssSeries(role, proc.pid))
                series.role = role
                series.samples.append((now, rss))

    def run(self, stop: threading.Event, every_s: float = SAMPLE_EVERY_S) -> None:
        while not stop.is_set():
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - one bad sample must not end the soak
                print(f"soak: RSS sample failed: {type(err).__name__}: {err}", file=sys.stderr)
            stop.wait(every_s)


def leftovers(pids: Sequence[int], ports: Sequence[int]) -> list[str]:
    """Processes among `pids` still alive, and sockets still listening on `ports`."""
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"process {pid} ({' '.join(proc.cmdline()[:4])}) still running")
        except psutil.Error:
            continue
    for conn in psutil.net_connections("tcp"):
        ours = conn.pid is None or conn.pid in pids  # a port reused since by someone else's process is not ours
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports and ours:
            found.append(f"port {conn.laddr.port} still listening (pid {conn.pid})")
    return found


# --- faults -------------------------------------------------------------------------------------------------------
FAULTS = ("ollama_500", "kill_ollama", "kill_actor")  # the slowest to get over last: a short soak sees all three


def inject(fault: str, system: Any, watch: ProcessWatch, rng: random.Random) -> dict[str, Any]:
    """Inject one fault and wait (bounded) until Mai got over it; return what happened."""
    from messages.errors import MaiError

    began = time.monotonic()
    entry: dict[str, Any] = {"fault": fault, "at_s": round(began - watch.began, 1)}
    if fault == "kill_actor":
        try:
            pids = watch.role_pids()
        except MaiError:
            pids = {}
        candidates = [role for role in ACTOR_ROLES if role in pids]
        if not candidates:
            entry["skipped"] = "no actor answered a ping"
            return entry
        role = rng.choice(candidates)
        os.kill(pids[role], signal.SIGKILL)
        entry.update(role=role, pid=pids[role])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                new = watch.role_pids().get(role)
            except MaiError:
                new = None
            if new is not None and new != pids[role]:
                entry.update(restarted=True, new_pid=new, back_after_s=round(time.monotonic() - began, 2))
                return entry
            time.sleep(0.25)
        entry["restarted"] = False
    elif fault == "ollama_500":
        system.ollama.configure(fail_next="error500", fail_count=rng.randint(3, 10),
                                fail_paths=["/api/generate", "/api/ps", "/api/chat"])
        entry["requests"] = "the next 3-10 on /api/generate, /api/ps, /api/chat"
    else:
        system.ollama.kill()
        time.sleep(rng.uniform(2.0, 6.0))
        system.ollama.restart()
        entry["down_s"] = round(time.monotonic() - began, 1)
    return entry


# --- the soak -----------------------------------------------------------------------------------------------------
def soak(duration_s: float, clients: int = 4, seed: int = 1, *, fault_every_s: float = 30.0,
         warmup_s: float | None = None, bound_mb: float = RSS_BOUND_MB, clip_model: str = BENCH_CLIP,
         log: Any = print) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring); `log` gets progress lines."""
    warmup_s = warmup_s if warmup_s is not None else min(60.0, duration_s / 5)
    rng = random.Random(seed)
    report: dict[str, Any] = {"duration_s": duration_s, "clients": clients, "seed": seed, "machine": machine(),
                              "clip": clip_facts(clip_model), "faults": [], "problems": []}
    with bench_system(load_time_s=0.2, unload_delay_s=0.1, clip_model=clip_model) as system:
        port = system.config.system.admin_port
        images = write_images(system.workdir / "images")
        with system.client() as client:
            watch = ProcessWatch(client, port)
            stop = threading.Event()
            sampler = threading.Thread(target=watch.run, args=(stop,), daemon=True)
            sampler.start()
            until = time.time() + duration_s
            plans = [ClientPlan(f"client-{i}", str(system.config_path), seed * 100 + i,
                                str(system.workdir / f"client-{i}.json"), images, until=until) for i in range(clients)]
            outcome: dict[str, Any] = {}
            runner = threading.Thread(target=lambda: outcome.update(
                zip(("records", "problems"), run_clients(plans, duration_s + 120))), daemon=True)
            runner.start()
            log(f"soak: {clients} clients for {duration_s:.0f} s, a fault every ~{fault_every_s:.0f} s, "
                f"RSS every {SAMPLE_EVERY_S:.0f} s")
            next_fault = time.monotonic() + min(fault_every_s, duration_s / 8)
            turn = 0
            while time.time() < until - 10:
                if time.monotonic() >= next_fault:
                    entry = inject(FAULTS[turn % len(FAULTS)], system, watch, rng)
                    turn += 1
                    report["faults"].append(entry)
                    log(f"soak: {entry}")
                    next_fault = time.monotonic() + fault_every_s * rng.uniform(0.7, 1.3)
                time.sleep(0.5)
            runner.join()
            stop.set()
            sampler.join(10)
            records, problems = outcome.get("records", []), outcome.get("problems", ["the client runner did not end"])
            report["problems"] += problems
            try:
                info = client.system_info()
                report["restarts"] = {c.role: c.restarts for c in info.children}
            except Exception as err:  # noqa: BLE001 - reported
                report["problems"].append(f"no system info at the end: {err}")
        pids = sorted(watch.series)
        stopped = system.cli("stop", "--json", timeout_s=120)
        try:
            report["stop"] = json.loads(stopped.stdout)
        except ValueError:
            report["stop"] = {"output": stopped.stdout + stopped.stderr}
            report["problems"].append(f"mai stop --json did not print JSON: {stopped.stdout!r}")
        time.sleep(1.0)  # a process that was told to exit needs a moment to be reaped
        report["leftovers"] = leftovers(pids, sorted(watch.listening_ports))
        double = system.ollama
    if double.process is not None and double.process.poll() is None:
        report["leftovers"].append(f"Ollama double (pid {double.process.pid}) still running")
    report["operations"] = operation_summary(records)
    report["unexpected"] = [asdict(r) for r in records if r.outcome.startswith("unexpected")][:20]
    report["rss"] = [s for s in (series.summary(warmup_s, bound_mb) for series in watch.series.values()) if s]
    report["rss_bound_mb"], report["warmup_s"] = bound_mb, warmup_s
    report["ok"] = (all(row["bounded"] for row in report["rss"]) and not report["unexpected"]
                    and not report["problems"] and not report["leftovers"])
    return report


def report_text(report: dict[str, Any]) -> str:
    lines = [f"soak: {report['duration_s'] / 60:.1f} min, {report['clients']} client processes, seed {report['seed']}",
             machine_line(report["machine"]), clip_line(report["clip"]), "",
             f"RSS per process after {report['warmup_s']:.0f} s of warm-up (bounded: grew at most "
             f"{report['rss_bound_mb']:.0f} MB):", rss_table(report["rss"]), "",
             "operations:", latency_table(report["operations"]), "",
             "faults injected:"]
    lines += [f"  {entry}" for entry in report["faults"]] or ["  none"]
    stop = report["stop"]
    stop_text = (f"stopped in {stop['duration_s']:.2f} s, killed {stop['killed'] or 'nothing'}" if "duration_s" in stop
                 else str(stop))
    lines += ["", f"restarts (supervisor's count): {report.get('restarts', '?')}", f"mai stop: {stop_text}",
              "leftovers after mai stop: " + ("; ".join(report["leftovers"]) or "none")]
    if report["unexpected"]:
        lines.append(f"UNEXPECTED exceptions: {report['unexpected']}")
    if report["problems"]:
        lines.append(f"PROBLEMS: {report['problems']}")
    lines.append("verdict: " + ("OK" if report["ok"] else "FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-every-s", type=float, default=30.0, help="seconds between faults (default 30)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument("--clip-model", choices=CLIP_MODELS, default=BENCH_CLIP,
                        help=f"CLIP architecture, random weights (default {BENCH_CLIP}; the tiny test model only checks the soak runs)")
    args = parser.parse_args(argv)
    if not (0.25 <= args.minutes <= 24 * 60 and 1 <= args.clients <= 64 and args.fault_every_s > 0):
        parser.error("accepted: --minutes from 0.25 to 1440, --clients from 1 to 64, --fault-every-s > 0")
    progress = (lambda line: print(line, file=sys.stderr)) if args.json else print
    report = soak(args.minutes * 60, args.clients, args.seed, fault_every_s=args.fault_every_s,
                  clip_model=args.clip_model, log=progress)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
