"""The only door to Ollama: the official `ollama` client (plus plain httpx for /api/version), with every library
error translated once into Mai's errors (`messages.errors`), each naming the host and the model.

Wire facts it relies on are in `shared/reference/ollama.md`: a load is an empty generate with keep_alive -1, an
unload is keep_alive 0 and is only done when the model has left /api/ps (§2, §6), and the load options must be
identical on every request or Ollama silently reloads the model (§5). Facts read in the real server's source are in
`shared/reference/real-servers.md` §1: names are matched as Ollama resolves them, or by digest (O1, O2); a load is
silent until done, so its read timeout is at least Ollama's own load limit (O3, O4); an unload that another client
cancels is noticed (O6) and one of a removed model is reported as stuck (O8); every OOM text is named as such (O14).
One attempt per call and a timeout on every call: retries and backoff are the actor core's decisions, not this
adapter's.
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

from messages.chat import ChatMessage, FragmentKind, ReplyFragment
from config.ollama_names import parse_ollama_name, same_ollama_model
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
    Reason,
)

# Ollama's own OOM test, lower-cased (`ollama/ollama@fb30760:llm/status.go:85-96`), plus the cuBLAS and cuDNN
# allocation failures that say nothing of memory (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED,
# CUDNN_STATUS_NOT_ENOUGH_WORKSPACE; real-servers.md T6) and older servers' "requires more system memory".
OOM_MARKERS = (
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
    "erroroutofdevicememory",  # vulkan-hpp's vk::OutOfDeviceMemoryError text, which Ollama's list misses
    "status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "requires more system memory",
)
REVIVED_MARGIN_S = 1.0  # expires_at this far past our clock counts as revived, not as the server's clock skew
UNLOAD_RESENDS = 3  # keep_alive 0 sent again this often when another client's keep_alive revives the model (O6)


def is_out_of_memory(text: str) -> bool:
    """Whether an error text from Ollama (a 500 body, a mid-stream error line) reports running out of memory."""
    lowered = text.lower()
    return any(marker in lowered for marker in OOM_MARKERS)


@dataclass(frozen=True)
class OllamaModelState:
    """One row of /api/ps. `expires_at` in the past means the model is stopping (or busy, see ollama.md §2).
    `name` is the shortest form of the first loader's name; `digest` names the model's manifest (O1, O2)."""

    name: str
    size_bytes: int
    size_vram_bytes: int
    expires_at: datetime | None
    context_length: int | None
    digest: str = ""

    @property
    def partial_offload(self) -> bool:
        """Part of the model runs on the CPU: Ollama could not fit it in VRAM."""
        return self.size_vram_bytes < self.size_bytes

    @property
    def pinned(self) -> bool:
        """keep_alive forever shows as now + 292 years; anything before year 2300 expires by itself (O17)."""
        return self.expires_at is not None and self.expires_at.year > 2300


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
    Ollama writes nothing until a load is done and aborts the load when its client hangs up (O3, O4), so
    `load_timeout_s` must be at least Ollama's own load limit (OLLAMA_LOAD_TIMEOUT, 300 s by default). Connecting
    always uses `request_timeout_s`, and a load first asks /api/version, so a dead or wedged server is noticed
    quickly.
    """

    def __init__(
        self,
        host: str,
        *,
        num_ctx: int,
        request_timeout_s: float = 5.0,
        load_timeout_s: float = 300.0,
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
                digest=row.digest or "",
            )
            for row in rows
        ]

    def state_of(self, model: str) -> OllamaModelState | None:
        """The /api/ps row of `model` in any spelling Ollama accepts: by name as Ollama resolves it, else by the
        digest /api/tags gives it (a runner shared with an alias is listed under the first loader's name, O2).
        /api/tags is asked only when some row is listed under another name."""
        rows = self.loaded()
        named = next((s for s in rows if same_ollama_model(s.name, model)), None)
        if named is not None or not rows:
            return named
        digest = self.digest_of(model)
        return next((s for s in rows if digest and s.digest == digest), None)

    def digest_of(self, model: str) -> str | None:
        """The digest /api/tags lists for `model`, or None if it is not installed."""
        with self._translated("tags", None, self.request_timeout_s):
            rows = self._short.list().models
        return next((m.digest for m in rows if m.model and same_ollama_model(m.model, model)), None)

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
        """Load `model` pinned (keep_alive -1) with `load_options`; return its /api/ps row once it is listed.

        Always sent, even when a row carries the name: on a matching runner it returns at once and re-pins it, on
        one with other options it reloads (O17). /api/version first: a wedged server fails within
        `request_timeout_s` instead of holding the load's long read timeout."""
        _check_model(model)
        self.version()
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
        runner goes later, after the requests in flight: O5). Returns the seconds waited. Unloading a model that is
        not loaded is fine.

        The poll watches `expires_at` (O6): a later request carrying keep_alive, from another client, cancels the
        unload and moves it back into the future. Then keep_alive 0 is sent again, at most `UNLOAD_RESENDS` times,
        and after that the unload fails at once as Busy, saying another client keeps the model loaded. A 404 for
        a model still listed is an `ollama rm` while loaded: it stays until Ollama restarts (O8), reported at once.
        The poll starts at `poll_s` and doubles up to `poll_max_s`: the runner is often gone within milliseconds."""
        _check_model(model)
        started = time.monotonic()
        deadline = started + wait_gone_s
        resends = 0
        self._send_unload(model)
        while (state := self.state_of(model)) is not None:
            if _pinned_in_future(state.expires_at):
                if resends >= UNLOAD_RESENDS:
                    raise Busy(
                        f"Ollama at {self.host} keeps model '{model}' loaded: another client's request carrying "
                        f"keep_alive cancelled Mai's unload {resends + 1} times (its expires_at is "
                        f"{state.expires_at.isoformat()}); stop that client's keep_alive or unload it there",
                        details={"host": self.host, "model": model, "op": "unload", "resends": resends,
                                 "expires_at": state.expires_at.isoformat()},
                    )
                resends += 1
                self._send_unload(model)
                continue
            if time.monotonic() >= deadline:
                raise OperationTimeout(
                    f"Ollama at {self.host} still lists model '{model}' in /api/ps {wait_gone_s:g}s after unloading "
                    "(requests still in flight on it finish first)",
                    details={"host": self.host, "model": model, "op": "unload", "timeout_s": wait_gone_s},
                )
            time.sleep(poll_s)
            poll_s = min(poll_s * 2, poll_max_s)
        return time.monotonic() - started

    def _send_unload(self, model: str) -> None:
        try:
            with self._translated("unload", model, self.request_timeout_s):
                self._short.generate(model=model, keep_alive=0)
        except ModelNotFound as err:
            listed = self.state_of(model)
            if listed is None:
                return  # not installed, so not loaded either
            raise ModelNotFound(
                f"Ollama at {self.host} lists model '{model}' in /api/ps (as '{listed.name}') but answers 404 to "
                "its unload: it was removed while loaded (ollama rm) and stays stuck in VRAM until Ollama restarts",
                details={**err.details, "stuck": True, "listed_as": listed.name},
            ) from err

    # -- inference ----------------------------------------------------------------------------------------------

    def chat_stream(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        *,
        images: Sequence[bytes | str] | None = None,
        keep_alive: float | str = -1,
        think: bool | None = None,
    ) -> Iterator[ReplyFragment]:
        """Stream the assistant's reply to `messages` as fragments: `message.thinking` tagged REASONING, `content`
        tagged CONTENT. `images` (raw bytes, or base64 strings) go with the last user message. Errors, mid-stream
        ones included, arrive as Mai errors.

        `think` None sends no `think`: a thinking-capable model then thinks anyway (on by default), and a model
        without the capability would answer `think: true` with 400 (real-servers.md O15). So only a caller that
        knows the model thinks (`show().capabilities`) passes True; the thinking is surfaced either way."""
        _check_model(model)
        if think is not None and not isinstance(think, bool):
            raise InvalidRequest(f"chat think must be True, False or None (not sent), got {think!r}",
                                 details={"host": self.host, "model": model, "field": "think"})
        wire = _wire_messages(messages, images)
        try:  # builds the body now (images are encoded here); the HTTP request starts with the first chunk
            stream = self._long.chat(
                model=model, messages=wire, stream=True, options=self.load_options, keep_alive=keep_alive, think=think
            )
        except ValueError as exc:  # e.g. an image string that is neither base64 nor an existing file
            raise InvalidRequest(
                f"chat with model '{model}' on Ollama at {self.host}: {exc}", details={"host": self.host, "model": model}
            ) from exc
        return self._fragments(model, stream)

    def _fragments(self, model: str, stream: Iterator[ollama.ChatResponse]) -> Iterator[ReplyFragment]:
        with self._translated("chat", model, self.load_timeout_s):
            try:
                for chunk in stream:
                    message = chunk.message
                    if message and message.thinking:
                        yield ReplyFragment(message.thinking, FragmentKind.REASONING)
                    if message and message.content:
                        yield ReplyFragment(message.content)
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
        if is_out_of_memory(text) and (status >= 500 or status == -1):
            return OutOfMemory(message, reason=Reason.INSUFFICIENT_VRAM, details=details)
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
    parse_ollama_name(model)  # InvalidRequest naming what is wrong and what is accepted


def _pinned_in_future(expires_at: datetime | None) -> bool:
    """expires_at after now: the model was (re)pinned. A stopping model shows now or earlier."""
    if expires_at is None:
        return False
    now = datetime.now(expires_at.tzinfo) if expires_at.tzinfo else datetime.now()
    return (expires_at - now).total_seconds() > REVIVED_MARGIN_S


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
