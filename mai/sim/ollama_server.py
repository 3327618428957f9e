"""A wire-faithful Ollama server for tests and `mai demo`, run as its own process on loopback.

    python -m mai.sim.ollama_server --port 0 --port-file F [--ledger PATH] [--models JSON_OR_PATH]
                                    [--load-time-s X] [--unload-delay-s X] [--vram-mb N]

It serves Ollama's routes with the bodies, status codes and NDJSON framing of `shared/reference/ollama.md`
(§1-§4, §11) and imitates the parts of Ollama's scheduler that Mai depends on, as read in `ollama/ollama@fb30760`
(`shared/reference/real-servers.md` §1):
- names resolve case-insensitively with the default host, namespace and tag; /api/ps and /api/tags print the
  shortest form and carry `digest` (`types/model/name.go:146-249`, `server/routes.go:1222-1245, 2271-2290`);
- runners are keyed by model file, so tags aliasing one model share one runner listed under the first loader's
  name, while replies echo `model` as sent (`server/sched.go:107-127, 196-203`; `server/routes.go:403-415, 476-486`);
- a load writes nothing until it is done, is not listed in /api/ps meanwhile, and is aborted when its client
  disconnects (`server/routes.go:476-486`; `server/sched.go:627, 700-735, 1745-1765`; `llm/llama_server.go:1296-1302`);
- keep_alive 0 expires a runner at once (`server/sched.go:1713-1731`); one still serving requests stays, and a later
  request carrying keep_alive revives it (`useLoadedRunner`, `server/sched.go:367-410, 475-492`);
- a second model loads only if it fits in 80 % of free memory, else the shortest keep_alive goes first
  (`server/sched.go:544-561, 1663-1693`); a load OOM beside other models evicts them all and retries once
  (`server/sched.go:316-326, 665-669`); a runtime OOM expires every runner (`server/sched.go:1632-1661`, called at
  `server/routes.go:736`); a lone model that does not fit is partially offloaded;
- OOM texts vary among real llama-server texts, all matching `llm/status.go:85-96`;
- a request without num_ctx gets the VRAM-tiered default (`server/routes.go:2043-2057`), capped at the training
  context (`server/sched.go:161-167`), and the default keep_alive 5m;
- thinking-capable models stream `thinking` before the content unless `think` is false; `think` true on another
  model is 400 `"X" does not support thinking` (`server/routes.go:453-464, 2615-2632`).
VRAM comes from the shared `GpuLedger` (`--ledger`), so the simulated GPU is the same one Mai's other simulated users
see; without one a private ledger of `--vram-mb` is used.

Chat replies are derived from the whole request (see `chat_reply`) so tests can prove which context reached the
model. Routes under `/_double/` are not Ollama's: they expose the request log, runtime configuration, fault
injection (oom, busy, error500, notfound, midstream, drop, hang) and `ollama rm` of a loaded model, for tests.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from config.ollama_names import parse_ollama_name
from mai.sim.gpu_ledger import GpuLedger
from messages.errors import InvalidRequest, OutOfMemory

VERSION = "0.33.0"
MiB = 1024 * 1024
GiB = 1024 * MiB

# Options that decide how a runner is loaded: a request whose values differ reloads the model (ollama.md §5).
LOAD_OPTION_KEYS = ("num_ctx", "num_gpu", "num_batch", "main_gpu", "use_mmap", "num_thread")
FOREVER_S = math.inf
FOREVER_SHOWN_S = 292 * 365.2425 * 86400  # expires_at of a pinned model: now + math.MaxInt64 ns (~year 2318)
OWNER_PREFIX = "ollama:"  # ledger owner of a runner: "ollama:<model>"

# What llama-server and its backends print when memory runs out; each contains one of llm/status.go:85-96's
# substrings. A failed load wraps it (llm/llama_server.go:1371-1376); a runtime one ends the stream with it.
OOM_TEXTS = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 6144.00 MiB on device 0: cudaMalloc failed: out of memory",
    "ggml_vulkan: Device memory allocation of size 1073741824 failed: VK_ERROR_OUT_OF_DEVICE_MEMORY",
    "llama_init_from_model: failed to initialize the context: insufficient memory for the KV cache",
    "unable to allocate CUDA0 buffer: failed to allocate buffer of size 6442450944",
    "ggml_backend_cpu_buffer_type_alloc_buffer: not enough memory to allocate 2147483648 bytes",
    "CUDA error: out of memory\n  current device: 0, in function ggml_backend_cuda_synchronize",
    "hipMalloc failed: out of device memory",
    "ggml_gallocr_reserve_n: graph buffer allocation failed",
)
LOAD_OOM_PREFIX = "llama-server reported out-of-memory during startup: "
RUNTIME_ERROR_PREFIX = "an error was encountered while running the model: "
FIT_FRACTION = 0.8  # a second model loads beside others only within 80 % of free memory (sched.go:549-550)
RUNNER_ERROR = "llama runner process has terminated: exit status 2"
MIDSTREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
FAULTS = ("oom", "busy", "error500", "notfound", "midstream", "drop", "hang")  # oom: at load, or mid-reply


# -- installed models ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One installed model, as `--models` describes it. `name` is its shortest display form; `digest` names its
    manifest, shared by aliases (`{"name": "vlm:latest", "alias_of": "qwen2.5vl:7b"}`, like `ollama cp`)."""

    name: str
    size_bytes: int
    capabilities: tuple[str, ...] = ("completion",)
    context_length: int = 4096
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = "Q4_K_M"
    digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", parse_ollama_name(self.name).display_shortest())
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.name.lower().encode()).hexdigest())

    @classmethod
    def from_json(cls, raw: dict[str, Any], known: dict[str, ModelSpec] | None = None) -> ModelSpec:
        name = parse_ollama_name(raw["name"]).display_shortest()
        target = None
        if raw.get("alias_of"):
            target = next((m for m in (known or {}).values() if _same_name(m.name, raw["alias_of"])), None)
            if target is None:
                raise ValueError(f"{name}: alias_of {raw['alias_of']!r} is not listed before it")
            return replace(target, name=name)
        return cls(
            name=name,
            size_bytes=int(raw["size_bytes"]),
            capabilities=tuple(raw.get("capabilities", ("completion",))),
            context_length=int(raw.get("context_length", 4096)),
            family=raw.get("family") or re.sub(r"[^a-z0-9]", "", name.split(":")[0].lower()),
            parameter_size=raw.get("parameter_size", ""),
            quantization_level=raw.get("quantization_level", "Q4_K_M"),
        )

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _same_name(a: str, b: str) -> bool:
    return parse_ollama_name(a).key() == parse_ollama_name(b).key()


DEFAULT_MODELS = (
    ModelSpec("qwen2.5vl:7b", 6 * GiB, ("completion", "vision"), 128000, "qwen25vl", "8.3B"),
    ModelSpec("llama3.2:3b", 3400 * MiB, ("completion", "tools"), 131072, "llama", "3.2B"),
    ModelSpec("qwen2.5:0.5b", 800 * MiB, ("completion", "tools"), 32768, "qwen2", "494.03M"),
    ModelSpec("nomic-embed-text:latest", 300 * MiB, ("embedding",), 2048, "nomic-bert", "137M", "F16"),
    ModelSpec("qwen3:0.6b", 520 * MiB, ("completion", "tools", "thinking"), 40960, "qwen3", "751.63M"),
)


def load_models(arg: str | None) -> tuple[ModelSpec, ...]:
    """`--models`: a JSON list, or the path of a file holding one; None means `DEFAULT_MODELS`."""
    if not arg:
        return DEFAULT_MODELS
    text = arg if arg.lstrip().startswith("[") else Path(arg).read_text()
    known: dict[str, ModelSpec] = {}
    for item in json.loads(text):
        spec = ModelSpec.from_json(item, known)
        known[spec.name] = spec
    return tuple(known.values())


# -- runtime configuration (startup flags, changed by POST /_double/config) ------------------------------------


@dataclass
class DoubleConfig:
    load_time_s: float = 0.5  # how long a load holds the GPU before the runner is ready
    unload_delay_s: float = 0.3  # from the unload reply until the model leaves /api/ps
    vram_release_lag_s: float = 0.0  # VRAM comes back this long after the model left /api/ps
    token_delay_s: float = 0.005  # between streamed chunks
    default_keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE
    default_num_ctx: int | None = None  # a request without num_ctx gets this; None: Ollama's VRAM-tiered default
    min_vram_fraction: float = 0.25  # a lone model that cannot get this share of its size on the GPU is an OOM
    max_loaded_models: int = 3  # OLLAMA_MAX_LOADED_MODELS default: 3 x one GPU
    fail_next: str | None = None  # a fault from FAULTS for the next `fail_count` requests on `fail_paths`
    fail_count: int = 0
    fail_paths: tuple[str, ...] = ("/api/generate", "/api/chat")
    hang_s: float = 30.0  # how long a "hang" fault stalls before answering normally

    def updated(self, changes: dict[str, Any]) -> DoubleConfig:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ApiError(400, f"unknown config keys {unknown}; known: {sorted(known)}")
        if changes.get("fail_next") not in (None, *FAULTS):
            raise ApiError(400, f"fail_next must be one of {FAULTS} or null")
        changes = dict(changes)
        if "fail_paths" in changes:
            changes["fail_paths"] = tuple(changes["fail_paths"])
        if changes.get("fail_next") and "fail_count" not in changes:
            changes["fail_count"] = 1
        return replace(self, **changes)


class ApiError(Exception):
    """An HTTP error reply with Ollama's body `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- keep_alive (ollama.md §4) ---------------------------------------------------------------------------------

_DURATION_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's `time.ParseDuration`, in seconds, with its error messages ("300" has no unit and is an error)."""
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {json.dumps(text)}")
    total = 0.0
    while rest:
        number = re.match(r"\d*(\.\d*)?", rest).group(0)
        if number in ("", "."):
            raise ValueError(f"time: invalid duration {json.dumps(text)}")
        rest = rest[len(number) :]
        unit = re.match(r"[^\d.]*", rest).group(0)
        if not unit:
            raise ValueError(f"time: missing unit in duration {json.dumps(text)}")
        if unit not in _DURATION_UNITS_S:
            raise ValueError(f"time: unknown unit {json.dumps(unit)} in duration {json.dumps(text)}")
        total += float(number) * _DURATION_UNITS_S[unit]
        rest = rest[len(unit) :]
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded after the last request; `FOREVER_S` for negative values; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, "Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        return FOREVER_S if value < 0 else float(value)
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return FOREVER_S if seconds < 0 else seconds
    go_type = {dict: "map[string]interface {}", list: "[]interface {}"}.get(type(value), type(value).__name__)
    raise ApiError(400, f"Unsupported type: '{go_type}'")


# -- replies derived from the request (so tests can prove the context reached the model) ---------------------


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def image_digest(images: list[str]) -> str:
    """8 hex of the sha1 over the decoded bytes of base64 images, in order."""
    h = hashlib.sha1()
    for img in images:
        try:
            h.update(base64.b64decode(img, validate=False))
        except (binascii.Error, ValueError):
            h.update(img.encode())
    return h.hexdigest()[:8]


def chat_reply(model: str, messages: list[dict[str, Any]]) -> str:
    """The assistant text for a chat: it names the model, the message count, the last user text, a digest of
    every role and content in order, and the images (count and digest) if any were sent."""
    h = hashlib.sha1()
    for m in messages:
        h.update(f"{m.get('role', '')}\x00{m.get('content') or ''}\x00".encode())
    last_user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"[{model}] messages={len(messages)} last_user={_short(last_user)} digest={h.hexdigest()[:8]}"
    images = [img for m in messages for img in (m.get("images") or [])]
    if images:
        text += f" images={len(images)} image_digest={image_digest(images)}"
    return text


def generate_reply(model: str, prompt: str, images: list[str]) -> str:
    text = f"[{model}] prompt={_short(prompt)} digest={hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
    if images:
        text += f" images={len(images)} image_digest={image_digest(images)}"
    return text


def thinking_reply(model: str, asked: str) -> str:
    """The reasoning a thinking model streams before its answer (O15): it names the model and what was asked."""
    return f"[{model}] thinking about: {_short(asked)}"


def split_chunks(text: str) -> list[str]:
    """Word-sized pieces that join back to `text`, streamed one per line."""
    return re.findall(r"\S+\s*|\s+", text)


def rfc3339(ts: float, *, local: bool = False) -> str:
    """Go's RFC3339Nano with 9 fractional digits; `local` uses the server's offset like Ollama's expires_at."""
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    if local:
        dt = dt.astimezone()
    offset = dt.utcoffset()
    if not offset:
        zone = "Z"
    else:
        minutes = int(offset.total_seconds() // 60)
        zone = f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond:06d}000" + zone


# -- the scheduler -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Runner:
    """A loaded (or loading, or stopping) model. `expires_at` is the idle deadline while `refs` is 0 and the
    runner is ready; while requests run it keeps its old value, as Ollama's /api/ps shows it."""

    spec: ModelSpec
    options: dict[str, Any]
    keep_alive_s: float
    expires_at: float
    size_vram: int = 0
    refs: int = 0
    state: str = "loading"  # loading | ready | stopping

    @property
    def owner(self) -> str:
        return OWNER_PREFIX + self.spec.name


def _shown_expiry(now: float, keep_alive_s: float) -> float:
    return now + (FOREVER_SHOWN_S if math.isinf(keep_alive_s) else keep_alive_s)


class SimulatedOllama:
    """The server's state: installed models, runners, config and the request log.

    Locking: `_cond` guards all fields and is held only briefly; `_gpu` serialises VRAM-changing work (loads,
    unloads, evictions) and is held across their simulated durations, so the double never overlaps its own GPU
    operations, like Ollama's single scheduler loop.
    """

    def __init__(self, models: tuple[ModelSpec, ...], config: DoubleConfig, ledger: GpuLedger) -> None:
        self.models = {m.name: m for m in models}
        self._initial_models = dict(self.models)
        self._oom_count = 0  # picks the next of OOM_TEXTS: the texts vary as the real ones do
        self.ledger = ledger
        self._initial_config = config
        self.config = config
        self._cond = threading.Condition()
        self._gpu = threading.Lock()
        self._runners: dict[str, Runner] = {}
        self._log: list[dict[str, Any]] = []
        self._generation = 0  # bumped by reset(): cuts simulated waits (loads, unloads, hangs) short
        self._stopped = threading.Event()
        self._reclaim_stale()
        threading.Thread(target=self._expire_loop, name="keep-alive", daemon=True).start()

    # -- log, config, faults ------------------------------------------------------------------------------------

    def log_request(self, method: str, path: str, body: Any) -> dict[str, Any]:
        entry = {"kind": "request", "t": time.time(), "method": method, "path": path, "body": body}
        with self._cond:
            self._log.append(entry)
        return entry

    def log_event(self, kind: str, **fields_: Any) -> None:
        with self._cond:
            self._log.append({"kind": kind, "t": time.time(), **fields_})

    def log_entries(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._log)

    def configure(self, changes: dict[str, Any]) -> DoubleConfig:
        with self._cond:
            self.config = self.config.updated(changes)
            return self.config

    def take_fault(self, path: str) -> str | None:
        with self._cond:
            cfg = self.config
            if not cfg.fail_next or cfg.fail_count <= 0 or path not in cfg.fail_paths:
                return None
            remaining = cfg.fail_count - 1
            self.config = replace(cfg, fail_count=remaining, fail_next=cfg.fail_next if remaining else None)
            return cfg.fail_next

    def hang(self) -> bool:
        """Stall like a wedged server; True if the stall ran its course, False if reset() or stop() cut it."""
        return self._pause(self.config.hang_s)

    def _pause(self, seconds: float) -> bool:
        """Sleep for a simulated duration; False if reset() or stop() cut it short."""
        with self._cond:
            generation = self._generation
            interrupted = self._cond.wait_for(
                lambda: self._generation != generation or self._stopped.is_set(), timeout=seconds
            )
        return not interrupted

    def resolve(self, name: Any) -> ModelSpec:
        """The installed model `name` means: parsed with the defaults, compared without case (routes.go:261-296)."""
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "model is required")
        try:
            wanted = parse_ollama_name(name).key()
        except InvalidRequest:
            raise ApiError(400, "invalid model name") from None
        with self._cond:
            spec = next((m for m in self.models.values() if parse_ollama_name(m.name).key() == wanted), None)
        if spec is None:
            raise ApiError(404, f"model '{name}' not found")
        return spec

    def remove_model(self, name: str) -> None:
        """`ollama rm` while it is loaded: gone from /api/tags, its runner stays listed (ollama/ollama#4443)."""
        spec = self.resolve(name)
        with self._cond:
            del self.models[spec.name]
        self.log_event("removed", model=spec.name)

    def default_num_ctx(self) -> int:
        """OLLAMA_CONTEXT_LENGTH unset: 4k below 23 GiB of VRAM, 32k below 47 GiB, 256k above (routes.go:2043-2057)."""
        if self.config.default_num_ctx is not None:
            return self.config.default_num_ctx
        total = self.ledger.snapshot().total_bytes
        return 262144 if total >= 47 * GiB else 32768 if total >= 23 * GiB else 4096

    def load_options(self, options: Any) -> dict[str, Any]:
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ApiError(400, "json: cannot unmarshal options into Go struct field of type map[string]interface {}")
        effective: dict[str, Any] = {"num_ctx": self.default_num_ctx()}
        effective.update({k: v for k, v in options.items() if k in LOAD_OPTION_KEYS})
        return effective

    def next_oom_text(self) -> str:
        with self._cond:
            self._oom_count += 1
            return OOM_TEXTS[(self._oom_count - 1) % len(OOM_TEXTS)]

    # -- requests using a runner -------------------------------------------------------------------------------

    def acquire(self, spec: ModelSpec, options: dict[str, Any], keep_alive_s: float | None,
                client_gone: Callable[[], bool] | None = None, *, inject_oom: bool = False) -> tuple[Runner, float]:
        """A ready runner for `spec` with these load options, its reference taken; loads (evicting or reloading
        first) when needed. Returns the runner and the seconds spent loading. A load whose client is gone
        (`client_gone()`) is aborted, as Ollama does. `inject_oom`: the load's first try runs out of memory.

        A load that runs out of memory while other models are loaded evicts them all and retries once
        (sched.go:316-326, 665-669); otherwise the OOM is a 500."""
        while True:
            with self._cond:
                runner = self._usable(spec, options, keep_alive_s)
                if runner:
                    return runner, 0.0
            with self._gpu:
                with self._cond:
                    if self._usable(spec, options, keep_alive_s, peek=True):
                        continue  # someone else loaded it while we waited for the GPU
                    current = self._runners.get(spec.digest)
                if current is not None:
                    if current.state == "ready":  # loaded with other options: Ollama silently reloads
                        self.log_event("reload", model=spec.name, old_options=current.options, new_options=options)
                    self._unload_locked(current, wait_vram=True)
                started = time.monotonic()
                for attempt in (1, 2):
                    try:
                        runner = self._load_locked(spec, options, keep_alive_s, client_gone,
                                                   inject_oom=inject_oom and attempt == 1)
                        return runner, time.monotonic() - started
                    except _LoadOutOfMemory as oom:
                        with self._cond:
                            others = [r for r in self._runners.values() if r.spec.digest != spec.digest]
                        if attempt == 2 or not others:
                            raise ApiError(500, LOAD_OOM_PREFIX + oom.text) from None
                        self.log_event("evict_all", for_model=spec.name, reason="load_oom",
                                       models=[r.spec.name for r in others])
                        for victim in others:
                            self._unload_locked(victim, wait_vram=True)
                raise AssertionError("unreachable")

    def _usable(
        self, spec: ModelSpec, options: dict[str, Any], keep_alive_s: float | None, *, peek: bool = False
    ) -> Runner | None:
        """useLoadedRunner (sched.go:475-492): a ready runner with the same options serves, even one expired by
        keep_alive 0 that still has requests; a request carrying keep_alive sets its duration (and so revives
        it), one without leaves it as it is."""
        runner = self._runners.get(spec.digest)
        if runner is None or runner.state != "ready" or runner.options != options:
            return None
        if not peek:
            runner.refs += 1  # the idle timer stops; expires_at keeps its old value
            if keep_alive_s is not None:
                runner.keep_alive_s = keep_alive_s  # the last keep_alive sent wins
        return runner

    def release(self, runner: Runner) -> None:
        """The last request done: the idle timer starts (keep_alive 0 expires it at once, via the expire loop)."""
        with self._cond:
            runner.refs -= 1
            if runner.refs == 0 and runner.state == "ready":
                runner.expires_at = _shown_expiry(time.time(), runner.keep_alive_s)
            self._cond.notify_all()

    def request_unload(self, spec: ModelSpec) -> None:
        """keep_alive 0 with nothing to run (expireRunner, sched.go:1713-1731): expires_at is now and the duration
        0; an idle runner goes at once, a busy one when its requests are done, unless a later request carrying
        keep_alive revives it first. A model still loading is not in the loaded set yet: a no-op."""
        with self._cond:
            runner = self._runners.get(spec.digest)
            if runner is None or runner.state != "ready":
                return
            runner.keep_alive_s, runner.expires_at = 0.0, time.time()
            if runner.refs > 0:
                return
            runner.state = "stopping"
        self._unload_in_background(runner)

    def expire_all_for_runtime_oom(self) -> None:
        """expireRunnersForRuntimeOOM (sched.go:1632-1661): every runner's duration becomes 0; idle ones go now,
        busy ones when their requests end (or a keep_alive revives them); expires_at is left as it was."""
        with self._cond:
            idle = []
            for runner in self._runners.values():
                if runner.state != "ready":
                    continue
                runner.keep_alive_s = 0.0
                if runner.refs == 0:
                    runner.state = "stopping"
                    idle.append(runner)
        self.log_event("expire_all", reason="runtime_oom", models=[r.spec.name for r in idle])
        for runner in idle:
            self._unload_in_background(runner)

    # -- VRAM-changing work (caller holds _gpu) ---------------------------------------------------------------

    def _load_locked(self, spec: ModelSpec, options: dict[str, Any], keep_alive_s: float | None,
                     client_gone: Callable[[], bool] | None = None, *, inject_oom: bool = False) -> Runner:
        cfg = self.config
        keep_alive = cfg.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        self._make_room(spec)
        runner = Runner(spec, options, keep_alive, _shown_expiry(time.time(), keep_alive), refs=1)
        with self._cond:
            lone = not self._runners
        self.ledger.begin(runner.owner, "load")
        try:
            try:
                if inject_oom:
                    raise OutOfMemory("injected")
                if spec.size_bytes <= self.ledger.snapshot().free_bytes or not lone:
                    granted = self.ledger.allocate(runner.owner, spec.size_bytes)
                else:  # a lone model that does not fit is partially offloaded to the CPU (llama-server --fit)
                    minimum = math.ceil(cfg.min_vram_fraction * spec.size_bytes)
                    granted = self.ledger.allocate(runner.owner, minimum)  # OOM if not even this fits
                    granted += self.ledger.allocate(runner.owner, spec.size_bytes - minimum, allow_partial=True)
            except OutOfMemory as exc:
                text = self.next_oom_text()
                self.log_event("oom", model=spec.name, error=str(exc), text=text)
                raise _LoadOutOfMemory(text) from None
            runner.size_vram = granted
            with self._cond:
                self._runners[spec.digest] = runner  # not in /api/ps while loading (state "loading")
            if not self._load_until_ready(cfg.load_time_s, client_gone):
                # "client connection closed before llama-server finished loading, aborting load" (499)
                with self._cond:
                    self._runners.pop(spec.digest, None)
                    self._cond.notify_all()
                self.ledger.free(runner.owner)
                self.log_event("load_aborted", model=spec.name, reason="client disconnected")
                raise _Dropped()
        finally:
            self.ledger.end(runner.owner, "load")
        with self._cond:
            runner.state = "ready"
            self._cond.notify_all()
        self.log_event("load", model=spec.name, options=options, size=spec.size_bytes, size_vram=runner.size_vram)
        return runner

    def _load_until_ready(self, load_time_s: float, client_gone: Callable[[], bool] | None) -> bool:
        """Spend the load time; False as soon as the client has gone (a reset or stop just ends the wait)."""
        deadline = time.monotonic() + load_time_s
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._pause(min(remaining, 0.05)):
                return True
            if client_gone is not None and client_gone():
                return False
        return True

    def _make_room(self, spec: ModelSpec) -> None:
        """Evict until `spec` fits in 80 % of free memory beside the others (a lone model always goes ahead) and
        the model cap allows one more: shortest keep_alive first, then by name, idle runners before busy ones
        (findRunnerToUnload, sched.go:1663-1693). A pinned model (keep_alive forever) goes last, but it goes."""
        while True:
            free = self.ledger.snapshot().free_bytes
            with self._cond:
                others = [r for r in self._runners.values() if r.spec.digest != spec.digest]
                too_many = len(others) >= self.config.max_loaded_models
                if not others or (spec.size_bytes <= FIT_FRACTION * free and not too_many):
                    return
                ranked = sorted(others, key=lambda r: (r.state != "stopping", r.keep_alive_s, r.spec.name))
                victim = next((r for r in ranked if r.refs == 0), ranked[0])
            self.log_event("evict", model=victim.spec.name, for_model=spec.name,
                           reason="max_loaded_models" if too_many else "vram", free_bytes=free)
            self._unload_locked(victim, wait_vram=True)

    def _unload_locked(self, runner: Runner, *, wait_vram: bool = False) -> None:
        """Stop `runner` once its requests are done; it leaves /api/ps after `unload_delay_s`. `wait_vram` then
        waits (at most 5 s) for lagging VRAM to come back, like Ollama's waitForVRAMRecovery before a load."""
        with self._cond:
            if self._runners.get(runner.spec.digest) is not runner:
                return  # already gone
            if runner.state != "stopping":
                runner.state, runner.expires_at = "stopping", min(runner.expires_at, time.time())
            self._cond.wait_for(lambda: runner.refs <= 0)
        cfg = self.config
        self.ledger.begin(runner.owner, "unload")
        self._pause(cfg.unload_delay_s)
        self.ledger.free(runner.owner, delay_s=cfg.vram_release_lag_s)
        self.ledger.end(runner.owner, "unload")
        with self._cond:
            if self._runners.get(runner.spec.digest) is runner:
                del self._runners[runner.spec.digest]
            self._cond.notify_all()
        self.log_event("unloaded", model=runner.spec.name)
        if wait_vram and cfg.vram_release_lag_s > 0:
            self._pause(min(cfg.vram_release_lag_s, 5.0))

    def _unload_in_background(self, runner: Runner) -> None:
        def work() -> None:
            with self._gpu:
                self._unload_locked(runner)

        threading.Thread(target=work, name=f"unload-{runner.spec.name}", daemon=True).start()

    def _expire_loop(self) -> None:
        while not self._stopped.wait(0.02):
            now = time.time()
            with self._cond:
                due = [
                    r for r in self._runners.values()
                    if r.state == "ready" and r.refs == 0 and r.expires_at <= now
                ]
                for runner in due:
                    runner.state = "stopping"
            for runner in due:
                self.log_event("expire", model=runner.spec.name, keep_alive_s=runner.keep_alive_s)
                self._unload_in_background(runner)

    # -- views, reset, shutdown ------------------------------------------------------------------------------

    def ps(self) -> list[dict[str, Any]]:
        """The loaded set only: a runner still loading is not in it (sched.go:700-735, 1745-1765)."""
        with self._cond:
            runners = sorted((r for r in self._runners.values() if r.state != "loading"),
                             key=lambda r: r.expires_at, reverse=True)
            return [
                {
                    "name": r.spec.name,
                    "model": r.spec.name,
                    "size": r.spec.size_bytes,
                    "size_vram": r.size_vram,
                    "digest": r.spec.digest,
                    "details": r.spec.details(),
                    "expires_at": rfc3339(r.expires_at, local=True),
                    "context_length": min(int(r.options.get("num_ctx", 0)) or r.spec.context_length,
                                          r.spec.context_length),
                }
                for r in runners
            ]

    def state(self) -> dict[str, Any]:
        with self._cond:
            runners = [
                {"model": r.spec.name, "state": r.state, "refs": r.refs, "options": r.options,
                 "keep_alive_s": None if math.isinf(r.keep_alive_s) else r.keep_alive_s, "size_vram": r.size_vram}
                for r in self._runners.values()
            ]
            return {"runners": runners, "config": asdict(self.config)}

    def reset(self) -> None:
        """Back to startup: nothing loaded (VRAM freed at once), empty log, startup config and models, stalls
        released."""
        with self._cond:
            self._generation += 1  # cuts simulated loads, unloads and hangs short
            self._cond.notify_all()
        got_gpu = self._gpu.acquire(timeout=5.0)
        try:
            with self._cond:
                self._runners.clear()
                self._log.clear()
                self.config = self._initial_config
                self.models = dict(self._initial_models)
                self._oom_count = 0
                self._cond.notify_all()
            self._reclaim_stale()
        finally:
            if got_gpu:
                self._gpu.release()

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()

    def _reclaim_stale(self) -> None:
        # Runners die with the server, and the driver gives their VRAM back.
        for owner in self.ledger.usage():
            if owner.startswith(OWNER_PREFIX):
                self.ledger.free(owner)


# -- HTTP ----------------------------------------------------------------------------------------------------

_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
}


class _Dropped(Exception):
    """The handler closed the connection on purpose (a "drop" fault)."""


class _LoadOutOfMemory(Exception):
    """A load ran out of memory; `text` is what llama-server printed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class OllamaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, as the real server
    # TCP_NODELAY, as Go's net/http sets it: otherwise a body written after its headers waits for the client's
    # delayed ACK, and every request on a kept-alive connection takes ~40 ms more than the simulated work.
    disable_nagle_algorithm = True
    server_version = "SimulatedOllama/" + VERSION
    sys_version = ""

    @property
    def sim(self) -> SimulatedOllama:
        return self.server.sim  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is /_double/log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- dispatch ------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        raw = self._read_body()
        if path.startswith("/_double/"):
            return self._control(method, path, raw)
        entry = self.sim.log_request(method, path, _loggable(raw))
        self._status = 0
        try:
            if path not in _ROUTES:
                return self._send_text(404, "404 page not found")
            if method not in _ROUTES[path]:
                return self._send_text(405, "405 method not allowed")
            fault = self.sim.take_fault(path)
            if fault:
                entry["fault"] = fault
            self._route(method, path, raw, fault)
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except (_Dropped, OSError):  # a drop fault, or the client went away
            self.close_connection = True
        except Exception as exc:  # a bug in the double: say so on the wire rather than hang up silently
            traceback.print_exc()
            self.close_connection = True
            if not self._status:
                self._send_json(500, {"error": f"Ollama double internal error: {exc!r}"})
        finally:
            entry["status"] = self._status

    def _route(self, method: str, path: str, raw: bytes, fault: str | None) -> None:
        if fault == "hang" and (not self.sim.hang() or self._client_gone()):
            self._drop()  # cut short, or the client gave up meanwhile: Ollama drops a request whose client left
        if fault == "oom" and path not in ("/api/generate", "/api/chat"):
            raise ApiError(500, LOAD_OOM_PREFIX + self.sim.next_oom_text())
        if fault in ("error500", "busy", "notfound"):
            status, message = {
                "error500": (500, RUNNER_ERROR),
                "busy": (503, BUSY_ERROR),
                "notfound": (404, f"model '{_model_name(raw)}' not found"),
            }[fault]
            raise ApiError(status, message)
        if fault == "drop" and path not in ("/api/generate", "/api/chat"):
            self._drop()
        if path == "/":
            return self._send_text(200, "Ollama is running", head=method == "HEAD")
        if path == "/api/version":
            return self._send_json(200, {"version": VERSION}, head=method == "HEAD")
        if path == "/api/tags":
            return self._send_json(200, {"models": self._tags()}, head=method == "HEAD")
        if path == "/api/ps":
            return self._send_json(200, {"models": self.sim.ps()})
        if path == "/api/show":
            return self._show(_json_object(raw))
        return self._infer(path, _json_object(raw), fault)

    # -- Ollama routes -----------------------------------------------------------------------------------------

    def _tags(self) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "model": m.name, "modified_at": "2025-12-01T09:00:00.1-08:00", "size": m.size_bytes,
             "digest": m.digest, "details": m.details()}
            for m in self.sim.models.values()
        ]

    def _show(self, req: dict[str, Any]) -> None:
        spec = self.sim.resolve(req.get("model") or req.get("name"))
        self._send_json(200, {
            "modelfile": f"# Modelfile generated by the Ollama double\nFROM {spec.name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": spec.details(),
            "model_info": {
                "general.architecture": spec.family,
                "general.parameter_count": spec.size_bytes * 2,
                f"{spec.family}.context_length": spec.context_length,
            },
            "capabilities": list(spec.capabilities),
            "modified_at": "2025-12-01T09:00:00.1-08:00",
        })

    def _infer(self, path: str, req: dict[str, Any], fault: str | None) -> None:
        """/api/generate and /api/chat: unload, load or run, in the order Ollama checks them. Replies echo
        `model` as the request sent it (routes.go:403-415, 476-486). An "oom" fault on a load is the load running
        out of memory (O10); on a reply, a runtime OOM that ends the stream and expires every runner (O11)."""
        chat = path == "/api/chat"
        keep_alive_s = parse_keep_alive(req.get("keep_alive"))
        sent = str(req.get("model") or "")
        spec = self.sim.resolve(req.get("model"))
        messages = _messages(req) if chat else []
        prompt = "" if chat else req.get("prompt") or ""
        empty = not messages if chat else not prompt
        if empty and keep_alive_s == 0:
            self.sim.request_unload(spec)
            return self._send_json(200, self._done(sent, chat, "unload"))
        think = req.get("think")
        if "thinking" not in spec.capabilities and think not in (None, False):
            raise ApiError(400, f'"{sent}" does not support thinking')
        if "completion" not in spec.capabilities:
            raise ApiError(400, f'"{sent}" does not support {"chat" if chat else "generate"}')
        thinks = "thinking" in spec.capabilities and think is not False  # on by default (routes.go:453-458)
        stream = req.get("stream")
        stream = True if stream is None else bool(stream)
        options = self.sim.load_options(req.get("options"))
        if fault == "drop" and (empty or not stream):
            self._drop()  # no stream to cut: the connection dies before any reply
        if fault == "midstream" and (empty or not stream):
            raise ApiError(500, MIDSTREAM_ERROR)
        started = time.monotonic()
        runner, load_s = self.sim.acquire(spec, options, keep_alive_s, self._client_gone,
                                          inject_oom=fault == "oom" and empty)
        lease = _Lease(self.sim, runner)
        try:
            if empty:
                lease.release()
                return self._send_json(200, self._done(sent, chat, "load"))
            if chat:
                text = chat_reply(spec.name, messages)
                asked = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
                prompt_tokens = sum(len((m.get("content") or "").split()) for m in messages)
            else:
                text = generate_reply(spec.name, prompt, list(req.get("images") or []))
                asked = prompt
                prompt_tokens = len(prompt.split())
            thinking = split_chunks(thinking_reply(spec.name, asked)) if thinks else []
            chunks = split_chunks(text)
            final = self._done(sent, chat, "stop")
            final.update({
                "load_duration": int(load_s * 1e9),
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 1_000_000,
                "eval_count": len(thinking) + len(chunks),
                "eval_duration": int((len(thinking) + len(chunks)) * self.sim.config.token_delay_s * 1e9),
            })
            if fault == "oom":
                self.sim.expire_all_for_runtime_oom()
                if not stream:
                    raise ApiError(500, RUNTIME_ERROR_PREFIX + self.sim.next_oom_text())
            if not stream:
                time.sleep(self.sim.config.token_delay_s * (len(thinking) + len(chunks)))
                final.update(self._piece(sent, chat, text, done=True, thinking="".join(thinking)))
                final["total_duration"] = int((time.monotonic() - started) * 1e9)
                lease.release()
                return self._send_json(200, final)
            self._stream(sent, chat, thinking, chunks, final, fault, lease, started)
        finally:
            lease.release()

    def _stream(self, sent: str, chat: bool, thinking: list[str], chunks: list[str], final: dict[str, Any],
                fault: str | None, lease: _Lease, started: float) -> None:
        self._start_chunked("application/x-ndjson")
        pieces = [("thinking", p) for p in thinking] + [("content", p) for p in chunks]
        for i, (kind, piece) in enumerate(pieces):
            if fault == "drop" and i == 1:
                self._drop()
            if fault in ("midstream", "oom") and i == 2:
                error = MIDSTREAM_ERROR if fault == "midstream" else RUNTIME_ERROR_PREFIX + self.sim.next_oom_text()
                self._write_line({"error": error})
                return self._end_chunked()
            if kind == "thinking":
                self._write_line(self._piece(sent, chat, "", done=False, thinking=piece))
            else:
                self._write_line(self._piece(sent, chat, piece, done=False))
            time.sleep(self.sim.config.token_delay_s)
        final["total_duration"] = int((time.monotonic() - started) * 1e9)
        lease.release()  # before the last line, so a client that reads it sees the idle timer running
        self._write_line(final)
        self._end_chunked()

    @staticmethod
    def _piece(sent: str, chat: bool, text: str, *, done: bool, thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": sent, "created_at": rfc3339(time.time())}
        if chat:
            body["message"] = {"role": "assistant", "content": text}  # the client needs role in every chunk
            if thinking:
                body["message"]["thinking"] = thinking
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = done
        return body

    def _done(self, sent: str, chat: bool, reason: str) -> dict[str, Any]:
        body = self._piece(sent, chat, "", done=True)
        body["done_reason"] = reason
        return body

    # -- control routes (not Ollama's) ------------------------------------------------------------------

    def _control(self, method: str, path: str, raw: bytes) -> None:
        try:
            if (method, path) == ("GET", "/_double/log"):
                return self._send_json(200, {"entries": self.sim.log_entries()})
            if (method, path) == ("GET", "/_double/state"):
                return self._send_json(200, self.sim.state())
            if (method, path) == ("POST", "/_double/config"):
                cfg = self.sim.configure(_json_object(raw) if raw.strip() else {})
                return self._send_json(200, asdict(cfg))
            if (method, path) == ("POST", "/_double/remove"):  # `ollama rm` of a model, loaded or not
                self.sim.remove_model(_json_object(raw).get("model"))
                return self._send_json(200, {"ok": True})
            if (method, path) == ("POST", "/_double/reset"):
                self.sim.reset()
                return self._send_json(200, {"ok": True})
            self._send_text(404, "404 page not found")
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message})

    # -- wire helpers -----------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _send_bytes(self, status: int, content_type: str, data: bytes, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)
        self.wfile.flush()

    def _send_json(self, status: int, body: Any, *, head: bool = False) -> None:
        self._send_bytes(status, "application/json; charset=utf-8", json.dumps(body).encode(), head=head)

    def _send_text(self, status: int, text: str, *, head: bool = False) -> None:
        self._send_bytes(status, "text/plain; charset=utf-8", text.encode(), head=head)

    def _start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _write_line(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """The client closed its end (it timed out, or its process died): the socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _drop(self) -> None:
        """Close the socket mid-response, like a crashed server."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped()


class _Lease:
    """A runner reference released exactly once."""

    def __init__(self, sim: SimulatedOllama, runner: Runner) -> None:
        self._release: Callable[[], None] | None = lambda: sim.release(runner)

    def release(self) -> None:
        if self._release:
            release, self._release = self._release, None
            release()


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid character in JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"json: cannot unmarshal {type(body).__name__} into Go value of type api.Request")
    return body


def _messages(req: dict[str, Any]) -> list[dict[str, Any]]:
    messages = req.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ApiError(400, "json: cannot unmarshal messages: each message needs a role")
    return messages


def _model_name(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("model", ""))
    except (ValueError, AttributeError):
        return ""


def _loggable(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw[:2000].decode("utf-8", "replace")


# -- process entry point --------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # hung or streaming requests never block shutdown
    request_queue_size = 128  # concurrent clients in system tests
    allow_reuse_address = True  # restart on the same port right after a kill


def serve(
    *,
    port: int = 0,
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS,
    config: DoubleConfig | None = None,
    ledger: GpuLedger,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve on 127.0.0.1:`port` (0 picks a free port) until interrupted."""
    sim = SimulatedOllama(models, config or DoubleConfig(), ledger)
    server = _Server(("127.0.0.1", port), OllamaHandler)
    server.sim = sim  # type: ignore[attr-defined]
    try:
        if on_listening:
            on_listening(server.server_address[1])
        server.serve_forever(poll_interval=0.1)
    finally:
        sim.stop()
        server.server_close()


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)  # readers never see a half-written port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mai.sim.ollama_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="written with the bound port once listening")
    parser.add_argument("--ledger", type=Path, help="shared GpuLedger file (created with --vram-mb if missing)")
    parser.add_argument("--models", help="JSON list of {name, size_bytes, capabilities, context_length, family}, "
                                         "or a file holding one")
    parser.add_argument("--vram-mb", type=int, default=24576, help="size of a new ledger (default 24576)")
    parser.add_argument("--load-time-s", type=float, default=DoubleConfig.load_time_s)
    parser.add_argument("--unload-delay-s", type=float, default=DoubleConfig.unload_delay_s)
    parser.add_argument("--vram-release-lag-s", type=float, default=DoubleConfig.vram_release_lag_s)
    parser.add_argument("--token-delay-s", type=float, default=DoubleConfig.token_delay_s)
    parser.add_argument("--default-num-ctx", type=int, default=DoubleConfig.default_num_ctx)
    args = parser.parse_args(argv)

    config = DoubleConfig(
        load_time_s=args.load_time_s,
        unload_delay_s=args.unload_delay_s,
        vram_release_lag_s=args.vram_release_lag_s,
        token_delay_s=args.token_delay_s,
        default_num_ctx=args.default_num_ctx,
    )
    # SIGTERM ends serve_forever through SystemExit, so the finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def listening(port: int) -> None:
        if args.port_file:
            _write_port_file(args.port_file, port)
        print(f"Ollama double listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="ollama-double-") as scratch:
        ledger_path = args.ledger or Path(scratch) / "gpu.sqlite"
        ledger = GpuLedger(ledger_path, total_bytes=args.vram_mb * MiB)
        try:
            serve(port=args.port, models=load_models(args.models), config=config, ledger=ledger,
                  on_listening=listening)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
