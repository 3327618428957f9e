"""`mai demo`: one scripted minute of Mai's real actor system on a simulated GPU, narrated, plotted and logged.

Everything runs privately: a temporary state dir, a free admin port, a simulated GPU ledger, and the Ollama and
LM Studio doubles (`mai.sim`) as separate processes, so a user's running Mai and ~/.local/state/mai are never
touched. The script is what an agent does (AUTOPILOT with CLIP embeddings and an on-demand VLM, RECORDING with VLM
descriptions, two chat turns, IDLE with an idle unload); Mai's answers come from its real actors. The record
(`events.jsonl`) is what `mai.demo_story` narrates and `mai.demo_plot` draws.

Module imports stay light (stdlib only) because `mai.cli` builds this command's parser on every invocation.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mai.demo_agent import Agent, Console, Recorder, StatusWatcher, write_events
from mai.demo_world import CLIP_MODEL, RESERVE_MB, VLM_MODEL, DemoTiming, DemoWorld, MiB

DEFAULT_DURATION_S = 60.0
DEFAULT_GPU_MB = 8192
DURATION_RANGE_S = (10.0, 600.0)
GPU_RANGE_MB = (2048, 262144)

DESCRIPTION = """\
Watch Mai arbitrate one GPU for a minute, with nothing to install or configure.

mai demo starts Mai's real actor system (a private copy: a temporary state dir and a free port, so a Mai you
run yourself is never touched) against a simulated GPU and simulated Ollama and LM Studio servers, then plays an
agent's session:
  AUTOPILOT   CLIP moves to the GPU; the agent embeds screen crops; it asks for the VLM once, which Mai loads
              on demand (the agent waits for that load) and unloads once it goes unused
  chat        a chat turn: Mai picks the best chat model that fits (a 7B model on LM Studio)
  RECORDING   CLIP goes to the CPU, the chat model yields its VRAM, the VLM loads; the agent describes screens
  chat        a second turn: only a small model fits next to the VLM, so Mai switches to it
  AUTOPILOT   the VLM is unloaded, the freed VRAM confirmed, then CLIP moves back to the GPU
  IDLE        one more on-demand VLM call (the chat model makes room for it), then the idle timer unloads it
While it runs it prints one line whenever the GPU changes (mode, a VRAM bar per owner, what is loading); at
the end it tells what Mai did and why, and checks the simulated GPU's record (no over-commit, no overlapping
VRAM operations).

It writes to --out (default ./mai-demo-<timestamp>):
  timeline.png   VRAM per owner stacked over time, modes shaded, the agent's waits marked, capacity and reserve
  events.jsonl   every event, one JSON object per line: Mai's published events (source "mai"), the simulated
                 GPU's allocations (source "gpu"), the agent's calls and waits (source "agent") and Mai's
                 decisions from its log (source "log")

It takes about --duration-s seconds (default 60), plus 10-20 s to start and stop. Ctrl-C stops everything cleanly
and still writes what was recorded.
"""

EPILOG = """\
examples:
  mai demo                                the one-minute demo, written to ./mai-demo-<timestamp>
  mai demo --duration-s 20 --out /tmp/d   a faster run (loads and timers scale with the duration)
  mai demo --gpu-mb 24576                 a 24 GB GPU: nothing has to yield
  mai demo --gpu-mb 4096                  a 4 GB GPU: the VLM never fits; Mai refuses it and says why
  mai demo --json --no-plot               a machine-readable summary on stdout, no PNG
"""


# --- the script --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Beat:
    """One thing the agent does: `action` is an `Agent` method called with `args`."""

    at_fraction: float  # when it starts, as a fraction of the duration (later if the previous beat ran long)
    phase: str
    text: str
    action: str
    args: tuple[Any, ...] = ()


def script(timing: DemoTiming) -> list[Beat]:
    """The session, the same story at any duration. Where the story needs Mai to have done something first (the
    VLM unloaded before the first chat turn, so the big chat model fits; the idle unload at the end), the agent
    waits for that rather than for a time. In RECORDING the VLM calls are at most 0.1 of the duration apart,
    less than the idle timeout, so the VLM is not idle-unloaded there."""
    return [
        Beat(0.00, "autopilot", "AUTOPILOT: the agent replays a task; Mai puts CLIP on the GPU", "set_mode", ("autopilot",)),
        Beat(0.01, "autopilot", "the agent embeds 16 screen crops and a text query with CLIP", "embed_crops"),
        Beat(0.07, "autopilot", "the agent embeds the next 16 crops", "embed_crops"),
        Beat(0.12, "autopilot", "the agent needs the VLM to resolve a click: Mai loads it on demand", "describe_screen"),
        Beat(0.17, "autopilot", "more CLIP embeddings while the VLM is still warm", "embed_crops"),
        Beat(0.20, "autopilot", "no more VLM calls: the agent works on until Mai unloads the unused VLM",
             "wait_until_vlm_unloaded", (timing.idle_timeout_s + 30,)),
        Beat(0.30, "chat", "the user asks Mai something: a chat turn", "chat_turn",
             ("What was I working on this morning?",)),
        Beat(0.40, "recording", "RECORDING: the agent watches the user; Mai needs the VLM loaded", "set_mode",
             ("recording",)),
        Beat(0.47, "recording", "the agent describes a screenshot with the VLM", "describe_screen"),
        Beat(0.53, "recording", "another screenshot", "describe_screen"),
        Beat(0.58, "chat", "the user asks again while the VLM fills the GPU", "chat_turn", ("And what should I do next?",)),
        Beat(0.63, "recording", "another screenshot", "describe_screen"),
        Beat(0.70, "autopilot", "AUTOPILOT again: the VLM goes, CLIP comes back", "set_mode", ("autopilot",)),
        Beat(0.73, "autopilot", "the agent embeds crops on the GPU again", "embed_crops"),
        Beat(0.78, "idle", "IDLE: the agent pauses; Mai changes nothing", "set_mode", ("idle",)),
        Beat(0.80, "idle", "one last VLM call, then nothing: the idle timer will unload the VLM", "describe_screen"),
        Beat(0.85, "idle", f"waiting for the idle unload ({timing.idle_timeout_s:.0f} s without a VLM lease)",
             "wait_until_vlm_unloaded", (timing.idle_timeout_s + 30,)),
    ]


def play(beats: list[Beat], agent: Agent, t0: float, duration_s: float) -> None:
    for beat in beats:
        delay = t0 + beat.at_fraction * duration_s - time.time()
        if delay > 0:
            time.sleep(delay)
        agent.beat(beat.phase, beat.text)
        getattr(agent, beat.action)(*beat.args)


# --- the command -------------------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `mai demo` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="a one-minute scripted session of Mai on a simulated GPU; writes a timeline PNG "
                                    "and the event log", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=run_demo)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="directory for timeline.png and events.jsonl (default: ./mai-demo-<timestamp>)")
    p.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S, metavar="N",
                   help=f"length of the scripted session in seconds, {DURATION_RANGE_S[0]:.0f} to "
                        f"{DURATION_RANGE_S[1]:.0f} (default {DEFAULT_DURATION_S:.0f})")
    p.add_argument("--gpu-mb", type=int, default=DEFAULT_GPU_MB, metavar="MB",
                   help=f"size of the simulated GPU in MiB, {GPU_RANGE_MB[0]} to {GPU_RANGE_MB[1]} (default "
                        f"{DEFAULT_GPU_MB}: with its {RESERVE_MB} MiB reserve, too small for the VLM, CLIP and a "
                        "chat model at once)")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout at the end (the live lines go to stderr)")
    p.add_argument("--no-plot", action="store_true", help="do not draw timeline.png")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    low, high = DURATION_RANGE_S
    if not low <= args.duration_s <= high:
        return f"--duration-s: got {args.duration_s:g}; accepted: {low:g} to {high:g} seconds"
    low_mb, high_mb = GPU_RANGE_MB
    if not low_mb <= args.gpu_mb <= high_mb:
        return f"--gpu-mb: got {args.gpu_mb}; accepted: {low_mb} to {high_mb} MiB"
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return f"--out: {args.out} exists and is not a directory; accepted: a directory (created if missing)"
    return None


def run_demo(args: argparse.Namespace) -> int:
    """`mai demo`: start the private world, play the script, stop everything, then write and tell what happened.
    Exit status: 0 done, 1 failed (or something was left running), 2 bad arguments, 130 interrupted."""
    from bootstrap.logs import configure_structlog

    problem = _check_args(args)
    if problem:
        print(f"mai demo: {problem}", file=sys.stderr)
        return 2
    configure_structlog("warning")  # this process's own log lines (the stop's) would interleave with the story
    out_dir = (args.out or Path.cwd() / time.strftime("mai-demo-%Y%m%d-%H%M%S")).resolve()
    console = Console(sys.stderr if args.json else sys.stdout, time.time())
    timing = DemoTiming.for_duration(args.duration_s)
    world = DemoWorld(timing, args.gpu_mb)
    console.say(f"mai demo: Mai's real actor system on a simulated {args.gpu_mb / 1024:.1f} GB GPU with Ollama and LM "
                f"Studio doubles, about {args.duration_s:.0f} s (+ 10-20 s to start and stop)", stamp=False)
    console.say(f"  private state dir {world.dir} (removed at the end); your own Mai and its state are not touched",
                stamp=False)
    try:
        recorder, interrupted, error = _session(world, timing, args, console)
    finally:
        world.remove()
    if recorder is None:  # it never got as far as the script: nothing to write
        if args.json:
            print(json.dumps({"error": error, "interrupted": interrupted, "events_jsonl": None, "timeline_png": None}))
        return 130 if interrupted else 1
    return _report(recorder.records(), out_dir, args, console, interrupted, error)


def _session(world: DemoWorld, timing: DemoTiming, args: argparse.Namespace,
             console: Console) -> tuple[Recorder | None, bool, str | None]:
    """Start, play, and always stop; the record gets the ledger's and the log's entries once everything stopped."""
    recorder: Recorder | None = None
    watcher: StatusWatcher | None = None
    agent: Agent | None = None
    error: str | None = None
    interrupted = False
    previous_term = signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops the demo the way Ctrl-C does
    try:
        began = time.monotonic()
        world.start()
        console.say(f"  started the doubles and Mai in {time.monotonic() - began:.1f} s (port "
                    f"{world.cfg.system.admin_port}); bar legend: V VLM, C CLIP, L chat model on LM Studio, O chat "
                    "model on Ollama, . free, : reserve", stamp=False)
        recorder = Recorder(time.time())
        console.t0 = recorder.t0
        recorder.add("demo", "DemoStarted", recorder.t0, duration_s=args.duration_s, gpu_total_bytes=args.gpu_mb * MiB,
                     reserve_bytes=RESERVE_MB * MiB, vlm_model=VLM_MODEL, clip_model=CLIP_MODEL, timing=asdict(timing),
                     admin_port=world.cfg.system.admin_port, state_dir=str(world.dir))
        watcher = StatusWatcher(world, recorder, console)
        watcher.start()
        agent = Agent(world, recorder, console)
        play(script(timing), agent, recorder.t0, args.duration_s)
    except KeyboardInterrupt:
        interrupted = True
        console.say("interrupted: stopping everything (a few seconds)", stamp=False)
    except Exception as err:  # noqa: BLE001 - reported with its reason; everything is still stopped below
        error = f"{type(err).__name__}: {err}"
        console.say(f"mai demo failed: {error}; stopping everything", stamp=False)
    finally:
        # Neither a second Ctrl-C nor a SIGTERM may cut the stop short and leave processes behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            killed, leftovers, extra = _shut_down(world, watcher, agent, recorder.t0 if recorder else 0.0)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
    if recorder is not None:
        for source, type_, t, fields in extra:
            recorder.add(source, type_, t, **fields)
        recorder.add("demo", "DemoEnded", interrupted=interrupted, error=error, killed=killed, leftovers=leftovers,
                     pids=world.pids())
    if leftovers:
        error = error or f"{len(leftovers)} processes were still running after the stop: {leftovers}"
    return recorder, interrupted, error


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _report(records: list[dict[str, Any]], out_dir: Path, args: argparse.Namespace, console: Console,
            interrupted: bool, error: str | None) -> int:
    """Write events.jsonl and timeline.png, tell the story, print the JSON summary if asked."""
    from mai import demo_story

    out_dir.mkdir(parents=True, exist_ok=True)
    events_path = out_dir / "events.jsonl"
    write_events(records, events_path)
    png_path: Path | None = None
    if not args.no_plot:
        try:
            from mai.demo_plot import plot_timeline

            png_path = plot_timeline(records, out_dir / "timeline.png")
        except Exception as err:  # noqa: BLE001 - the run and its record are still worth reporting
            error = error or f"timeline.png not written: {type(err).__name__}: {err}"
    summary = demo_story.summarize(records, events_path=events_path, png_path=png_path)
    summary.update(interrupted=interrupted, error=error)
    console.say("\nWhat Mai did, and why:", stamp=False)
    for line in summary["narrative"] + [""] + demo_story.stall_lines(summary["stalls"]) + [""]:
        console.say(("  " + line).rstrip(), stamp=False)
    console.say(f"The simulated GPU's own record: peak {summary['peak_vram_bytes'] / 2**30:.1f} of "
                f"{summary['gpu_total_bytes'] / 2**30:.1f} GB, {summary['over_commits']} over-commits, "
                f"{summary['overlapping_operations']} overlapping VRAM operations; "
                f"{len(summary['leftover_processes'])} processes left after the stop.", stamp=False)
    console.say(f"wrote {events_path}" + (f"\nwrote {png_path}" if png_path else ""), stamp=False)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    if error:
        print(f"mai demo: {error}", file=sys.stderr)
    return 130 if interrupted else (1 if error else 0)


def _shut_down(world: DemoWorld, watcher: StatusWatcher | None, agent: Agent | None,
               since: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple]]:
    """Stop in order: the status threads and the agent's connections, then Mai, then the doubles. Then collect what
    lives only as long as the temporary directory: the GPU ledger's record and Mai's log. Returns what had to be
    killed, what is still alive, and the collected entries as (source, type, t, fields)."""
    if watcher is not None:
        watcher.stop()
    if agent is not None:
        try:
            agent.close()
        except Exception:  # noqa: BLE001 - closing connections best effort; the processes are stopped next
            pass
    killed = world.stop()
    leftovers = world.leftovers()
    extra: list[tuple] = []
    if world.ledger_path.exists():
        from mai.sim.gpu_ledger import GpuLedger

        for e in GpuLedger(world.ledger_path).events():
            extra.append(("gpu", e.kind, e.t, {"seq": e.seq, "owner": e.owner, "op": e.op, "nbytes": e.nbytes,
                                               "used_after": e.used_after}))
    from mai.demo_story import log_record

    for entry in world.read_log():
        record = log_record(entry)
        if record is not None and record["t"] >= since:  # Mai's start-up is not part of the story
            extra.append(("log", record.pop("type"), record.pop("t"), record))
    return killed, leftovers, extra
