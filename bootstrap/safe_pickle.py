"""Make what arrives on Thespian's sockets inert: only Mai's messages and Thespian's own wire classes unpickle.

Thespian's TCP transport reads every message with `pickle.loads` and no authentication (reference thespian.md
§8.1): anyone who can reach a port, the admin's or any actor's, can send a pickle whose reduce step calls
`os.system`. We replace the transport's deserializer with an unpickler whose `find_class` only resolves
classes defined in Mai's `messages` package and `config.schema`, the Thespian classes that really travel
between Mai's processes (found by running the system tests with a recording unpickler), and a few plain
stdlib and numpy types they contain. Anything else raises `RefusedPickle` before any object is built, so
nothing runs; Thespian then answers the sender with a data error and drops that connection only. Each
refusal is logged as `pickle.refused` with the peer, the listener and the global that was asked for.

A Thespian `PendingActor` (a request to create an actor) is also refused unless it names an Actor subclass in
Mai's `actors` package (or the benchmarks' `bench`) and carries no loaded source: creating an actor imports the
named module and calls the named object, so allowlisted classes alone could still run any importable code.

Like `bootstrap.loopback` (which applies this), it must be in place before `ActorSystem()` in every process;
forked processes inherit it and actor modules re-apply it on import.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import threading
from typing import Any

from thespian.actors import Actor
from thespian.system import logdirector
from thespian.system.messages.admin import PendingActor
from thespian.system.transport import TCPTransport, Thespian__UpdateWork, TransmitIntent
from thespian.system.transport.streamBuffer import ReceiveBuffer

from bootstrap.logs import get_logger

log = get_logger("mai.security")

# Packages whose own classes may be unpickled: Mai's messages and the configuration they carry (Init.config).
MAI_CLASS_PACKAGES = ("messages", "config.schema")
# Module-level functions of Mai that pickles legitimately call.
MAI_FUNCTIONS = frozenset({("messages.errors", "_rebuild_error")})
# The packages whose Actor subclasses a creation request may name: Mai's actors, and the benchmarks' echo actor.
ACTOR_PACKAGES = ("actors.", "bench.")

# Thespian's wire classes seen between Mai's processes (admin, logger, actors, clients) while the system tests
# ran with a recording unpickler. Deliberately absent: source loading (ValidateSource, SourceHashTransfer*),
# conventions (ConventionRegister, ConventionInvite), capability updates. Mai uses none of them.
THESPIAN_GLOBALS = frozenset(
    {
        ("thespian.actors", "ActorAddress"),
        ("thespian.actors", "ActorExitRequest"),
        ("thespian.actors", "ChildActorExited"),
        ("thespian.actors", "DeadEnvelope"),
        ("thespian.actors", "PoisonMessage"),
        ("thespian.system.transport.IPBase", "TCPv4ActorAddress"),
        ("thespian.system.messages.admin", "PendingActor"),
        ("thespian.system.messages.admin", "PendingActorResponse"),
        ("thespian.system.messages.admin", "QueryAck"),
        ("thespian.system.messages.admin", "QueryExists"),
        ("thespian.system.messages.admin", "SystemShutdown"),
        ("thespian.system.messages.admin", "SystemShutdownCompleted"),
        ("thespian.system.messages.multiproc", "EndpointConnected"),
        ("thespian.system.messages.multiproc", "LoggerConnected"),
        ("thespian.system.messages.status", "Thespian_StatusReq"),
        ("thespian.system.messages.status", "Thespian_SystemStatus"),
        ("thespian.system.logdirector", "LoggerExitRequest"),
        ("thespian.system.timing", "ExpirationTimer"),
    }
)

# Plain data types found inside those messages (addresses hold socket enums, the config holds paths, log
# records travel to the logger process, embeddings are numpy arrays), plus sets. Calling any of these with
# whatever arguments a pickle supplies only builds a value.
STDLIB_GLOBALS = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("socket", "AddressFamily"),
        ("socket", "SocketKind"),
        ("datetime", "timedelta"),
        ("pathlib", "PosixPath"),
        ("logging", "LogRecord"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1
    }
)


class RefusedPickle(pickle.UnpicklingError):
    """A pickle named a global outside the allowlist (or asked to create an actor outside Mai's)."""

    def __init__(self, refused: str, why: str) -> None:
        super().__init__(f"refused to unpickle {refused}: {why}")
        self.refused = refused


_ACCEPTED = (
    "only classes defined in Mai's messages package or config.schema, the Thespian wire classes and the "
    "plain data types listed in bootstrap/safe_pickle.py are accepted"
)


def _mai_class(module: str, name: str) -> Any:
    """The class `module.name` if it is defined in one of Mai's message packages, else None."""
    if "." in name or not any(module == p or module.startswith(p + ".") for p in MAI_CLASS_PACKAGES):
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and obj.__module__ == module else None


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only allowlisted globals; everything else raises `RefusedPickle`."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and ((module, name) in THESPIAN_GLOBALS or (module, name) in STDLIB_GLOBALS
                                or (module, name) in MAI_FUNCTIONS):
            return super().find_class(module, name)
        cls = _mai_class(module, name)
        if cls is not None:
            return cls
        raise RefusedPickle(f"{module}.{name}", _ACCEPTED)


def _check_creation(obj: Any) -> None:
    """Refuse a request to create an actor that is not one of Mai's (see the module's docstring)."""
    message = obj[1] if isinstance(obj, tuple) and len(obj) == 2 else obj
    if not isinstance(message, PendingActor):
        return
    name = message.actorClassName
    accepted = f"an Actor class in {' or '.join(p + '*' for p in ACTOR_PACKAGES)} and no loaded source"
    if not isinstance(name, str) or not name.startswith(ACTOR_PACKAGES) or message.sourceHash is not None:
        raise RefusedPickle(f"createActor({name!r})", "accepted: " + accepted)
    module, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as err:
        raise RefusedPickle(f"createActor({name!r})", f"{err}; accepted: {accepted}") from None
    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise RefusedPickle(f"createActor({name!r})", "accepted: " + accepted)


def loads(data: bytes, *, peer: str = "unknown", listener: str = "unknown") -> Any:
    """Unpickle one Thespian message through `SafeUnpickler`; log and re-raise a refusal."""
    try:
        obj = SafeUnpickler(io.BytesIO(data)).load()
        _check_creation(obj)
    except RefusedPickle as err:
        log.warning("pickle.refused", peer=peer, listener=listener, refused=err.refused, pid=os.getpid(),
                    size_bytes=len(data))
        _send_queued_log_records()
        raise
    return obj


def _send_queued_log_records() -> None:
    """Make the refusal's log record leave now. In an actor or the admin, a record goes to the logger process
    through this same transport, which is in the middle of reading a socket: Thespian only queues the record
    then, and an idle actor would keep it until something else moved its transmit queue. So tickle the queue
    the way Thespian's own run loops do (an UpdateWork intent), with the exclusive flag the reader holds."""
    transport = logdirector.logTransport
    if transport is None or threading.current_thread() is not threading.main_thread():
        return  # the logger process logs directly; other threads' records are sent by Thespian's usual path
    transport.scheduleTransmit(None, TransmitIntent(transport.myAddress, Thespian__UpdateWork()),
                               has_exclusive_flag=True)


def _endpoint(sock: Any, which: str) -> str:
    try:
        host, port = getattr(sock, which)()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, TypeError, ValueError):
        return "unknown"


class _GuardedSerializer:
    """Stands in for the `pickle` module that TCPTransport uses as `serializer` (ack buffers use it directly)."""

    dumps = staticmethod(pickle.dumps)
    loads = staticmethod(loads)


_original_incoming_init = TCPTransport.TCPIncoming_Common.__init__


def _incoming_init(self: Any, rmtAddr: Any, baseSock: Any, rcvBuf: Any = None) -> None:
    """Give every incoming connection a buffer whose deserializer knows the peer, for the refusal log."""
    if rcvBuf is None:
        rcvBuf = ReceiveBuffer(functools.partial(loads, peer=_endpoint(baseSock, "getpeername"),
                                                 listener=_endpoint(baseSock, "getsockname")))
    _original_incoming_init(self, rmtAddr, baseSock, rcvBuf)


def apply() -> None:
    """Install the guard in this process (and every process it forks). Idempotent."""
    TCPTransport.serializer = _GuardedSerializer
    TCPTransport.TCPIncoming_Common.__init__ = _incoming_init


def applied() -> bool:
    return TCPTransport.serializer is _GuardedSerializer and TCPTransport.TCPIncoming_Common.__init__ is _incoming_init
