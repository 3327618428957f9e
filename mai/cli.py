"""`mai`: start, stop and watch the GPU arbiter; switch modes. `python -m mai` is the same program."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

from messages.errors import MaiError

EPILOG = """\
examples:
  mai start                     start Mai in the background (logs in <state_dir>/mai.log)
  mai start --foreground        run in this terminal; Ctrl-C stops it
  mai status                    mode, VRAM, VLM, CLIP, degraded parts, actors
  mai status --json             the same as JSON, for scripts
  mai mode recording --wait     move CLIP to the CPU, load the VLM, return when done
  mai events --follow           print events as they happen
  mai chat                      talk to Mai in this terminal (the chat model is chosen per turn)
  mai models                    the chat models: which fits now, which is loaded, preloaded, pinned
  mai switch qwen2.5-3b-instruct  pin a chat model (`mai switch auto` lets Mai choose again)
  mai preload qwen2.5-3b-instruct load a chat model now, so the next turn starts without a load
  mai stop                      stop Mai and everything it started

configuration: config/default.yaml, then --config FILE (or MAI_CONFIG), then MAI_SECTION__KEY variables,
e.g. MAI_OLLAMA__HOST=http://127.0.0.1:11434 or MAI_SYSTEM__ADMIN_PORT=19800.
"""


def _load(args: argparse.Namespace) -> Any:
    from config import load_config

    return load_config(args.config)


def _seconds(text: str) -> float:
    """argparse type for a duration: a finite number > 0 (float() alone takes nan, inf and -5; nan never ends)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"got {text!r}; accepted: a number of seconds > 0")
    return value


def _emit(args: argparse.Namespace, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)


# --- start / stop ---------------------------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from bootstrap import system as boot

    cfg = _load(args)
    if args.foreground:
        from bootstrap.__main__ import run_foreground

        return run_foreground(cfg, console_logs=True)
    if warning := cfg.system.exposure_warning():  # the detached system's own warning reaches console.log only
        print(f"mai: warning: {warning}", file=sys.stderr)
    probe = boot.probe_admin(cfg)
    if probe.kind != "none":
        _emit(args, {"started": False, "running": probe.__dict__}, f"mai: not starting: {probe.describe()}")
        return 0 if probe.kind == "mai" else 1
    try:
        state_dir = boot.prepare_state_dir(cfg)
    except OSError as err:
        print(f"mai: system.state_dir = {str(cfg.system.state_dir)!r} cannot be used: {err.strerror or err}; "
              "accepted: a directory Mai can create and write", file=sys.stderr)
        return 2
    console_log = state_dir / "console.log"
    command = [sys.executable, "-m", "bootstrap", "--quiet"] + (["--config", args.config] if args.config else [])
    with open(console_log, "ab") as out:
        os.chmod(console_log, 0o600)
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + cfg.system.start_timeout_s + 5
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = console_log.read_text(errors="replace").strip().splitlines()[-5:]
            print("mai: start failed:\n  " + "\n  ".join(tail), file=sys.stderr)
            return 1
        if boot.probe_admin(cfg).kind == "mai" and _supervisor_answers(cfg):
            _emit(args, {"started": True, "port": cfg.system.admin_port, "pid": child.pid, "state_dir": str(state_dir)},
                  f"Mai started on {cfg.system.bind_address}:{cfg.system.admin_port} (state dir {state_dir}). "
                  "`mai status` shows what it is doing; `mai stop` stops it.")
            return 0
        time.sleep(0.2)
    print(f"mai: Mai did not come up within {cfg.system.start_timeout_s:.0f} s; see {console_log}", file=sys.stderr)
    return 1


def _supervisor_answers(cfg: Any) -> bool:
    from mai.client import MaiClient
    from bootstrap import system as boot

    try:
        client = MaiClient(cfg, boot.attach(cfg))
    except MaiError:
        return False
    try:
        info = client.system_info(2.0)
        return all(child.address is not None for child in info.children)
    except MaiError:
        return False
    finally:
        client.close()


def cmd_stop(args: argparse.Namespace) -> int:
    from bootstrap import system as boot

    cfg = _load(args)
    with contextlib.redirect_stdout(sys.stderr):  # its log line ("system.stopped") is not the command's output
        report = boot.stop(cfg)
    if not report.was_running:
        _emit(args, report.to_dict(), f"Mai is not running (nothing on port {cfg.system.admin_port}).")
        return 0
    killed = "".join(f"\n  killed pid {k['pid']} ({k['name']})" for k in report.killed)
    _emit(args, report.to_dict(), f"Mai stopped in {report.duration_s:.2f} s." + (killed or " Nothing had to be killed."))
    return 0


# --- status ---------------------------------------------------------------------------------------------------
def _mib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def _bar(used: int, total: int, width: int = 30) -> str:
    filled = round(width * used / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def status_data(client: Any) -> dict:
    info = client.system_info()
    pongs = client.ping_all()
    data: dict[str, Any] = {
        "running": True,
        "version": info.version,
        "address": f"{client.config.system.bind_address}:{client.config.system.admin_port}",
        "uptime_s": round(time.time() - info.started_at, 1),
        "actors": [
            {"role": c.role, "answers": pongs.get(c.role) is not None,
             "pid": getattr(pongs.get(c.role), "pid", None), "restarts": c.restarts}
            for c in info.children
        ],
        "config": info.config,
    }
    try:
        data["gpu"] = client.get_status().to_dict()
    except MaiError as err:
        data["gpu"] = None
        data["gpu_error"] = str(err)
    return data


def doing_text(step: str, seconds: float | None) -> str:
    """"load qwen2.5vl:7b", 47.2 -> "loading qwen2.5vl:7b for 47 s": the step in flight, and for how long."""
    verb, _, rest = step.partition(" ")
    doing = (verb[:-1] if verb.endswith("e") else verb) + "ing"
    text = f"{doing} {rest}".rstrip()
    return text if seconds is None else f"{text} for {seconds:.0f} s"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def processes_text(use: dict | None, vram: dict, source: str) -> str:
    """Who holds the GPU, from NVML's per-process figures: "mai 5.7 GB (ollama 5.1 GB, clip 0.6 GB); other programs:
    1.2 GB (firefox 0.8 GB, Xorg 0.4 GB)"; without them, why not."""
    if use is None:
        why = vram.get("per_process_note") or f"{source} does not report them"
        return f"no per-process figures ({why}): other programs are counted in the device-wide use only"
    mai = sum(part["bytes"] for part in use["mai"])
    parts = ", ".join(f"{part['part']} {_gb(part['bytes'])}" for part in use["mai"])
    others = ", ".join(f"{row['name']} {_gb(row['bytes'])}" for row in use["other_programs"])
    return (f"mai {_gb(mai)}" + (f" ({parts})" if parts else "") + f"; other programs: {_gb(use['other_bytes'])}"
            + (f" ({others})" if others else ""))


def status_text(data: dict) -> str:
    lines = [f"Mai {data['version']} on {data['address']}, up {data['uptime_s']:.0f} s"]
    gpu = data.get("gpu")
    if gpu:
        lines.append(f"mode       {gpu['mode']}" + (f" (switching to {gpu['target_mode']})" if gpu["target_mode"] != gpu["mode"] else ""))
        vram = gpu.get("vram")
        if vram:
            from messages.resources import SOURCE_TEXT

            what = vram["device_name"] if vram["gpu_present"] else "no GPU"
            source = SOURCE_TEXT.get(vram["source"], vram["source"])
            lines.append(f"vram       {_bar(vram['used_bytes'], vram['total_bytes'])} {_mib(vram['used_bytes'])} used / "
                         f"{_mib(vram['total_bytes'])} ({what}, via {source}); reserve {_mib(gpu['reserve_bytes'])}")
            if vram.get("device_uuid"):
                lines.append(f"gpu        {vram['device_name']} {vram['device_uuid']}")
            if vram["gpu_present"]:
                lines.append(f"processes  {processes_text(gpu.get('gpu_use'), vram, source)}")
        if gpu.get("fits_against"):
            lines.append(f"fit checks against {gpu['fits_against']}")
        vlm = gpu["vlm"]
        offload = " PARTIAL CPU OFFLOAD" if vlm.get("partial_offload") else ""
        vlm_state = vlm["state"]
        if vlm_state in ("loading", "unloading") and gpu.get("step_in_flight_s") is not None:
            vlm_state += f" for {gpu['step_in_flight_s']:.0f} s"
        lines.append(f"vlm        {vlm['model']}: {vlm_state}{offload}, footprint {_mib(vlm['footprint_bytes'])}"
                     f"{' (measured)' if vlm['footprint_learned'] else ' (declared)'}, leases {vlm['leases']}")
        clip = gpu["clip"]
        model = clip["model"] or data["config"].get("clip", {}).get("model", "CLIP")
        lines.append(f"clip       {model} on {clip['device']}, {_mib(clip['footprint_bytes'])}"
                     f"{' (measured)' if clip.get('footprint_learned') else ' (declared)'}"
                     + ("" if clip["ready"] else " (not ready: see degraded clip below)"
                        if any(d["part"] == "clip" for d in gpu.get("degraded", []))
                        else " (not ready: the model is still being created, see the log)"))
        chat_fp = gpu.get("chat_footprint_bytes") or 0
        lines.append(f"chat       {gpu.get('chat_model') or '-'}" + (
            f", footprint {_mib(chat_fp)}{' (measured)' if gpu.get('chat_footprint_learned') else ' (declared)'}"
            if gpu.get("chat_model") and chat_fp else ""))
        if gpu.get("step_in_flight") or gpu.get("plan"):
            now = doing_text(gpu["step_in_flight"], gpu.get("step_in_flight_s")) if gpu.get("step_in_flight") else "-"
            lines.append(f"plan       now: {now}; next: {', '.join(gpu['plan']) or '-'}")
        for part in gpu.get("degraded", []):
            lines.append(f"degraded   {part['part']}: {part['reason']}")
    elif data.get("gpu_error"):
        lines.append(f"gpu        status unavailable: {data['gpu_error']}")
    actors = ", ".join(f"{a['role']}{'' if a['answers'] else ' (busy or not answering)'}"
                       + (f" restarted {a['restarts']}x" if a["restarts"] else "") for a in data["actors"])
    lines.append(f"actors     {actors}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from mai.client import connect

    cfg = _load(args)
    try:
        client = connect(config=cfg)
    except MaiError as err:
        _emit(args, {"running": False, "reason": str(err)}, f"mai: {err}")
        return 3
    try:
        data = status_data(client)
    finally:
        client.close()
    _emit(args, data, status_text(data))
    return 0


# --- modes and events -------------------------------------------------------------------------------------------
def cmd_mode(args: argparse.Namespace) -> int:
    from mai.client import connect

    cfg = _load(args)
    if args.mode.lower() not in cfg.modes:  # say so even when Mai is not running
        print(f"mai: mode: got {args.mode!r}; accepted: {', '.join(cfg.modes)}", file=sys.stderr)
        return 2
    timeout_s = args.timeout if args.timeout is not None else cfg.ollama.load_timeout_s + 60
    with connect(config=cfg) as client:
        if args.wait and not args.json:
            reply = _with_progress(client, lambda: client.set_mode(args.mode, wait=True, timeout_s=timeout_s),
                                   f"mode {args.mode.lower()}")
        else:
            reply = client.set_mode(args.mode, wait=args.wait, timeout_s=timeout_s)
    if args.wait:
        _emit(args, {"mode": reply.mode, "duration_s": reply.duration_s, "steps": list(reply.steps)},
              f"mode {reply.mode} reached in {reply.duration_s:.2f} s" + (f": {'; '.join(reply.steps)}" if reply.steps else ""))
    else:
        _emit(args, {"mode": reply.mode, "plan": list(reply.plan)},
              f"mode {reply.mode} accepted" + (f"; plan: {'; '.join(reply.plan)}" if reply.plan else "; nothing to change"))
    return 0


PROGRESS_EVERY_S = 0.5


def _with_progress(client: Any, call: Any, what: str) -> Any:
    """Run `call` (a wait on Mai) and say on stderr what Mai is doing meanwhile: a VLM load takes seconds, a cold
    one from disk much longer, and a silent terminal looks hung. On a terminal one line is redrawn; otherwise a line
    is written each time the step changes. Nothing is shown for a call that returns within the first interval."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=run, name="mai-wait", daemon=True)
    began = time.monotonic()
    worker.start()
    tty = sys.stderr.isatty()
    shown, width = None, 0
    while True:
        worker.join(PROGRESS_EVERY_S)
        if not worker.is_alive():
            break
        try:
            status = client.get_status(timeout_s=2.0)
            step = status.step_in_flight or (status.plan[0] if status.plan else "finishing")
            doing = doing_text(step, status.step_in_flight_s) if status.step_in_flight else step
        except MaiError:
            step = doing = "waiting for Mai to answer"
        line = f"{what}: {doing} ({time.monotonic() - began:.1f} s)"
        if tty:
            print("\r" + line.ljust(width), end="", file=sys.stderr, flush=True)
            width = max(width, len(line))
        elif step != shown:
            print(line, file=sys.stderr, flush=True)
        shown = step
    if tty and width:
        print("\r" + " " * width + "\r", end="", file=sys.stderr, flush=True)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _event_dict(event: Any) -> dict:
    from dataclasses import asdict, is_dataclass

    data = asdict(event) if is_dataclass(event) else {"value": repr(event)}
    return {"type": type(event).__name__, **data}


def _event_text(event: Any) -> str:
    """One line a person reads at a glance: what changed and why (`--json` keeps every field as it is)."""
    d = _event_dict(event)
    kind = d.pop("type")
    at = time.strftime("%H:%M:%S", time.localtime(d.pop("at", time.time())))
    if kind == "ResourceChanged":
        snap = d["snapshot"]
        text = f"used {_mib(snap['used_bytes'])} of {_mib(snap['total_bytes'])} ({d['delta_used_bytes'] / 2**20:+,.0f} MiB)"
    elif kind == "ModeChanged":
        text = f"{d['previous']} -> {d['mode']} in {d['duration_s']:.2f} s" + (f": {'; '.join(d['steps'])}" if d["steps"] else "")
    elif kind == "PlacementChanged":
        text = f"{d['component']} {d['state']} (reason: {d['reason']})"
    elif kind == "IdleUnloaded":
        text = f"{d['model']} unloaded after {d['idle_s']:.0f} s without a request"
    elif kind == "Degraded":
        text = f"{d['part']}: {d['reason']}"
    elif kind == "Recovered":
        text = f"{d['part']} works again"
    elif kind == "PlanRefused":
        text = f"{d['step']}: {d['reason']} (needs {_mib(d['needed_bytes'])}, {_mib(d['free_bytes'])} free)"
    elif kind == "ModelSwitched":
        text = f"{d['previous'] or '-'} -> {d['model']} ({d['reason']})"
    else:
        text = " ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in d.items())
    return f"{at} {kind}: {text}"


def cmd_events(args: argparse.Namespace) -> int:
    from mai.client import connect

    cfg = _load(args)
    seen = 0
    # What it listens for goes to stderr, so `--json` output stays one object per line; silence is then not
    # mistaken for a hang, nor an empty result for a broken command.
    span = "until Ctrl-C" if args.follow else f"for {args.duration:g} s (--follow: until Ctrl-C)"
    print(f"listening to Mai on {cfg.system.bind_address}:{cfg.system.admin_port} {span}", file=sys.stderr, flush=True)
    with connect(config=cfg) as client:
        try:
            for event in client.subscribe(duration_s=None if args.follow else args.duration):
                seen += 1
                print(json.dumps(_event_dict(event), default=str) if args.json else _event_text(event), flush=True)
        except KeyboardInterrupt:
            pass
    if not seen:
        print("no events: nothing changed (a mode change, a VRAM change, a model loaded or unloaded would show)",
              file=sys.stderr)
    return 0


# --- chat models ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from mai.conversation import Mai

    with Mai(config=_load(args)) as m:
        listing = m.list_models()
    if args.json:
        _emit(args, {"current": listing.current, "pinned": listing.pinned, "models": [r.__dict__ for r in listing.rows]}, "")
    else:
        from mai.core.repl_commands import models_table

        print(models_table(listing.rows, listing.current, listing.pinned))
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    from mai.conversation import Mai

    model = None if args.model == "auto" else args.model
    with Mai(config=_load(args)) as m:
        pinned = m.switch_model(model)
    _emit(args, {"pinned": pinned.model, "current": pinned.current},
          f"chat model pinned to {pinned.model} (used from the next reply; `mai switch auto` clears it)" if pinned.model
          else "chat model choice is automatic again")
    return 0


def cmd_preload(args: argparse.Namespace) -> int:
    from mai.conversation import Mai

    cfg = _load(args)
    with Mai(config=cfg) as m:
        if args.json:
            done = m.preload_model(args.model, args.timeout)
        else:
            done = _with_progress(m.client, lambda: m.preload_model(args.model, args.timeout), f"preload {args.model}")
    _emit(args, {"model": done.model, "previous": done.previous, "load_s": done.load_s,
                 "already_loaded": done.already_loaded},
          f"{done.model} was already loaded: the next turn starts at once" if done.already_loaded else
          f"{done.model} loaded in {done.load_s:.1f} s" + (f" (in place of {done.previous})" if done.previous else "")
          + ": the next turn starts without a load; it yields if a mode needs the VRAM")
    return 0


# --- chat ---------------------------------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    from mai.chat_terminal import run_chat

    return run_chat(_load(args))


# --- parser -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mai",
        description="Mai keeps one GPU arranged for what your agent does now: the VLM (Ollama), "
        "the OpenCLIP model and the chat model never fight over VRAM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file on top of the defaults (default: $MAI_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(fn=fn)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("start", cmd_start, "start Mai's actor system (in the background unless --foreground)")
    p.add_argument("--foreground", action="store_true", help="stay in this terminal with live logs; Ctrl-C stops Mai")
    add("stop", cmd_stop, "stop Mai within a bounded time, killing what does not exit (and saying so)")
    add("status", cmd_status, "mode, VRAM, VLM, CLIP, chat model, degraded parts, plan in progress, actors")
    p = add("mode", cmd_mode, "switch mode: autopilot (VLM unloaded, CLIP on the GPU), recording "
            "(CLIP on the CPU, VLM loaded) or idle (no change)")
    p.add_argument("mode", help="autopilot, recording, idle, or a mode added in your config")
    p.add_argument("--wait", action="store_true", help="return when the mode is reached, not when it is accepted")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds to wait with --wait (default: ollama.load_timeout_s + 60, as a cold VLM load can "
                        "take minutes)")
    add("models", cmd_models, "the chat model catalog: availability, loaded state, footprint, why a model is not selectable now")
    p = add("switch", cmd_switch, "pin a chat model until cleared (`mai switch auto` clears the pin)")
    p.add_argument("model", help="a model key from `mai models`, or auto")
    p = add("events", cmd_events, "print events: mode changes, VRAM changes, idle unloads, degraded parts")
    p.add_argument("--follow", action="store_true", help="keep printing until Ctrl-C")
    p.add_argument("--duration", type=_seconds, default=10.0, help="without --follow: seconds to listen (default 10)")
    p = add("preload", cmd_preload, "load a chat model now, through the GPU gate, so the next turn starts without "
            "a load")
    p.description = (
        "Load MODEL now, as a turn would (the GPU gate grants it only when it fits), so the next turn finds it "
        "ready. It becomes the current chat model: a simple turn stays on it, a turn that needs more (long code, "
        "reasoning, a longer window) may still move to a better model, and it yields like any idle chat model when "
        "a mode needs its VRAM. A model that does not fit is refused with the bytes needed, what is free and what "
        "would have to yield.\n\nexamples:\n  mai preload qwen2.5-3b-instruct\n  mai preload llama3.2:3b --json")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", help="a chat model key from `mai models`")
    p.add_argument("--timeout", type=_seconds, default=300.0,
                   help="seconds to wait for the gate and the load (default 300: a cold load can take minutes)")
    add("chat", cmd_chat, "chat with Mai in this terminal; /help there lists the commands", json_flag=False)
    from mai.demo import add_parser as add_demo_parser  # stdlib-only at import: `mai status` stays fast

    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"mai: {err}", file=sys.stderr)
        return 2
    except MaiError as err:
        if getattr(args, "json", False):
            print(json.dumps({"error": err.reason.value, "message": str(err), "details": err.details}, default=str))
        else:
            print(f"mai: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mai status --json | head`: the reader left; say nothing, as `git log | head` does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    except OSError as err:  # a file or socket the configuration names, refused by the system: no traceback
        print(f"mai: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
