"""An LM Studio double: a separate-process websocket server that speaks the lmstudio SDK's protocol.

Contract and system tests drive the REAL `lmstudio` SDK against it over real sockets, so no test needs LM
Studio. Wire facts come from shared/reference/lmstudio.md §6 and the installed 1.5.0 SDK (the msgspec structs
say which fields a reply must carry).

    python -m mai.sim.lmstudio_server --port 0 --port-file F [--ledger PATH] [--models JSON_OR_PATH]
                                      [--vram-mb N] [--load-time-s X]

What it serves (127.0.0.1 only):
- `GET /lmstudio-greeting` -> 200 `{"lmstudio":true}`; a websocket on any namespace path (`/llm`, `/system`, ...)
  whose first frame is the auth frame.
- rpc: listLoaded, getModelInfo, unloadModel, countTokens, tokenize, estimateModelUsage, getLoadConfig,
  applyPromptTemplate, and on /system listDownloadedModels, version, info.
- channels: loadModel (resolved, progress*, success | channelError), getOrLoad (only so the SDK works),
  predict (promptProcessingProgress, fragments, success; a `cancel` ends it with stopReason "userStopped").
- reasoning models (`Settings.reasoning`, per model key): before the reply, `<think>` as a reasoningStartTag
  fragment, the reasoning (`reasoning_for`) as "reasoning" fragments, `</think>` as a reasoningEndTag fragment;
  the tags arrive as content, as LM Studio sends them (LlmPredictionFragment.reasoning_type,
  lmstudio-ai/lmstudio-python@ae837ac:src/lmstudio/_sdk_models/__init__.py:1248-1257; the SDK joins every
  fragment's content, reasoning included, into the result: …@ae837ac:src/lmstudio/json_api.py:1376-1389, 1423).
- silences (`Settings.first_fragment_delay_s`): nothing at all between prompt processing and the first fragment,
  as when a prediction waits behind another one (real-servers.md L7).
- memory: a load must fit the budget (`--vram-mb`, default 24 GiB) or, with `--ledger`, the shared simulated GPU
  ledger (owner `lmstudio:<identifier>`); otherwise it is refused with LM Studio's guardrail text.
- replies derive from the WHOLE history (`reply_for`), so a test can prove every message reached the model.

Test control, plain HTTP answered before the websocket handshake. websockets' HTTP parser takes no request body,
so settings travel in the query string as JSON values (a bare word is a string); GET or a bodiless POST both work:
    GET /_double/log                    every frame received: [{"t", "conn", "ns", "frame"}], oldest first
    GET /_double/state                  loaded instances, settings, memory use
    GET /_double/config?key=value&...   merge settings (see `Settings`), answers the whole settings object
    GET /_double/reset                  forget instances, log and settings (back to the command-line ones)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from messages.errors import OutOfMemory

MIB = 1024 * 1024
DEFAULT_VRAM_MB = 24 * 1024
CONTEXT_BYTES_PER_TOKEN = 32 * 1024  # KV cache estimate: a 4096-token context costs 128 MiB
FRAGMENT_COUNT = 6
GUARDRAIL_TEXT = (
    "Model loading was stopped due to insufficient system resources. Under the current settings, this model "
    "requires approximately {gb:.2f} GB of memory, and loading it would likely overload your system and cause it "
    "to freeze. If you believe this is a mistake, you can try to change the model loading guardrails in the settings."
)
# "memory": guardrail refusal up front; "error": channelError halfway; "close": channelClose halfway, no result.
LOAD_FAILURES = ("memory", "error", "close")
LOAD_FAILURE = {
    "title": "Failed to load model",
    "cause": "Error loading model. (Exit code: 18446744072635812000). Unknown error.",
}


# --- catalog ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadedModel:
    key: str
    size_bytes: int
    max_context_length: int
    vision: bool = False
    trained_for_tool_use: bool = False
    display_name: str = ""
    architecture: str = "qwen2"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DownloadedModel:
        return cls(
            key=str(raw["modelKey"]),
            size_bytes=int(raw["sizeBytes"]),
            max_context_length=int(raw.get("maxContextLength", 32768)),
            vision=bool(raw.get("vision", False)),
            trained_for_tool_use=bool(raw.get("trainedForToolUse", False)),
            display_name=str(raw.get("displayName") or raw["modelKey"]),
            architecture=str(raw.get("architecture", "qwen2")),
        )

    def info(self) -> dict[str, Any]:
        """LM Studio's ModelInfo (an LlmInfo: every field msgspec requires, plus the usual extras)."""
        path = f"lmstudio-community/{self.key}-GGUF/{self.key}-Q4_K_M.gguf"
        return {
            "type": "llm",
            "modelKey": self.key,
            "format": "gguf",
            "displayName": self.display_name or self.key,
            "publisher": "lmstudio-community",
            "path": path,
            "indexedModelIdentifier": path,
            "deviceIdentifier": None,
            "sizeBytes": self.size_bytes,
            "paramsString": None,
            "architecture": self.architecture,
            "quantization": {"name": "Q4_K_M", "bits": 4},
            "vision": self.vision,
            "trainedForToolUse": self.trained_for_tool_use,
            "maxContextLength": self.max_context_length,
        }


DEFAULT_MODELS: tuple[DownloadedModel, ...] = (
    DownloadedModel("qwen2.5-7b-instruct", 5_600_000_000, 32768, False, True, "Qwen2.5 7B Instruct"),
    DownloadedModel("qwen2.5-3b-instruct", 2_600_000_000, 32768, False, True, "Qwen2.5 3B Instruct"),
    DownloadedModel("qwen2.5-vl-7b-instruct", 6_000_000_000, 32768, True, False, "Qwen2.5 VL 7B Instruct", "qwen2vl"),
)


def parse_models(arg: str | None) -> tuple[DownloadedModel, ...]:
    """`--models` is inline JSON (a list of {modelKey, sizeBytes, ...}) or the path of a file holding it."""
    if not arg:
        return DEFAULT_MODELS
    text = arg if arg.lstrip().startswith("[") else Path(arg).read_text()
    return tuple(DownloadedModel.from_json(item) for item in json.loads(text))


def default_context(model: DownloadedModel) -> int:
    return min(4096, model.max_context_length)


def required_bytes(model: DownloadedModel, context_length: int) -> int:
    return model.size_bytes + context_length * CONTEXT_BYTES_PER_TOKEN


# --- the simulated model: pure functions a test can call to know the expected answer ----------------------------


def message_text(message: dict[str, Any]) -> str:
    """The text of one wire history message; the SDK merges consecutive user messages into several text parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:  # images and files show up by name, so a test can see they arrived
            texts.append(f"[{part.get('type')}:{part.get('name', part.get('identifier', '?'))}]")
    return "\n\n".join(texts)


def reply_for(identifier: str, history: Iterable[tuple[str, str]]) -> str:
    """The double's answer: a function of the instance and of EVERY (role, text) in the history."""
    items = list(history)
    digest = hashlib.sha1("\x1e".join(f"{role}\x1f{text}" for role, text in items).encode()).hexdigest()[:8]
    last_user = next((text for role, text in reversed(items) if role == "user"), "")
    last_user = " ".join(last_user.split())[:60]
    return f"[{identifier}] messages={len(items)} last_user={last_user} digest={digest}"


def reasoning_for(identifier: str, history: Iterable[tuple[str, str]]) -> str:
    """What a reasoning model thinks before `reply_for`'s answer; its marker `think-digest=` lets a test see
    whether reasoning leaked into a reply, the stored history, or a later prompt."""
    items = list(history)
    digest = hashlib.sha1("\x1e".join(f"{role}\x1f{text}" for role, text in items).encode()).hexdigest()[:8]
    last_user = " ".join(next((text for role, text in reversed(items) if role == "user"), "").split())[:40]
    return f"Okay, {identifier} considers {len(items)} messages; the user asked: {last_user}. think-digest={digest}"


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def split_fragments(text: str, parts: int = FRAGMENT_COUNT) -> list[str]:
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# --- settings the tests change at run time ----------------------------------------------------------------------


@dataclass
class Settings:
    load_time_s: float = 0.05
    fragment_delay_s: float = 0.01
    fail_next_load: str | None = None  # the next loadModel fails (then clears): see LOAD_FAILURES
    model_failures: dict[str, str] = field(default_factory=dict)  # modelKey -> one of LOAD_FAILURES, every time
    midstream: str | None = None  # the next predict fails halfway (then clears): see Session.fail_midstream
    stall: bool = False  # receive, log, never answer (until cleared)
    auth_refuse: str | None = None  # refuse websocket auth with this string error
    free_delay_s: float = 0.0  # ledger only: how long freed memory takes to come back after an unload
    reasoning: dict[str, int] = field(default_factory=dict)  # modelKey -> reasoning fragments before each reply
    reasoning_delay_s: float | None = None  # between reasoning fragments; None: fragment_delay_s
    first_fragment_delay_s: float = 0.0  # silence after prompt processing, before the first fragment

    CHOICES = {
        "fail_next_load": (None, *LOAD_FAILURES),
        "midstream": (None, "error", "channelError", "close", "failed", "modelUnloaded", "drop"),
    }

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown setting {key!r}; known: {sorted(names)}")
            if key in self.CHOICES and value not in self.CHOICES[key]:
                raise ValueError(f"{key} must be one of {self.CHOICES[key]}, got {value!r}")
            if key == "model_failures" and (
                not isinstance(value, dict) or any(v not in LOAD_FAILURES for v in value.values())
            ):
                raise ValueError(f"model_failures must map model keys to one of {LOAD_FAILURES}")
            if key == "reasoning" and (
                not isinstance(value, dict) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                   for v in value.values())
            ):
                raise ValueError("reasoning must map model keys to a number of reasoning fragments (int >= 0)")
            setattr(self, key, value)


# --- memory: an internal budget, or the shared simulated GPU ledger ------------------------------------------------


class Memory(Protocol):
    def allocate(self, owner: str, nbytes: int) -> None: ...  # raises OutOfMemory
    def free(self, owner: str, delay_s: float) -> None: ...
    def free_bytes(self) -> int: ...
    def begin(self, owner: str, op: str) -> None: ...
    def end(self, owner: str, op: str) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class BudgetMemory:
    """A private VRAM budget, used when no ledger is shared with the other simulated backends."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.used: dict[str, int] = {}

    def allocate(self, owner: str, nbytes: int) -> None:
        free = self.free_bytes()
        if nbytes > free:
            raise OutOfMemory(f"{owner} needs {nbytes} bytes, {free} free", details={"needed_bytes": nbytes})
        self.used[owner] = nbytes

    def free(self, owner: str, delay_s: float) -> None:
        self.used.pop(owner, None)

    def free_bytes(self) -> int:
        return self.total_bytes - sum(self.used.values())

    def begin(self, owner: str, op: str) -> None:
        pass

    def end(self, owner: str, op: str) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "budget", "total_bytes": self.total_bytes, "used": dict(self.used)}


class LedgerMemory:
    """The shared ledger (mai/sim/gpu_ledger.py), so the VLM, CLIP and chat doubles compete for one GPU."""

    def __init__(self, path: Path, total_bytes: int | None) -> None:
        from mai.sim.gpu_ledger import GpuLedger  # imported only when a ledger is asked for

        self.ledger = GpuLedger(path, total_bytes=total_bytes)
        for owner in self.ledger.usage():  # a killed predecessor's VRAM came back when its process died
            if owner.startswith("lmstudio:"):
                self.ledger.free(owner)

    def allocate(self, owner: str, nbytes: int) -> None:
        self.ledger.allocate(owner, nbytes)

    def free(self, owner: str, delay_s: float) -> None:
        self.ledger.free(owner, delay_s=delay_s)

    def free_bytes(self) -> int:
        return self.ledger.snapshot().free_bytes

    def begin(self, owner: str, op: str) -> None:
        self.ledger.begin(owner, op)

    def end(self, owner: str, op: str) -> None:
        self.ledger.end(owner, op)

    def describe(self) -> dict[str, Any]:
        return {"kind": "ledger", "usage": self.ledger.usage()}


# --- server state -----------------------------------------------------------------------------------------------


@dataclass
class Instance:
    identifier: str
    model: DownloadedModel
    context_length: int
    ttl_ms: int | None
    reference: str
    last_used_s: float

    @property
    def owner(self) -> str:
        return f"lmstudio:{self.identifier}"

    def info(self) -> dict[str, Any]:
        return self.model.info() | {
            "identifier": self.identifier,
            "instanceReference": self.reference,
            "ttlMs": self.ttl_ms,
            "lastUsedTime": int(self.last_used_s * 1000),
            "contextLength": self.context_length,
        }


class RemoteError(Exception):
    """Becomes an rpcError / channelError frame carrying LM Studio's SerializedLMSExtendedError."""

    def __init__(self, title: str, *, cause: str | None = None, code: str | None = None) -> None:
        super().__init__(title)
        self.error: dict[str, Any] = {"title": title}
        if cause is not None:
            self.error["cause"] = cause
        if code is not None:
            self.error["displayData"] = {"code": code}


class Dropped(Exception):
    """The double closed the socket without a close frame (simulates a crash or a network cut)."""


def not_found(query: Any) -> RemoteError:
    return RemoteError(
        "No model found that fits the query", cause=f"query: {json.dumps(query)}", code="generic.noModelMatchingQuery"
    )


def bad_parameter(exc: Exception) -> RemoteError:
    return RemoteError("Invalid parameter", cause=f"the double could not read the request: {exc!r}")


def config_value(stack: dict[str, Any] | None, key: str) -> Any:
    """The last value a KV config stack gives `key` (later layers win), or None."""
    value = None
    for layer in (stack or {}).get("layers", []):
        for item in layer.get("config", {}).get("fields", []):
            if item.get("key") == key:
                value = item.get("value")
    return value


class Channel:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()


class LmStudioDouble:
    """All server state, touched only from the event loop (so no locks)."""

    def __init__(self, models: tuple[DownloadedModel, ...], memory: Memory, settings: Settings) -> None:
        self.models = {m.key: m for m in models}
        self.memory = memory
        self.base_settings = settings
        self.settings = dataclasses.replace(settings)
        self.instances: dict[str, Instance] = {}
        self.loading: set[str] = set()
        self.log: list[dict[str, Any]] = []
        self.conn_ids = itertools.count(1)
        self.ref_ids = itertools.count(1)
        self.unstalled = asyncio.Event()
        self.unstalled.set()

    # -- control ----------------------------------------------------------------------------------------------
    def configure(self, changes: dict[str, Any]) -> None:
        self.settings.update(changes)
        self._sync_stall()

    def reset(self) -> None:
        for inst in list(self.instances.values()):
            self.unload(inst)
        self.settings = dataclasses.replace(self.base_settings, model_failures={}, reasoning={})
        self.log.clear()
        self._sync_stall()

    def state(self) -> dict[str, Any]:
        return {
            "loaded": [inst.info() for inst in self.instances.values()],
            "settings": dataclasses.asdict(self.settings),
            "memory": self.memory.describe(),
        }

    def _sync_stall(self) -> None:
        if self.settings.stall:
            self.unstalled.clear()
        else:
            self.unstalled.set()

    # -- instances ---------------------------------------------------------------------------------------------
    def expire_idle(self) -> None:
        now = time.time()
        for inst in list(self.instances.values()):
            if inst.ttl_ms is not None and now - inst.last_used_s > inst.ttl_ms / 1000:
                self.unload(inst)

    def find(self, specifier: dict[str, Any]) -> Instance:
        if specifier.get("type") == "instanceReference":
            ref = specifier.get("instanceReference")
            for inst in self.instances.values():
                if inst.reference == ref:
                    return inst
            raise not_found(specifier)
        query = specifier.get("query", specifier)
        wanted = query.get("identifier")
        for inst in self.instances.values():
            if wanted in (None, inst.identifier) and query.get("modelKey") in (None, inst.model.key):
                return inst
        raise not_found(query)

    def unload(self, inst: Instance) -> None:
        self.instances.pop(inst.identifier, None)
        self.memory.begin(inst.owner, "unload")
        self.memory.free(inst.owner, self.settings.free_delay_s)
        self.memory.end(inst.owner, "unload")

    def _free_name(self, key: str) -> str:
        taken = set(self.instances) | self.loading
        if key not in taken:
            return key
        return next(f"{key}:{n}" for n in itertools.count(2) if f"{key}:{n}" not in taken)

    # -- rpc -----------------------------------------------------------------------------------------------------
    def rpc(self, namespace: str, endpoint: str, param: Any) -> Any:
        self.expire_idle()
        param = param or {}
        if namespace == "system":
            if endpoint == "listDownloadedModels":
                return [m.info() for m in self.models.values()]
            if endpoint == "version":
                return {"version": "0.3.31", "build": 1}
            if endpoint == "info":
                return {"pid": os.getpid(), "isDaemon": False, "version": "0.3.31"}
        elif namespace == "embedding":
            if endpoint == "listLoaded":
                return []
        elif namespace == "llm":
            if endpoint == "listLoaded":
                return [inst.info() for inst in self.instances.values()]
            if endpoint == "getModelInfo":
                return self.find(param["specifier"]).info()
            if endpoint == "getLoadConfig":
                inst = self.find(param["specifier"])
                return {"fields": [{"key": "llm.load.contextLength", "value": inst.context_length}]}
            if endpoint == "unloadModel":
                identifier = param["identifier"]
                if identifier not in self.instances:
                    raise not_found({"identifier": identifier})
                self.unload(self.instances[identifier])
                return None
            if endpoint in ("countTokens", "tokenize"):
                inst = self.find(param["specifier"])
                inst.last_used_s = time.time()
                n = count_tokens(param.get("inputString", ""))
                return {"tokenCount": n} if endpoint == "countTokens" else {"tokens": list(range(1, n + 1))}
            if endpoint == "applyPromptTemplate":
                self.find(param["specifier"])
                msgs = param.get("history", {}).get("messages", [])
                return {"formatted": "".join(f"<|{m['role']}|>{message_text(m)}\n" for m in msgs)}
            if endpoint == "estimateModelUsage":
                return self.estimate(param)
        raise RemoteError(f"Unknown rpc endpoint {namespace}/{endpoint}")

    def estimate(self, param: dict[str, Any]) -> dict[str, Any]:
        model = self.models.get(param.get("modelKey", ""))
        if model is None:
            raise RemoteError(f"No downloaded model with key {param.get('modelKey')!r}", code="generic.pathNotFound")
        context = config_value(param.get("loadConfigStack"), "llm.load.contextLength") or default_context(model)
        context_bytes = context * CONTEXT_BYTES_PER_TOKEN
        total = model.size_bytes + context_bytes
        return {
            "memory": {
                "confidence": "high",
                "modelVramBytes": model.size_bytes,
                "contextVramBytes": context_bytes,
                "totalVramBytes": total,
                "modelBytes": model.size_bytes,
                "contextBytes": context_bytes,
                "totalBytes": total,
            },
            "passesGuardrails": total <= self.memory.free_bytes(),
        }

    # -- load ----------------------------------------------------------------------------------------------------
    def begin_load(
        self, model_key: str, identifier: str | None, stack: dict[str, Any] | None, ttl_ms: int | None
    ) -> tuple[Instance, str | None]:
        """Check and reserve; the caller streams progress, then `finish_load`, or `abort_load` and the returned
        failure ("error" | "close") halfway."""
        self.expire_idle()
        model = self.models.get(model_key)
        if model is None:
            raise RemoteError(f"No model found with key {model_key!r}", code="generic.pathNotFound")
        if identifier is not None and (identifier in self.instances or identifier in self.loading):
            raise RemoteError(
                f"Failed to load model: an instance with identifier {identifier!r} already exists",
                cause="Instance identifiers must be unique; unload the existing instance or choose another identifier.",
            )
        context = config_value(stack, "llm.load.contextLength") or default_context(model)
        if not isinstance(context, int) or context < 1 or context > model.max_context_length:
            cause = f"Context length {context} is outside 1..{model.max_context_length}"
            raise RemoteError("Failed to load model", cause=cause)
        failure = self.settings.fail_next_load or self.settings.model_failures.get(model_key)
        self.settings.fail_next_load = None
        needed = required_bytes(model, context)
        guardrail = RemoteError(GUARDRAIL_TEXT.format(gb=needed / 1e9))
        if failure == "memory":
            raise guardrail
        name = identifier or self._free_name(model_key)
        inst = Instance(name, model, context, ttl_ms, f"ref-{next(self.ref_ids)}", time.time())
        try:
            self.memory.allocate(inst.owner, needed)
        except OutOfMemory:
            raise guardrail from None
        self.loading.add(name)
        self.memory.begin(inst.owner, "load")
        return inst, failure

    def finish_load(self, inst: Instance) -> None:
        self.loading.discard(inst.identifier)
        self.memory.end(inst.owner, "load")
        inst.last_used_s = time.time()
        self.instances[inst.identifier] = inst

    def abort_load(self, inst: Instance) -> None:
        self.loading.discard(inst.identifier)
        self.memory.end(inst.owner, "load")
        self.memory.free(inst.owner, 0.0)


# --- websocket plumbing -----------------------------------------------------------------------------------------


class Session:
    """One websocket: auth, then rpc calls and channels, each answered by its own task (so `cancel` gets in)."""

    def __init__(self, double: LmStudioDouble, ws: ServerConnection) -> None:
        self.double = double
        self.ws = ws
        self.conn = next(double.conn_ids)
        self.namespace = ws.request.path.split("?")[0].strip("/") if ws.request else ""
        self.channels: dict[int, Channel] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def record(self, frame: Any) -> None:
        self.double.log.append({"t": time.time(), "conn": self.conn, "ns": self.namespace, "frame": frame})

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    def drop(self) -> None:
        self.ws.transport.abort()
        raise Dropped()

    async def run(self) -> None:
        try:
            auth = json.loads(await self.ws.recv())
            self.record(auth)
            if self.double.settings.auth_refuse is not None:
                await self.send({"success": False, "error": self.double.settings.auth_refuse})
                return
            await self.send({"success": True})
            async for raw in self.ws:
                frame = json.loads(raw)
                self.record(frame)
                self.dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "rpcCall":
            self.spawn(self.answer_rpc(frame))
        elif kind == "channelCreate":
            channel_id = frame["channelId"]
            self.channels[channel_id] = Channel()
            handlers = {"loadModel": self.load_model, "getOrLoad": self.get_or_load, "predict": self.predict}
            handler = handlers.get(frame["endpoint"])
            if handler is None:
                self.spawn(self.channel_error(channel_id, RemoteError(f"Unknown channel endpoint {frame['endpoint']}")))
            else:
                self.spawn(self.run_channel(channel_id, handler, frame.get("creationParameter") or {}))
        elif kind == "channelSend":
            channel = self.channels.get(frame.get("channelId"))
            if channel is not None and frame.get("message", {}).get("type") == "cancel":
                channel.cancelled.set()
        # keepAlive, acks and signals need no answer from this double

    async def answer_rpc(self, frame: dict[str, Any]) -> None:
        await self.double.unstalled.wait()
        call_id = frame["callId"]
        try:
            result = self.double.rpc(self.namespace, frame["endpoint"], frame.get("parameter"))
        except (KeyError, TypeError, AttributeError) as exc:  # a malformed parameter gets an answer, not a hang
            await self.send({"type": "rpcError", "callId": call_id, "error": bad_parameter(exc).error})
            return
        except RemoteError as exc:
            await self.send({"type": "rpcError", "callId": call_id, "error": exc.error})
            return
        reply: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            reply["result"] = result
        await self.send(reply)

    async def run_channel(self, channel_id: int, handler: Any, param: dict[str, Any]) -> None:
        await self.double.unstalled.wait()
        try:
            await handler(channel_id, param)
        except (KeyError, TypeError, AttributeError) as exc:
            await self.channel_error(channel_id, bad_parameter(exc))
        except RemoteError as exc:
            await self.channel_error(channel_id, exc)
        except Dropped:
            pass
        finally:
            self.channels.pop(channel_id, None)

    async def channel_error(self, channel_id: int, exc: RemoteError) -> None:
        await self.send({"type": "channelError", "channelId": channel_id, "error": exc.error})

    async def channel_send(self, channel_id: int, message: dict[str, Any]) -> None:
        await self.send({"type": "channelSend", "channelId": channel_id, "message": message})

    async def stream_load(self, channel_id: int, inst: Instance, failure: str | None, progress_type: str) -> bool:
        """Progress over `load_time_s`, then True; False when it failed halfway and the channel is finished.
        The reservation is returned on any failure, including the socket dying first."""
        steps = 4
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.double.settings.load_time_s / steps)
                await self.double.unstalled.wait()
                if failure is not None and step > steps // 2:
                    break
                await self.channel_send(channel_id, {"type": progress_type, "progress": step / steps})
        except BaseException:
            self.double.abort_load(inst)
            raise
        if failure is None:
            self.double.finish_load(inst)
            return True
        self.double.abort_load(inst)
        if failure == "close":
            await self.send({"type": "channelClose", "channelId": channel_id})
            return False
        raise RemoteError(**LOAD_FAILURE)

    async def load_model(self, channel_id: int, param: dict[str, Any]) -> None:
        double = self.double
        model = double.models.get(param.get("modelKey", ""))
        if model is not None:
            await self.channel_send(channel_id, {"type": "resolved", "info": model.info()})
        inst, failure = double.begin_load(
            param.get("modelKey", ""), param.get("identifier"), param.get("loadConfigStack"), param.get("ttlMs")
        )
        if not await self.stream_load(channel_id, inst, failure, "progress"):
            return
        await self.channel_send(channel_id, {"type": "success", "info": inst.info()})
        await self.send({"type": "channelClose", "channelId": channel_id})

    async def get_or_load(self, channel_id: int, param: dict[str, Any]) -> None:
        double = self.double
        wanted = param.get("identifier", "")
        double.expire_idle()
        existing = next((i for i in double.instances.values() if wanted in (i.identifier, i.model.key)), None)
        if existing is not None:
            await self.channel_send(channel_id, {"type": "alreadyLoaded", "info": existing.info()})
        else:
            inst, failure = double.begin_load(wanted, None, param.get("loadConfigStack"), param.get("loadTtlMs"))
            started = {"type": "startLoading", "identifier": inst.identifier, "info": inst.model.info()}
            await self.channel_send(channel_id, started)
            if not await self.stream_load(channel_id, inst, failure, "loadProgress"):
                return
            await self.channel_send(channel_id, {"type": "loadSuccess", "info": inst.info()})
        await self.send({"type": "channelClose", "channelId": channel_id})

    async def predict(self, channel_id: int, param: dict[str, Any]) -> None:
        double = self.double
        double.expire_idle()
        inst = double.find(param.get("modelSpecifier", {}))
        channel = self.channels[channel_id]
        messages = param.get("history", {}).get("messages", [])
        history = [(m.get("role", ""), message_text(m)) for m in messages]
        text = reply_for(inst.identifier, history)
        prompt_tokens = sum(count_tokens(t) for _, t in history)
        max_tokens = config_value(param.get("predictionConfigStack"), "llm.prediction.maxPredictedTokens")
        token_limit = max_tokens["value"] if isinstance(max_tokens, dict) and max_tokens.get("checked") else None
        midstream, double.settings.midstream = double.settings.midstream, None
        inst.last_used_s = time.time()
        await self.channel_send(channel_id, {"type": "promptProcessingProgress", "progress": 0.0, "details": {}})
        await self.channel_send(channel_id, {"type": "promptProcessingProgress", "progress": 1.0, "details": {}})
        await self.pause(channel, double.settings.first_fragment_delay_s)
        stop_reason, sent_tokens = "eosFound", 0
        thinking = double.settings.reasoning.get(inst.model.key, 0)
        if thinking:
            stop_reason, sent_tokens = await self.think(channel_id, channel, reasoning_for(inst.identifier, history),
                                                        thinking, token_limit)
        fragments = split_fragments(text) if stop_reason == "eosFound" else []
        for index, piece in enumerate(fragments):
            if channel.cancelled.is_set():
                stop_reason = "userStopped"
                break
            if midstream is not None and index == len(fragments) // 2:
                stop_reason = await self.fail_midstream(channel_id, inst, midstream)
                if stop_reason is None:
                    return
                break
            tokens = count_tokens(piece)
            if token_limit is not None and sent_tokens + tokens > token_limit:
                stop_reason = "maxPredictedTokensReached"
                break
            sent_tokens += tokens
            fragment = {"content": piece, "tokensCount": tokens, "containsDrafted": False, "reasoningType": "none"}
            await self.channel_send(channel_id, {"type": "fragment", "fragment": fragment})
            await self.pause(channel)
        await self.channel_send(channel_id, {
            "type": "success",
            "stats": {
                "stopReason": stop_reason, "predictedTokensCount": sent_tokens, "promptTokensCount": prompt_tokens
            },
            "modelInfo": inst.info(),
            "loadModelConfig": {"fields": [{"key": "llm.load.contextLength", "value": inst.context_length}]},
            "predictionConfig": {"fields": []},
        })
        await self.send({"type": "channelClose", "channelId": channel_id})

    async def think(
        self, channel_id: int, channel: Channel, reasoning: str, parts: int, token_limit: int | None
    ) -> tuple[str, int]:
        """Send `<think>`, the reasoning in `parts` fragments, `</think>`; return the stop reason so far ("eosFound"
        to go on with the reply) and the tokens spent, which count against maxTokens as a real model's do."""
        delay = self.double.settings.reasoning_delay_s
        pieces = [("<think>", "reasoningStartTag")]
        pieces += [(piece, "reasoning") for piece in split_fragments(reasoning, parts)]
        pieces.append(("</think>", "reasoningEndTag"))
        sent = 0
        for piece, reasoning_type in pieces:
            if channel.cancelled.is_set():
                return "userStopped", sent
            tokens = count_tokens(piece)
            if token_limit is not None and sent + tokens > token_limit:
                return "maxPredictedTokensReached", sent
            sent += tokens
            fragment = {"content": piece, "tokensCount": tokens, "containsDrafted": False, "reasoningType": reasoning_type}
            await self.channel_send(channel_id, {"type": "fragment", "fragment": fragment})
            await self.pause(channel, delay)
        return "eosFound", sent

    async def pause(self, channel: Channel, delay_s: float | None = None) -> None:
        """Wait between fragments (`fragment_delay_s` unless told); a cancel cuts the wait short."""
        delay_s = self.double.settings.fragment_delay_s if delay_s is None else delay_s
        if delay_s <= 0:
            return
        try:
            await asyncio.wait_for(channel.cancelled.wait(), delay_s)
        except asyncio.TimeoutError:
            pass

    async def fail_midstream(self, channel_id: int, inst: Instance, mode: str) -> str | None:
        """Fail the way `settings.midstream` says; returns a stop reason to finish with, or None when done.

        "error": in-channel error message; "channelError": channel-level error; "close": channelClose with no result;
        "failed" / "modelUnloaded": a success whose stopReason says so (the latter really unloads the instance);
        "drop": the TCP connection is cut without a close frame.
        """
        if mode == "drop":
            self.drop()
        if mode == "error":
            error = {"title": "Prediction failed", "cause": "simulated mid-stream failure"}
            await self.channel_send(channel_id, {"type": "error", "error": error})
            return None
        if mode == "channelError":
            await self.channel_error(channel_id, RemoteError("Prediction failed", cause="simulated channel error"))
            return None
        if mode == "close":
            await self.send({"type": "channelClose", "channelId": channel_id})
            return None
        if mode == "modelUnloaded":
            self.double.unload(inst)
        return mode  # "failed" | "modelUnloaded"


# --- HTTP: the greeting and the test control endpoints -----------------------------------------------------------


def json_response(status: int, body: Any) -> Response:
    data = json.dumps(body).encode()
    headers = Headers(
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    )
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "")
    return Response(status, reason, headers, data)


def parse_query_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def make_http_handler(double: LmStudioDouble) -> Any:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/lmstudio-greeting":
            return json_response(200, {"lmstudio": True})
        if path.startswith("/_double/"):
            action = path.removeprefix("/_double/")
            if action == "log":
                return json_response(200, double.log)
            if action == "state":
                return json_response(200, double.state())
            if action == "reset":
                double.reset()
                return json_response(200, double.state())
            if action == "config":
                changes = {k: parse_query_value(v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}
                try:
                    double.configure(changes)
                except (ValueError, TypeError) as exc:
                    return json_response(400, {"error": str(exc)})
                return json_response(200, dataclasses.asdict(double.settings))
            return json_response(404, {"error": f"unknown control endpoint {path}"})
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return json_response(404, {"error": f"no such path {path}"})
        return None

    return process_request


async def serve_double(args: argparse.Namespace) -> None:
    settings = Settings(load_time_s=args.load_time_s)
    if args.ledger:
        total = args.vram_mb * MIB if args.vram_mb is not None else None
        memory: Memory = LedgerMemory(Path(args.ledger), total)
    else:
        memory = BudgetMemory((args.vram_mb if args.vram_mb is not None else DEFAULT_VRAM_MB) * MIB)
    double = LmStudioDouble(parse_models(args.models), memory, settings)

    async def handler(ws: ServerConnection) -> None:
        await Session(double, ws).run()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = make_http_handler(double)
    async with serve(handler, "127.0.0.1", args.port, process_request=http, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        if args.port_file:
            tmp = Path(f"{args.port_file}.tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)
        print(f"lmstudio double listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        await stop.wait()
    for inst in list(double.instances.values()):  # a process that exits gives its VRAM back
        double.memory.free(inst.owner, 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mai.sim.lmstudio_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--ledger", help="shared simulated GPU ledger file (owner lmstudio:<identifier>)")
    parser.add_argument("--models", help="downloaded models: JSON list or a file holding one")
    parser.add_argument("--vram-mb", type=int, help=f"memory budget without a ledger (default {DEFAULT_VRAM_MB})")
    parser.add_argument("--load-time-s", type=float, default=0.05, help="how long a load takes")
    asyncio.run(serve_double(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
