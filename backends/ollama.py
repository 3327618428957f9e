"""The only door to Ollama: the official `ollama` client (plus plain httpx for /api/version), with every library
error translated once into Mai's errors (`messages.errors`), each naming the host and the model.

Wire facts it relies on are in `shared/reference/ollama.md`: a load is an empty generate with keep_alive -1, an
unload is keep_alive 0 and is only done when the model has left /api/ps (§2, §6), and the load options must be
identical on every request or Ollama silently reloads the model (§5). One attempt per call and a timeout on
every call: retries and backoff are the actor core's decisions, not this adapter's.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Mapping, Sequence

import httpx
import ollama
import pydantic

from messages.chat import ChatMessage
from messages.errors import (
    BackendUnavailable,
    Busy,
    ConnectionLost,
    InvalidRequest,
    LoadFailed,
    MaiError,
    ModelNotFound,
    OperationTimeout,
    OutOfMemory,
    PredictionFailed,
)

# How Ollama's runner reports an OOM (llm/status.go; older servers: "requires more system memory").
OOM_MARKERS = ("out of memory", "cudamalloc failed", "failed to allocate", "requires more system memory")


@dataclass(frozen=True)
class OllamaModelState:
    """One row of /api/ps. `expires_at` in the past means the model is stopping (or busy, see ollama.md §2)."""

    name: str
    size_bytes: int
    size_vram_bytes: int
    expires_at: datetime | None
    context_length: int | None

    @property
    def partial_offload(self) -> bool:
        """Part of the model runs on the CPU: Ollama could not fit it in VRAM."""
        return self.size_vram_bytes < self.size_bytes


@dataclass(frozen=True)
class OllamaModelInfo:
    """What /api/show says about an installed model."""

    name: str
    capabilities: tuple[str, ...]
    context_length: int | None

    @property
    def has_vision(self) -> bool:
        return "vision" in self.capabilities


class OllamaAdapter:
    """Talks to one Ollama server at `host`.

    Two clients with different read timeouts: short calls (ps, tags, show, unload) use `request_timeout_s`;
    loads and chats use `load_timeout_s`, since a chat can (re)load the model and a VLM's image prompt is slow.
    Connecting always uses `request_timeout_s`, so a dead server is noticed quickly.
    """

    def __init__(
        self,
        host: str,
        *,
        num_ctx: int,
        request_timeout_s: float = 5.0,
        load_timeout_s: float = 120.0,
        extra_options: Mapping[str, object] | None = None,
    ) -> None:
        if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx <= 0:
            raise InvalidRequest(f"OllamaAdapter num_ctx must be a positive int, got {num_ctx!r}")
        self.host = host
        self.request_timeout_s = request_timeout_s
        self.load_timeout_s = load_timeout_s
        self._load_options = {"num_ctx": num_ctx, **dict(extra_options or {})}
        self._short = ollama.Client(host=host, timeout=httpx.Timeout(request_timeout_s))
        self._long = ollama.Client(host=host, timeout=httpx.Timeout(load_timeout_s, connect=request_timeout_s))
        # The ollama client has no version(); reuse its normalised base URL (":11434" -> "http://127.0.0.1:11434").
        self._http = httpx.Client(base_url=self._short._client.base_url, timeout=httpx.Timeout(request_timeout_s))

    @property
    def load_options(self) -> dict[str, object]:
        """Sent identically with every load and chat: a difference would make Ollama reload the model."""
        return dict(self._load_options)

    # -- queries ------------------------------------------------------------------------------------------------

    def version(self) -> str:
        with self._translated("version", None, self.request_timeout_s):
            response = self._http.get("/api/version")
            if response.status_code >= 400:
                raise ollama.ResponseError(response.text, response.status_code)
            try:
                return str(response.json()["version"])
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendUnavailable(
                    f"Ollama at {self.host}: /api/version answered {response.text[:200]!r}, not a version",
                    details={"host": self.host, "op": "version"},
                ) from exc

    def loaded(self) -> list[OllamaModelState]:
        with self._translated("ps", None, self.request_timeout_s):
            rows = self._short.ps().models
        return [
            OllamaModelState(
                name=row.model or row.name or "",
                size_bytes=int(row.size or 0),
                size_vram_bytes=int(row.size_vram or 0),
                expires_at=row.expires_at,
                context_length=row.context_length,
            )
            for row in rows
        ]

    def state_of(self, model: str) -> OllamaModelState | None:
        return next((s for s in self.loaded() if _same_model(s.name, model)), None)

    def installed(self) -> list[str]:
        with self._translated("tags", None, self.request_timeout_s):
            return [m.model for m in self._short.list().models if m.model]

    def show(self, model: str) -> OllamaModelInfo:
        _check_model(model)
        with self._translated("show", model, self.request_timeout_s):
            info = self._short.show(model)
        model_info = info.modelinfo or {}
        context = next((v for k, v in model_info.items() if k.endswith(".context_length")), None)
        return OllamaModelInfo(
            name=model,
            capabilities=tuple(info.capabilities or ()),
            context_length=int(context) if isinstance(context, (int, float)) else None,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def load(self, model: str) -> OllamaModelState:
        """Load `model` pinned (keep_alive -1) with `load_options`; return its /api/ps row once it is listed."""
        _check_model(model)
        with self._translated("load", model, self.load_timeout_s):
            self._long.generate(model=model, keep_alive=-1, options=self.load_options)
        state = self.state_of(model)
        if state is None:
            raise LoadFailed(
                f"Ollama at {self.host} answered the load of model '{model}' but does not list it in /api/ps",
                details={"host": self.host, "model": model, "op": "load"},
            )
        return state

    def unload(self, model: str, *, wait_gone_s: float = 30.0, poll_s: float = 0.01, poll_max_s: float = 0.1) -> float:
        """Ask Ollama to unload `model`, then wait until /api/ps no longer lists it (the reply comes first, the
        runner goes later). Returns the seconds waited. Unloading a model that is not loaded is fine.

        The poll starts at `poll_s` and doubles up to `poll_max_s`: the runner is often gone within milliseconds, and
        a fixed 100 ms poll added up to 100 ms to every switch into AUTOPILOT (bench/mode_switch.py)."""
        _check_model(model)
        started = time.monotonic()
        try:
            with self._translated("unload", model, self.request_timeout_s):
                self._short.generate(model=model, keep_alive=0)
        except ModelNotFound:
            pass  # not installed, so not loaded either: /api/ps below confirms
        deadline = started + wait_gone_s
        while self.state_of(model) is not None:
            if time.monotonic() >= deadline:
                raise OperationTimeout(
                    f"Ollama at {self.host} still lists model '{model}' in /api/ps {wait_gone_s:g}s after unloading",
                    details={"host": self.host, "model": model, "op": "unload", "timeout_s": wait_gone_s},
                )
            time.sleep(poll_s)
            poll_s = min(poll_s * 2, poll_max_s)
        return time.monotonic() - started

    # -- inference ----------------------------------------------------------------------------------------------

    def chat_stream(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        *,
        images: Sequence[bytes | str] | None = None,
        keep_alive: float | str = -1,
    ) -> Iterator[str]:
        """Stream the assistant's reply to `messages` as content fragments. `images` (raw bytes, or base64
        strings) go with the last user message. Errors, mid-stream ones included, arrive as Mai errors."""
        _check_model(model)
        wire = _wire_messages(messages, images)
        try:  # builds the body now (images are encoded here); the HTTP request starts with the first chunk
            stream = self._long.chat(
                model=model, messages=wire, stream=True, options=self.load_options, keep_alive=keep_alive
            )
        except ValueError as exc:  # e.g. an image string that is neither base64 nor an existing file
            raise InvalidRequest(
                f"chat with model '{model}' on Ollama at {self.host}: {exc}", details={"host": self.host, "model": model}
            ) from exc
        return self._fragments(model, stream)

    def _fragments(self, model: str, stream: Iterator[ollama.ChatResponse]) -> Iterator[str]:
        with self._translated("chat", model, self.load_timeout_s):
            try:
                for chunk in stream:
                    if chunk.message and chunk.message.content:
                        yield chunk.message.content
            finally:
                stream.close()  # also when the caller stops early: closes the HTTP response

    def close(self) -> None:
        self._short.close()
        self._long.close()
        self._http.close()

    def __enter__(self) -> OllamaAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- error translation (the one place) ----------------------------------------------------------------------

    @contextmanager
    def _translated(self, op: str, model: str | None, timeout_s: float) -> Iterator[None]:
        try:
            yield
        except MaiError:
            raise
        except Exception as exc:  # noqa: BLE001 - every library error leaves here as a MaiError
            error = self._translate(exc, op, model, timeout_s)
            if error is None:
                raise
            raise error from exc

    def _translate(self, exc: Exception, op: str, model: str | None, timeout_s: float) -> MaiError | None:
        what = f"{op} of model '{model}'" if model else op
        details: dict[str, object] = {"host": self.host, "model": model, "op": op}

        if isinstance(exc, (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
            # The non-streaming client raises builtin ConnectionError, the streaming one raw httpx.ConnectError.
            return BackendUnavailable(f"Ollama at {self.host} is unreachable ({what}): {exc}", details=details)
        if isinstance(exc, httpx.TimeoutException):
            return OperationTimeout(
                f"Ollama at {self.host} did not answer the {what} within {timeout_s:g}s",
                details={**details, "timeout_s": timeout_s},
            )
        if isinstance(exc, httpx.TransportError):  # RemoteProtocolError, ReadError, ...: it went away mid-reply
            return ConnectionLost(f"Ollama at {self.host} closed the connection during the {what}: {exc}",
                                  details=details)
        if isinstance(exc, ollama.ResponseError):
            return self._translate_response(exc, what, op, details)
        if isinstance(exc, (json.JSONDecodeError, pydantic.ValidationError)):
            failure = _failure_class(op)
            return failure(f"Ollama at {self.host} sent a malformed reply to the {what}: {exc}", details=details)
        return None

    def _translate_response(
        self, exc: ollama.ResponseError, what: str, op: str, details: dict[str, object]
    ) -> MaiError:
        status, text = exc.status_code, str(exc.error)
        details = {**details, "status_code": status, "error": text}
        message = f"Ollama at {self.host} refused the {what}: {text} (HTTP {status})"
        if status == -1:
            message = f"Ollama at {self.host} failed during the {what}: {text}"
        if any(marker in text.lower() for marker in OOM_MARKERS) and (status >= 500 or status == -1):
            return OutOfMemory(message, details=details)
        if status == 404:  # without a model (e.g. /api/version) a 404 means this is not an Ollama server
            missing = ModelNotFound if details["model"] else BackendUnavailable
            return missing(message, details=details)
        if status == 503:
            return Busy(message, details=details)
        if 400 <= status < 500:
            return InvalidRequest(message, details=details)
        if status == -1:  # an {"error": ...} line inside a 200 stream
            return PredictionFailed(message, details=details)
        return _failure_class(op)(message, details=details)


def _failure_class(op: str) -> type[MaiError]:
    """What a server-side failure means for each operation."""
    if op in ("load", "unload"):
        return LoadFailed
    if op == "chat":
        return PredictionFailed
    return BackendUnavailable


def _check_model(model: str) -> None:
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(f"Ollama model name must be a non-empty string, got {model!r}")


def _same_model(listed: str, wanted: str) -> bool:
    """Ollama adds ":latest" to a name without a tag."""
    def canonical(name: str) -> str:
        return name if ":" in name else name + ":latest"

    return canonical(listed) == canonical(wanted)


def _wire_messages(messages: Sequence[ChatMessage], images: Sequence[bytes | str] | None) -> list[dict[str, object]]:
    if not messages:
        raise InvalidRequest("chat needs at least one message (an empty chat would only load the model)")
    wire: list[dict[str, object]] = [{"role": m.role, "content": m.content} for m in messages]
    if images:
        last_user = next((i for i in range(len(wire) - 1, -1, -1) if wire[i]["role"] == "user"), None)
        if last_user is None:
            raise InvalidRequest("images need a user message to go with")
        wire[last_user]["images"] = list(images)
    return wire
