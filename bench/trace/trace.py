"""Traces: what an ExecutionLoop and a chat user ask for over a day, seeded and deterministic.

A trace is two streams of requests, each with the time its client would send it:
- "agent": the ExecutionLoop. It sets modes (AUTOPILOT runs, RECORDING sessions, IDLE gaps) and, inside a mode,
  asks for CLIP embeddings and VLM calls. In AUTOPILOT it acts every ~1.6 s; most actions embed screen crops
  with CLIP, some resolve a click with the VLM. In RECORDING it describes a screenshot with the VLM every few
  seconds and sometimes embeds. In IDLE it asks for nothing.
- "user": a person chatting with Mai: conversations of a few turns, each a reply that streams for seconds.
A client is sequential: it sends its next request at its time or when its previous one is done, whichever is later
(so a stall delays the rest of its stream but is counted once). Mode requests take no time: the client sends them
and goes on, like `set_mode` without `--wait`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("mode", "clip", "vlm", "chat")
STREAMS = ("agent", "user")
MODES = ("autopilot", "recording", "idle")


@dataclass(frozen=True)
class Request:
    at_s: float  # when the client would send it (later if its stream is still busy)
    stream: str  # "agent" | "user"
    kind: str  # KINDS
    service_s: float = 0.0  # clip: embedding on the GPU; vlm: the call with the model on the GPU; chat: the reply
    mode: str = ""  # kind "mode": which

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Request kind: got {self.kind!r}; accepted: {', '.join(KINDS)}")
        if self.stream not in STREAMS:
            raise ValueError(f"Request stream: got {self.stream!r}; accepted: {', '.join(STREAMS)}")
        if self.kind == "mode" and self.mode not in MODES:
            raise ValueError(f"Request mode: got {self.mode!r}; accepted: {', '.join(MODES)}")
        if self.at_s < 0 or self.service_s < 0 or (self.kind != "mode" and self.service_s <= 0):
            raise ValueError(f"Request times: got at_s={self.at_s!r} service_s={self.service_s!r}; accepted: at_s >= 0 "
                             "and service_s > 0 (0 for a mode)")


@dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]  # sorted by time
    duration_s: float  # the nominal length: rates are per hour of it
    seed: int | None = None

    def stream(self, name: str) -> tuple[Request, ...]:
        return tuple(r for r in self.requests if r.stream == name)

    @property
    def hours(self) -> float:
        return self.duration_s / 3600.0

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for r in self.requests if r.kind == k) for k in KINDS}


def make_trace(requests: list[Request], duration_s: float | None = None, seed: int | None = None) -> Trace:
    """A hand-written trace (tests): sorted, with a duration that covers its last request."""
    ordered = tuple(sorted(requests, key=lambda r: (r.at_s, STREAMS.index(r.stream))))
    end = max((r.at_s + r.service_s for r in ordered), default=0.0)
    return Trace(ordered, duration_s if duration_s is not None else max(end, 1.0), seed)


@dataclass(frozen=True)
class DayShape:
    """The knobs of a realistic agent day (seconds). Ranges are (low, high), drawn uniformly."""

    autopilot_run_s: tuple[float, float] = (180.0, 900.0)
    recording_s: tuple[float, float] = (120.0, 600.0)
    idle_s: tuple[float, float] = (60.0, 1200.0)
    action_gap_s: tuple[float, float] = (1.2, 2.0)  # AUTOPILOT: an action every ~1.6 s
    autopilot_clip_p: float = 0.85  # an action embeds crops with CLIP...
    autopilot_vlm_p: float = 0.12  # ...and some resolve a click with the VLM
    vlm_call_s: tuple[float, float] = (1.0, 3.0)
    describe_gap_s: tuple[float, float] = (3.0, 8.0)  # RECORDING: a screenshot described every few seconds
    describe_s: tuple[float, float] = (1.5, 3.5)
    recording_clip_p: float = 0.3
    clip_embed_s: float = 0.02  # on the GPU (the cost model says how much slower on the CPU)
    chat_gap_s: float = 900.0  # mean time between conversations (exponential)
    chat_turns: tuple[int, int] = (2, 8)
    chat_think_s: tuple[float, float] = (15.0, 90.0)  # between a reply and the next message
    chat_reply_s: tuple[float, float] = (4.0, 20.0)
    # Which mode follows which (an agent records a task, replays it, rests).
    after: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=lambda: {
        "idle": (("autopilot", 0.65), ("recording", 0.35)),
        "recording": (("autopilot", 0.6), ("idle", 0.4)),
        "autopilot": (("idle", 0.5), ("recording", 0.3), ("autopilot", 0.2)),
    })


def agent_day(hours: float, seed: int, shape: DayShape | None = None) -> Trace:
    """`hours` of an ExecutionLoop and a chat user, deterministic for a seed."""
    if hours <= 0:
        raise ValueError(f"hours: got {hours!r}; accepted: a number > 0")
    shape = shape or DayShape()
    duration = hours * 3600.0
    rng = random.Random(seed)
    requests = _agent(rng, duration, shape) + _user(random.Random(rng.random()), duration, shape)
    return make_trace(requests, duration, seed)


def _agent(rng: random.Random, duration: float, s: DayShape) -> list[Request]:
    out: list[Request] = []
    t, mode = 0.0, "idle"
    out.append(Request(0.0, "agent", "mode", mode="idle"))
    t = rng.uniform(*s.idle_s) / 4  # the day starts with a short rest
    while t < duration:
        mode = _pick(rng, s.after[mode])
        out.append(Request(t, "agent", "mode", mode=mode))
        if mode == "idle":
            t += rng.uniform(*s.idle_s)
            continue
        end = min(duration, t + rng.uniform(*(s.autopilot_run_s if mode == "autopilot" else s.recording_s)))
        while True:
            t += rng.uniform(*(s.action_gap_s if mode == "autopilot" else s.describe_gap_s))
            if t >= end:
                break
            if mode == "autopilot":
                if rng.random() < s.autopilot_clip_p:
                    out.append(Request(t, "agent", "clip", s.clip_embed_s))
                if rng.random() < s.autopilot_vlm_p:
                    out.append(Request(t, "agent", "vlm", round(rng.uniform(*s.vlm_call_s), 3)))
            else:
                out.append(Request(t, "agent", "vlm", round(rng.uniform(*s.describe_s), 3)))
                if rng.random() < s.recording_clip_p:
                    out.append(Request(t, "agent", "clip", s.clip_embed_s))
        t = end
    return out


def _user(rng: random.Random, duration: float, s: DayShape) -> list[Request]:
    out: list[Request] = []
    t = rng.expovariate(1.0 / s.chat_gap_s)
    while t < duration:
        for _ in range(rng.randint(*s.chat_turns)):
            reply = round(rng.uniform(*s.chat_reply_s), 3)
            out.append(Request(t, "user", "chat", reply))
            t += reply + rng.uniform(*s.chat_think_s)
        t += rng.expovariate(1.0 / s.chat_gap_s)
    return [r for r in out if r.at_s < duration]


def _pick(rng: random.Random, choices: tuple[tuple[str, float], ...]) -> str:
    x, acc = rng.random(), 0.0
    for name, p in choices:
        acc += p
        if x < acc:
            return name
    return choices[-1][0]
