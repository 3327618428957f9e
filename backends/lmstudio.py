"""LM Studio adapter: the only module that imports `lmstudio`; every SDK error leaves it as a MaiError.

In: a host ("host:port"), instance identifiers we choose, our canonical chat history (`ChatMessage`s).
Out: plain frozen dataclasses, fragment strings, and errors from `messages.errors` (translated here, once).

SDK facts it relies on (shared/reference/lmstudio.md):
- The host is always explicit: discovery would find whatever LM Studio a developer has running (§1).
- Only `load_new_instance` with our own identifiers, never `.model()`: that JIT-loads, and JIT instances are
  auto-evicted behind our back (§3, §8).
- No auto-reconnect: once a socket dies every call on that client fails (§2). So a lost connection or a hang
  drops the client and the next call builds a new one. Nothing here retries: the conversation core decides.
- The sync API's only timeout is process-wide (`set_sync_api_timeout`): the longest silence between two server
  messages, reset by every frame received, progress and reasoning fragments included (§2; real-servers.md L6).
  It is set before each call: `request_timeout_s` for requests, `load_timeout_s` for loads AND chat streams,
  since a prediction can wait silently behind a load or another prediction (L7). A stream sets it again before
  each fragment it waits for, because a request made between two fragments (a model list) sets it too.
- Reasoning arrives as fragments whose `reasoning_type` is not "none" (L3): "reasoning" fragments are yielded
  tagged REASONING, the `<think>`/`</think>` tag fragments are dropped, so neither can become the reply.
- Port 1234 answers only once LM Studio's server is started (L4): a refused connection says how to start it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import lmstudio as lms

from bootstrap.logs import get_logger
from messages.base import invalid
from messages.chat import ChatMessage, FragmentKind, ReplyFragment
from messages.errors import (
    BackendUnavailable,
    Cancelled,
    ConnectionLost,
    InvalidRequest,
    LoadFailed,
    MaiError,
    ModelNotFound,
    OperationTimeout,
    OutOfMemory,
    PredictionFailed,
)

HOST_FORM = "'host:port' with no scheme and no path, e.g. '127.0.0.1:1234'"
_HOST_RE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")
# LM Studio has no structured code for a refused or failed allocation, only these words (reference §5).
_MEMORY_HINTS = ("insufficient system resources", "allocate", "memory")
_FAILED_STOP_REASONS = ("failed", "modelUnloaded")
_MISSING_CODES = ("generic.noModelMatchingQuery", "generic.pathNotFound", "generic.identifierNotFound")
# LlmPredictionFragment.reasoning_type (lmstudio-python@ae837ac:src/lmstudio/_sdk_models/__init__.py:1248-1257):
# "none" is the reply, "reasoning" the thinking, and the start/end tags arrive as content ("<think>") to drop.
_REASONING_TYPE_KIND = {"none": FragmentKind.CONTENT, "reasoning": FragmentKind.REASONING}

log = get_logger("mai.backends.lmstudio")


@dataclass(frozen=True)
class LmsDownloadedModel:
    key: str
    size_bytes: int
    max_context_length: int
    vision: bool


@dataclass(frozen=True)
class LmsInstance:
    identifier: str
    model_key: str
    context_length: int
    size_bytes: int


def check_host(host: object) -> str:
    """Return `host` if it is "host:port"; anything else (a scheme, a path, no port) is an InvalidRequest."""
    match = _HOST_RE.match(host) if isinstance(host, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise InvalidRequest(
            f"LM Studio host must be {HOST_FORM}; got {host!r}",
            details={"field": "host", "value": repr(host), "accepted": HOST_FORM},
        )
    return host  # type: ignore[return-value]


def merge_same_role(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Join consecutive messages of one role (blank line between): the SDK refuses two assistant or system
    messages in a row, and merging users ourselves keeps what the model sees independent of SDK quirks."""
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            merged[-1] = ChatMessage(message.role, f"{merged[-1].content}\n\n{message.content}")
        else:
            merged.append(message)
    return merged


def not_serving(host: str) -> str:
    """What a user does when nothing answers at `host`: port 1234 is LM Studio's optional server (L4)."""
    return (f"LM Studio at {host} is not serving: start its server with `lms server start`, or in LM Studio's "
            "Developer tab (Status: Running)")


def _server_text(exc: BaseException) -> str:
    """The server's title and cause on one line, or the SDK's own message."""
    detail = getattr(exc, "server_error", None)
    parts = [str(p) for p in (getattr(detail, "title", None), getattr(detail, "cause", None)) if p]
    if parts:
        return " — ".join(parts)
    return " ".join(str(exc).split())


def _display_code(exc: BaseException) -> str | None:
    data = getattr(getattr(exc, "server_error", None), "display_data", None)
    return data.get("code") if isinstance(data, dict) else None


# What a server-side failure means, by operation; requests that are not loads or chats find the backend unusable.
_OP_FAILURE: dict[str, type[MaiError]] = {"load": LoadFailed, "chat": PredictionFailed}


def _channel_closed_early(exc: Exception) -> bool:
    """The server closed a load or predict channel without a result. The async API says so with
    LMStudioChannelClosedError; the 1.5.0 sync API only notices when it reads the missing result."""
    return isinstance(exc, lms.LMStudioChannelClosedError) or (
        isinstance(exc, lms.LMStudioRuntimeError) and "active channel" in str(exc)
    )


def translate_error(exc: Exception, *, op: str, host: str, details: Mapping[str, object] | None = None) -> MaiError:
    """Map one SDK exception raised during `op` ("probe", "load", "chat", ...) to Mai's error vocabulary."""
    text = _server_text(exc)
    info: dict[str, object] = {"host": host, "op": op, "sdk_error": type(exc).__name__, **(details or {})}
    what = f"{op} {info['identifier']}" if info.get("identifier") else op
    if isinstance(exc, lms.LMStudioTimeoutError):
        silence = f" for {info['timeout_s']} s" if "timeout_s" in info else ""
        return OperationTimeout(f"LM Studio at {host} went silent{silence} during {what}", details=info)
    if isinstance(exc, lms.LMStudioWebsocketError):
        if "not reachable" in text:  # the SDK's sentence: "LM Studio is not reachable at ws://h:p/ns (due to ...)"
            tried = re.search(r"ws://\S+", text)
            return BackendUnavailable(f"{not_serving(host)}; {tried[0] if tried else host} was not reachable",
                                      details={**info, "sdk_text": text})
        return ConnectionLost(f"lost the connection to LM Studio at {host} during {what}: {text}", details=info)
    if _channel_closed_early(exc):
        return _OP_FAILURE.get(op, BackendUnavailable)(
            f"LM Studio at {host} closed {what} without a result: {text}", details=info
        )
    if isinstance(exc, lms.LMStudioServerError):
        if "Authentication failed" in str(exc):
            return BackendUnavailable(f"LM Studio at {host} refused the session: {text}", details=info)
        if isinstance(exc, lms.LMStudioModelNotFoundError) or _display_code(exc) in _MISSING_CODES:
            return ModelNotFound(f"LM Studio at {host} has no model matching {what}: {text}", details=info)
        if op == "load" and any(hint in str(exc).lower() for hint in _MEMORY_HINTS):
            return OutOfMemory(f"LM Studio at {host} refused {what} for lack of memory: {text}", details=info)
        return _OP_FAILURE.get(op, BackendUnavailable)(f"LM Studio at {host} failed {what}: {text}", details=info)
    if isinstance(exc, lms.LMStudioClientError):
        return BackendUnavailable(f"LM Studio at {host} is unusable ({what}): {text}", details=info)
    if isinstance(exc, (lms.LMStudioValueError, lms.LMStudioRuntimeError)):
        return InvalidRequest(f"the lmstudio SDK rejected {what}: {text}", details=info)
    if isinstance(exc, ValueError):  # 1.5.0 turns a string auth refusal into a bare ValueError (fixed in 1.6.0b1)
        return BackendUnavailable(f"LM Studio at {host} refused the session (authentication?): {exc}", details=info)
    return MaiError(f"unexpected lmstudio failure during {what} at {host}: {exc!r}", details=info)


# A lost socket or a hang leaves the client useless: the SDK never reconnects.
_DROPS_CLIENT = (BackendUnavailable, ConnectionLost, OperationTimeout)


class _CancelWatch:
    """Turns a threading.Event into one `stream.cancel()`; polled on every frame the stream delivers."""

    def __init__(self, event: threading.Event | None) -> None:
        self.event = event
        self.stream: Any = None
        self.requested = False

    def poll(self, *_: object) -> bool:
        if not self.requested and self.event is not None and self.event.is_set() and self.stream is not None:
            self.requested = True
            self.stream.cancel()
        return self.requested


class LmStudioAdapter:
    """One LM Studio server, reached through one lazily built `lmstudio.Client`."""

    def __init__(
        self,
        host: str,
        *,
        request_timeout_s: float = 10.0,
        load_timeout_s: float = 120.0,
        api_token: str | None = None,
    ) -> None:
        self._host = check_host(host)
        for name, value in (("request_timeout_s", request_timeout_s), ("load_timeout_s", load_timeout_s)):
            if not _is_positive_number(value):
                raise invalid("LmStudioAdapter", name, value, "a positive number of seconds")
        if api_token is not None and "api_token" not in inspect.signature(lms.Client).parameters:
            raise InvalidRequest(
                f"lmstudio {lms.__version__} cannot send an API token; turn off 'Require Authentication' in LM Studio "
                "or leave api_token unset",
                details={"field": "api_token"},
            )
        self._request_timeout_s = float(request_timeout_s)
        self._load_timeout_s = float(load_timeout_s)
        self._api_token = api_token
        self._lock = threading.Lock()
        self._client: lms.Client | None = None

    @property
    def host(self) -> str:
        return self._host

    # --- client lifecycle ---------------------------------------------------------------------------------------
    def _get_client(self) -> lms.Client:
        with self._lock:
            if self._client is None:
                kwargs = {"api_token": self._api_token} if self._api_token is not None else {}
                self._client = lms.Client(api_host=self._host, **kwargs)
            return self._client

    def _drop_client(self, reason: str) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            log.info("lmstudio.client_dropped", host=self._host, reason=reason)
            with contextlib.suppress(lms.LMStudioError):  # closing a dead socket may complain; it is gone anyway
                client.close()

    @contextlib.contextmanager
    def _sdk(self, op: str, timeout_s: float, **details: object) -> Iterator[lms.Client]:
        """Run SDK calls for `op`: set the silence limit, translate errors once, drop the client when it is dead."""
        lms.set_sync_api_timeout(timeout_s)
        try:
            yield self._get_client()
        except MaiError:
            raise
        except (lms.LMStudioError, ValueError) as exc:
            err = translate_error(exc, op=op, host=self._host, details={**details, "timeout_s": timeout_s})
            if isinstance(err, _DROPS_CLIENT):
                self._drop_client(err.reason.value)
            raise err from exc

    def close(self) -> None:
        self._drop_client("closed")

    # --- queries ------------------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Cheap liveness check: LM Studio answers `GET /lmstudio-greeting` (no websocket is opened)."""
        try:
            alive = lms.Client.is_valid_api_host(self._host)
        except Exception as exc:  # any failure of a 1-second greeting (reset, bad JSON, read timeout) means "not up"
            raise BackendUnavailable(
                f"{not_serving(self._host)}; its greeting failed ({exc!r})",
                details={"host": self._host, "op": "probe", "sdk_error": type(exc).__name__},
            ) from exc
        if not alive:
            raise BackendUnavailable(
                f"{not_serving(self._host)}; nothing answers GET /lmstudio-greeting",
                details={"host": self._host, "op": "probe"},
            )

    def list_downloaded(self) -> list[LmsDownloadedModel]:
        with self._sdk("list_downloaded", self._request_timeout_s) as client:
            models = client.list_downloaded_models("llm")
        return [
            LmsDownloadedModel(m.model_key, int(m.info.size_bytes), int(m.info.max_context_length), bool(m.info.vision))
            for m in models
        ]

    def list_loaded(self) -> list[LmsInstance]:
        # The raw rpc result: the SDK's handles carry only the identifier, the wire dicts carry size and context.
        with self._sdk("list_loaded", self._request_timeout_s) as client:
            raw = client.llm.remote_call("listLoaded")
        return [_instance_from_wire(item) for item in raw or []]

    def count_tokens(self, identifier: str, text: str) -> int:
        _check_identifier(identifier)
        if not isinstance(text, str):
            raise invalid("LmStudioAdapter.count_tokens", "text", text, "a string")
        with self._sdk("count_tokens", self._request_timeout_s, identifier=identifier) as client:
            return int(lms.LLM(identifier, client.llm).count_tokens(text))

    # --- lifecycle of instances -----------------------------------------------------------------------------------
    def load(
        self,
        model_key: str,
        identifier: str,
        *,
        context_length: int,
        ttl_s: float | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> LmsInstance:
        """Load a NEW instance named `identifier` (an identifier already in use is a LoadFailed).

        `ttl_s=None` means no idle TTL (the SDK would otherwise send its 1-hour default); LM Studio counts TTLs in
        whole seconds. The returned sizes come from the server (`getModelInfo` right after the load).
        """
        _check_identifier(model_key, "model_key")
        _check_identifier(identifier)
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise invalid("LmStudioAdapter.load", "context_length", context_length, "an int >= 1")
        if ttl_s is not None and not _is_positive_number(ttl_s):
            raise invalid("LmStudioAdapter.load", "ttl_s", ttl_s, "a positive number of seconds, or None for no TTL")
        ttl = None if ttl_s is None else max(1, round(ttl_s))
        with self._sdk("load", self._load_timeout_s, identifier=identifier, model_key=model_key) as client:
            handle = client.llm.load_new_instance(
                model_key, identifier, ttl=ttl, config={"contextLength": context_length}, on_load_progress=on_progress
            )
            info = handle.get_info()
        return LmsInstance(info.identifier, info.model_key, int(info.context_length), int(info.size_bytes))

    def unload(self, identifier: str) -> None:
        """Unload `identifier`; one that is not loaded (TTL, evicted, never loaded) is already where we want it."""
        _check_identifier(identifier)
        try:
            with self._sdk("unload", self._request_timeout_s, identifier=identifier) as client:
                client.llm.unload(identifier)
        except ModelNotFound:
            log.info("lmstudio.unload_skipped", host=self._host, identifier=identifier, reason="not_loaded")

    # --- chat -----------------------------------------------------------------------------------------------------
    def chat_stream(
        self,
        identifier: str,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 1024,
        temperature: float = 0.7,
        cancel: threading.Event | None = None,
    ) -> Iterator[ReplyFragment]:
        """Stream the reply of `identifier` to our whole history, rebuilt as an SDK Chat on every call, as fragments
        tagged CONTENT or REASONING (a reasoning model's thinking, which the caller keeps out of the reply).

        Arguments are checked now; the request starts on the first `next()`. At most `load_timeout_s` may pass
        between two frames (reasoning frames count). When `cancel` is set the prediction is cancelled on the
        server and `Cancelled` is raised once the stream has ended. A stop reason of failed/modelUnloaded raises
        PredictionFailed.
        """
        _check_identifier(identifier)
        where = "LmStudioAdapter.chat_stream"
        if not messages:
            raise invalid(where, "messages", messages, "a non-empty sequence of ChatMessage")
        strays = [m for m in messages if not isinstance(m, ChatMessage)]
        if strays:
            raise invalid(where, "messages", strays[0], "ChatMessage items only")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid(where, "max_tokens", max_tokens, "an int >= 1")
        if not (_is_number(temperature) and 0 <= temperature <= 2):
            raise invalid(where, "temperature", temperature, "a number in [0, 2]")
        history = {"messages": [{"role": m.role, "content": m.content} for m in merge_same_role(messages)]}
        try:
            chat = lms.Chat.from_history(history)
        except lms.LMStudioError as exc:
            raise invalid(where, "messages", len(messages), f"a history the SDK accepts ({exc})") from exc
        config = {"maxTokens": max_tokens, "temperature": float(temperature)}
        return self._stream(identifier, chat, config, cancel)

    def _stream(
        self, identifier: str, chat: Any, config: dict[str, Any], cancel: threading.Event | None
    ) -> Iterator[ReplyFragment]:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"chat with {identifier} cancelled before it started", details={"identifier": identifier})
        watch = _CancelWatch(cancel)
        silence_s = self._load_timeout_s
        with self._sdk("chat", silence_s, identifier=identifier) as client:
            llm = lms.LLM(identifier, client.llm)  # a symbolic handle: no request, and never a JIT load
            stream = llm.respond_stream(chat, config=config, on_prompt_processing_progress=watch.poll)
            watch.stream = stream
            fragments = iter(stream)  # held here: a bare for-loop would close it before `except` could cancel
            try:
                while True:
                    lms.set_sync_api_timeout(silence_s)  # another call between two fragments set its own limit
                    fragment = next(fragments, None)
                    if fragment is None:
                        break
                    kind = _REASONING_TYPE_KIND.get(fragment.reasoning_type)
                    if not watch.poll() and kind is not None and fragment.content:
                        yield ReplyFragment(fragment.content, kind)
            except GeneratorExit:  # the consumer walked away: stop the server generating for nobody
                with contextlib.suppress(lms.LMStudioError):
                    stream.cancel()
                raise
            finally:
                fragments.close()
            stop_reason = stream.result().stats.stop_reason
        details = {"identifier": identifier, "stop_reason": stop_reason, "host": self._host}
        if watch.requested:
            raise Cancelled(f"chat with {identifier} cancelled", details=details)
        if stop_reason in _FAILED_STOP_REASONS:
            raise PredictionFailed(
                f"LM Studio at {self._host} stopped {identifier} mid-reply: {stop_reason}", details=details
            )
        if stop_reason == "userStopped":
            raise Cancelled(f"chat with {identifier} was stopped by LM Studio, not by Mai", details=details)


def _check_identifier(value: object, field: str = "identifier") -> None:
    if not isinstance(value, str) or not value.strip():
        raise invalid("LmStudioAdapter", field, value, "a non-empty string")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: object) -> bool:
    return _is_number(value) and value > 0  # type: ignore[operator]


def _instance_from_wire(item: dict[str, Any]) -> LmsInstance:
    return LmsInstance(
        identifier=str(item["identifier"]),
        model_key=str(item["modelKey"]),
        context_length=int(item.get("contextLength") or -1),
        size_bytes=int(item.get("sizeBytes") or 0),
    )
