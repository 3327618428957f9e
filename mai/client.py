"""The client an ExecutionLoop imports: `mai.connect()` → `MaiClient`.

Thespian's external handle is not thread-safe and `ask` returns whatever arrives next (reference thespian.md §5),
so each thread gets its own private endpoint and every reply is matched by request id. Every call has a timeout
and raises a `MaiError` subclass whose `.reason` says why.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from bootstrap import system as boot
from messages.base import new_request_id
from messages.errors import ConnectionLost, InvalidRequest, MaiError, NotRunning, OperationTimeout
from messages.failure import Failure
from messages.requests import (
    AcquireLease,
    ClipDeviceIs,
    ClipPlaced,
    EmbedImages,
    EmbedTexts,
    Embeddings,
    EnsureVlm,
    GetClipDevice,
    GetStatus,
    LeaseGranted,
    LeaseReleased,
    ModeAccepted,
    ModeReached,
    PlaceClip,
    ReleaseLease,
    SetMode,
    Subscribe,
    Unsubscribe,
    VlmReady,
)
from messages.status import Status
from messages.system import GetSystemInfo, Ping, Pong, SystemInfo

_SLACK_S = 2.0  # the actor answers at its own deadline; wait a little longer than that for the reply
RESTART_CHECK_S = 2.0  # after this long without the answer, ask the supervisor whether the actor was restarted
NOT_RESENT = frozenset({"NewConversation"})  # the one request that is not idempotent: a second would start another


class ClipDevice(str):
    """The device CLIP's weights are on, compared as a plain string (`== "unavailable"`), with the mover's reason
    for a degraded CLIP attached: the caller who sees "unavailable" learns why in the same answer."""

    reason: str

    def __new__(cls, device: str, reason: str = "") -> ClipDevice:
        obj = super().__new__(cls, device)
        obj.reason = reason
        return obj


class _Replaced(Exception):
    """The actor asked was restarted before it answered: the request died with it."""


class MaiClient:
    def __init__(self, cfg: Any, asys: Any) -> None:
        from thespian.actors import ExternalContext

        self.config = cfg
        self._asys = asys
        self._context_cls = ExternalContext
        self._local = threading.local()
        self._contexts: list[Any] = []
        self._lock = threading.Lock()  # guards the address cache and the context list only, never an ask
        self._lookup_lock = threading.Lock()  # one global-name lookup on the shared system handle at a time
        self._info: SystemInfo | None = None
        self._supervisor = boot.supervisor_address(asys)

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _context(self) -> Any:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._context_cls(self._asys._systemBase.external_clone())
            self._local.ctx = ctx
            with self._lock:
                self._contexts.append(ctx)
        return ctx

    def _ask_address(self, address: Any, message: Any, timeout_s: float,
                     replaced: Callable[[], bool] | None = None) -> Any:
        """Send and wait for the reply with this request id; every `RESTART_CHECK_S` of silence, `replaced()`
        may say the actor is gone (`_Replaced`). `ask`, not `tell`: an external tell to a dead actor blocks until
        Thespian gives up on it (35 s), an ask returns at its timeout."""
        request_id = message.request_id
        ctx = self._context()
        deadline = time.monotonic() + timeout_s
        slice_s = RESTART_CHECK_S if replaced is not None else timeout_s
        reply = ctx.ask(address, message, min(timeout_s, slice_s))
        while True:
            if reply is None:
                if replaced is not None and time.monotonic() < deadline and replaced():
                    self._drop_context()
                    raise _Replaced()
            elif getattr(reply, "request_id", None) == request_id:
                if isinstance(reply, Failure):
                    raise reply.to_error()
                return reply
            # else: a late reply to an earlier, timed-out ask: skip it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop_context()
                raise OperationTimeout(f"no answer to {type(message).__name__} within {timeout_s:.1f} s")
            reply = ctx.listen(min(remaining, slice_s))

    def system_info(self, timeout_s: float | None = None) -> SystemInfo:
        timeout_s = timeout_s or self.config.system.ask_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                supervisor = self._supervisor
            try:
                info = self._ask_address(supervisor, GetSystemInfo(new_request_id()),
                                         max(0.05, deadline - time.monotonic()),
                                         lambda asked=supervisor: self._supervisor_replaced(asked))
            except _Replaced:
                continue  # ask the revived supervisor within the same timeout
            with self._lock:
                self._info = info
            return info

    def _supervisor_replaced(self, asked: Any) -> bool:
        """A silent supervisor may have died and been revived at a new address (bootstrap's foreground process
        does that): look its global name up again, so a long-lived client follows it."""
        with self._lookup_lock:
            current = boot.supervisor_address(self._asys)
        if current == asked:
            return False
        with self._lock:
            self._supervisor, self._info = current, None
        return True

    def _address(self, role: str) -> Any:
        with self._lock:
            info = self._info
        if info is None or info.address_of(role) is None:
            info = self.system_info()
        address = info.address_of(role)
        if address is None:
            raise NotRunning(f"the {role} actor is restarting; try again in a moment")
        return address

    def _ask(self, role: str, message: Any, timeout_s: float) -> Any:
        """Ask the actor playing `role`. If it is restarted before it answers (a crash), its successor is asked
        the same (idempotent) request within the same timeout: the caller gets an answer, not a long wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            address = self._address(role)
            try:
                return self._ask_address(address, message, max(0.05, deadline - time.monotonic()),
                                         lambda asked=address: self._replaced(role, asked, deadline))
            except _Replaced:
                if type(message).__name__ in NOT_RESENT:
                    raise ConnectionLost(f"the {role} actor was restarted while handling {type(message).__name__}; "
                                         "it may or may not have been done") from None
            except OperationTimeout:
                with self._lock:
                    self._info = None  # the actor may have been restarted at a new address
                raise

    def _drop_context(self) -> None:
        """This thread's endpoint got no answer in time: it may have sent to a dead actor, a send Thespian retries
        for 35 s while the endpoint receives nothing else. It is closed; the next call gets a fresh one."""
        ctx, self._local.ctx = getattr(self._local, "ctx", None), None
        if ctx is None:
            return
        with self._lock:
            if ctx in self._contexts:
                self._contexts.remove(ctx)
        try:
            ctx.exit_clone()
        except Exception:  # noqa: BLE001 - closing best effort, as in close()
            pass

    def _replaced(self, role: str, address: Any, deadline: float) -> bool:
        """The supervisor has a successor for `role` at another address (asked on a private endpoint, so the
        reply we are waiting for is not consumed here; never past the caller's deadline)."""
        timeout_s = min(self.config.system.ask_timeout_s, deadline - time.monotonic())
        if timeout_s <= 0.05:
            return False
        info = boot.system_info(self._asys, self._supervisor, timeout_s)
        if info is None or info.address_of(role) in (None, address):
            return False
        with self._lock:
            self._info = info
        return True

    # --- modes and the VLM ------------------------------------------------------------------------------------
    def set_mode(self, mode: str, *, wait: bool = False, timeout_s: float = 120.0) -> ModeAccepted | ModeReached:
        return self._ask("coordinator", SetMode(new_request_id(), mode, wait, timeout_s), timeout_s + _SLACK_S)

    def ensure_vlm_loaded(self, timeout_s: float = 120.0) -> VlmReady:
        return self._ask("coordinator", EnsureVlm(new_request_id(), True, timeout_s), timeout_s + _SLACK_S)

    def ensure_vlm_unloaded(self, timeout_s: float = 120.0) -> VlmReady:
        return self._ask("coordinator", EnsureVlm(new_request_id(), False, timeout_s), timeout_s + _SLACK_S)

    def vlm(self, holder: str | None = None, *, ttl_s: float | None = None, timeout_s: float = 120.0) -> "Lease":
        """A lease on the VLM: loaded on demand, never unloaded while held. Use as a context manager; call
        Ollama directly at `lease.host` with `lease.model` and `options={"num_ctx": lease.num_ctx}`."""
        ttl = ttl_s if ttl_s is not None else self.config.ollama.lease_ttl_s
        message = AcquireLease(new_request_id(), holder or f"pid-{os.getpid()}", ttl, timeout_s)
        granted: LeaseGranted = self._ask("coordinator", message, timeout_s + _SLACK_S)
        return Lease(self, granted)

    def release_lease(self, lease_id: str) -> LeaseReleased:
        return self._ask("coordinator", ReleaseLease(new_request_id(), lease_id), self.config.system.ask_timeout_s)

    # --- CLIP ---------------------------------------------------------------------------------------------------
    def embed_images(self, images: Sequence[str | Path] | Any, timeout_s: float = 60.0) -> Any:
        """Embed images given as file paths, or as a uint8 array (n, H, W, 3) passed through shared memory."""
        if isinstance(images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in images):
            paths = tuple(str(Path(p).resolve()) for p in images)
            return self._ask("clip", EmbedImages(new_request_id(), paths), timeout_s).vectors
        return self._embed_array(images, timeout_s)

    def _embed_array(self, array: Any, timeout_s: float) -> Any:
        from multiprocessing import shared_memory

        import numpy as np

        from backends.shm import shm_free_bytes
        from mai.core.shm_plan import plan_shm_batches

        arr = np.ascontiguousarray(array, dtype=np.uint8)
        if arr.ndim != 4 or arr.shape[3] != 3 or 0 in arr.shape:
            raise InvalidRequest(f"images: got an array of shape {arr.shape}; accepted: file paths or uint8 (n, H, W, 3)")
        # /dev/shm may be 64 MiB (Docker's default) and overfilling it is SIGBUS, not an error: slices that fit,
        # or files when not even one image does.
        plan = plan_shm_batches(len(arr), arr[0].nbytes, shm_free_bytes())
        if plan is None:
            return self._embed_as_files(arr, timeout_s)
        parts = []
        for lo, hi in plan:
            chunk = arr[lo:hi]
            shm = shared_memory.SharedMemory(create=True, size=chunk.nbytes)
            try:  # the handle stays open until the reply (Windows frees a block when its last handle closes)
                np.ndarray(chunk.shape, dtype=np.uint8, buffer=shm.buf)[:] = chunk
                message = EmbedImages(new_request_id(), (), shm.name, tuple(int(x) for x in chunk.shape))
                parts.append(self._ask("clip", message, timeout_s).vectors)
            finally:
                shm.close()
                shm.unlink()
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _embed_as_files(self, arr: Any, timeout_s: float) -> Any:
        """The images as lossless PNG files in a private temporary directory (on disk, not in /dev/shm)."""
        import tempfile

        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="mai-images-") as directory:
            paths = []
            for index, pixels in enumerate(arr):
                path = os.path.join(directory, f"{index}.png")
                Image.fromarray(pixels).save(path, compress_level=1)
                paths.append(path)
            return self._ask("clip", EmbedImages(new_request_id(), tuple(paths)), timeout_s).vectors

    def embed_texts(self, texts: Sequence[str], timeout_s: float = 60.0) -> Any:
        reply: Embeddings = self._ask("clip", EmbedTexts(new_request_id(), tuple(texts)), timeout_s)
        return reply.vectors

    def get_clip_device(self) -> ClipDevice:
        """"cpu", "cuda:N" (or the simulator's "sim-gpu"), or "unavailable" for a CLIP whose model does not exist;
        `.reason` says why CLIP is degraded ("" when it is not)."""
        reply: ClipDeviceIs = self._ask("clip", GetClipDevice(new_request_id()), self.config.system.ask_timeout_s)
        return ClipDevice(reply.device, reply.reason)

    def migrate_clip_to_gpu(self, timeout_s: float = 60.0) -> str:
        reply: ClipPlaced = self._ask("coordinator", PlaceClip(new_request_id(), "gpu", timeout_s), timeout_s + _SLACK_S)
        return reply.device

    def migrate_clip_to_cpu(self, timeout_s: float = 60.0) -> str:
        reply: ClipPlaced = self._ask("coordinator", PlaceClip(new_request_id(), "cpu", timeout_s), timeout_s + _SLACK_S)
        return reply.device

    # --- chat models ---------------------------------------------------------------------------------------------
    def preload(self, model: str, timeout_s: float = 300.0) -> Any:
        """Load chat model `model` now, through the GPU gate, so the next turn finds it ready; returns
        `ModelPreloaded` (`load_s`, `already_loaded`). Refused (InsufficientVram) when it does not fit, saying the
        bytes needed, what is free and what would have to yield. It yields like any idle chat model later."""
        from messages.conversation import PreloadModel

        return self._ask("chat", PreloadModel(new_request_id(), model, timeout_s), timeout_s + _SLACK_S)

    # --- status and events -----------------------------------------------------------------------------------
    def get_status(self, timeout_s: float | None = None) -> Status:
        return self._ask("coordinator", GetStatus(new_request_id()), timeout_s or self.config.system.ask_timeout_s)

    def ping_all(self, timeout_s: float = 1.0) -> dict[str, Pong | None]:
        """Each actor's answer to a ping (None: it did not answer in time)."""
        info = self.system_info()
        answers: dict[str, Pong | None] = {}
        for child in info.children:
            try:
                answers[child.role] = self._ask_address(child.address, Ping(new_request_id()), timeout_s) if child.address else None
            except MaiError:
                answers[child.role] = None
        return answers

    def subscribe(self, ttl_s: float = 30.0, *, duration_s: float | None = None, stop: threading.Event | None = None,
                  ready: threading.Event | None = None) -> Iterator[Any]:
        """Yield events as they come (ModeChanged, ResourceChanged, IdleUnloaded, ...); renews the
        subscription as it goes. Stop by breaking out of the loop, after `duration_s`, or by setting `stop` from
        another thread (the iteration ends within a quarter second, even when no event comes). `ready` is set once
        the coordinator has acknowledged the subscription: no event published after that is missed."""
        end = None if duration_s is None else time.monotonic() + duration_s
        with self._asys.private() as ctx:
            renew_at = 0.0
            request_id = ""
            try:
                while True:
                    now = time.monotonic()
                    if (end is not None and now >= end) or (stop is not None and stop.is_set()):
                        return
                    if now >= renew_at:
                        # Look the coordinator up afresh: a restarted one lives at a new address and knows no
                        # subscribers, so renewing at the cached address would go quiet for good.
                        with self._lock:
                            self._info = None
                        try:
                            coordinator = self._address("coordinator")
                        except MaiError:
                            renew_at = now + min(1.0, ttl_s / 3)  # restarting: try again shortly
                        else:
                            request_id = new_request_id()
                            ctx.tell(coordinator, Subscribe(request_id, ttl_s))
                            renew_at = now + ttl_s / 3
                    wait_until = renew_at if end is None else min(renew_at, end)
                    if stop is not None:
                        wait_until = min(wait_until, now + 0.25)
                    message = ctx.listen(max(0.05, wait_until - time.monotonic()))
                    if message is None or hasattr(message, "request_id"):
                        if ready is not None and message is not None and message.request_id == request_id:
                            ready.set()
                        continue  # a timeout, or the Subscribed acknowledgement
                    yield message
            finally:
                try:
                    ctx.tell(self._address("coordinator"), Unsubscribe(request_id))
                except MaiError:
                    pass

    def close(self) -> None:
        with self._lock:
            contexts, self._contexts = self._contexts, []
        for ctx in contexts:
            try:
                ctx.exit_clone()
            except Exception:  # noqa: BLE001 - closing best effort
                pass
        boot._close(self._asys)

    def __enter__(self) -> "MaiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Lease:
    """A held VLM lease. `with client.vlm() as lease:` releases it at the end of the block."""

    client: MaiClient
    granted: LeaseGranted
    released: bool = False

    @property
    def model(self) -> str:
        return self.granted.model

    @property
    def host(self) -> str:
        return self.granted.host

    @property
    def num_ctx(self) -> int:
        return self.granted.num_ctx

    @property
    def lease_id(self) -> str:
        return self.granted.lease_id

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.release_lease(self.granted.lease_id)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def connect(config_path: str | Path | None = None, *, config: Any = None, timeout_s: float | None = None) -> MaiClient:
    """Attach to the running Mai (started with `mai start`) using the same configuration it runs with."""
    from config import load_config

    cfg = config if config is not None else load_config(config_path)
    return MaiClient(cfg, boot.attach(cfg, timeout_s))
