"""What every Mai actor shares: Init/Peers wiring, Ping, logging set up inside its own process, typed
failures instead of Thespian's retry-then-PoisonMessage, and a log line for messages nobody handles."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from typing import Any

import bootstrap.loopback  # noqa: F401  (re-applies the loopback bind in spawned processes)
from thespian.actors import ActorTypeDispatcher

from bootstrap.logs import configure_structlog, get_logger
from messages.base import revalidate
from messages.errors import InvalidRequest
from messages.failure import Failure
from messages.system import Init, Peers, Ping, Pong


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that created it dies.

    Thespian's children outlive a SIGKILLed parent: re-parented to init, they idle forever holding their model,
    VRAM and sockets, while the parent's successor starts new ones. Linux only; elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


class MaiActor(ActorTypeDispatcher):
    """Subclasses set `role` and implement `on_init(init)`; handlers stay thin and call pure cores."""

    role = "actor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        die_with_parent()
        self.config: Any = None
        self.peers: dict[str, Any] = {}
        self.started_at = time.time()
        self.log = get_logger(f"mai.{self.role}")
        self._before_init: list[tuple[Any, Any]] = []

    def receiveMessage(self, msg: Any, sender: Any) -> Any:
        if type(msg).__module__.startswith("messages.") and not self._valid_on_arrival(msg, sender):
            return None
        # Peers start in any order: a message of ours that overtakes this actor's Init waits for it, then runs.
        if self.config is None and type(msg).__module__.startswith("messages.") and not isinstance(msg, (Init, Ping)):
            self._before_init.append((msg, sender))
            return None
        return super().receiveMessage(msg, sender)

    def _valid_on_arrival(self, msg: Any, sender: Any) -> bool:
        """Unpickling skipped the message's own checks: run them again, so no handler sees a value its constructor
        refuses. A refused request is answered with a Failure naming the field; anything else is dropped."""
        try:
            revalidate(msg)
        except InvalidRequest as err:
            self.log.warning("message.invalid", role=self.role, message_type=type(msg).__name__, error=str(err))
            request_id = getattr(msg, "request_id", None)
            if isinstance(request_id, str) and request_id.strip() and not isinstance(msg, Failure):
                self.send(sender, Failure.from_error(request_id, err))
            return False
        return True

    # --- wiring -------------------------------------------------------------------------------------------
    def receiveMsg_Init(self, msg: Init, sender: Any) -> None:
        first = self.config is None
        self.config = msg.config
        self.peers = dict(msg.peers)
        if first:
            configure_structlog(msg.config.logging.level)
        self.log.info("actor.init", role=self.role, pid=os.getpid(), restart_count=msg.restart_count)
        self.guarded("", sender, self.on_init, msg)
        early, self._before_init = self._before_init, []
        for message, message_sender in early:
            super().receiveMessage(message, message_sender)

    def receiveMsg_Peers(self, msg: Peers, sender: Any) -> None:
        before, self.peers = self.peers, dict(msg.peers)
        restarted = frozenset(role for role, address in self.peers.items()
                              if address is not None and before.get(role) != address)
        self.on_peers(restarted)

    def receiveMsg_Ping(self, msg: Ping, sender: Any) -> None:
        self.send(sender, Pong(msg.request_id, self.role, os.getpid(), self.started_at))

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        self.log.info("actor.exit", role=self.role)

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> None:
        # Thespian drops unknown types silently; say so, and answer requests with a typed failure.
        self.log.warning("message.unrecognized", role=self.role, message_type=type(msg).__name__)
        request_id = getattr(msg, "request_id", None)
        if isinstance(request_id, str) and not isinstance(msg, Failure):  # never answer an answer: no ping-pong
            self.send(sender, Failure(request_id, "invalid_request", f"{self.role} does not accept {type(msg).__name__}"))

    # --- hooks ----------------------------------------------------------------------------------------------
    def on_init(self, init: Init) -> None:
        """Rebuild state from the world (reconcile); called on first start and after every restart."""

    def on_peers(self, restarted: frozenset[str]) -> None:
        """These peers were restarted and have new addresses: whatever we asked their predecessors is lost."""

    # --- helpers --------------------------------------------------------------------------------------------
    def guarded(self, request_id: str, reply_to: Any, fn: Any, *args: Any) -> Any:
        """Run `fn`; an exception becomes a typed Failure reply (Thespian would otherwise re-run the handler,
        repeating side effects such as a model load, then send a PoisonMessage)."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the one place where anything is turned into a typed failure
            self.log.error("handler.failed", role=self.role, error=str(err), error_type=type(err).__name__,
                           trace=traceback.format_exc(limit=5))
            if reply_to is not None and request_id:
                self.send(reply_to, Failure.from_error(request_id, err))
            return None
