"""The restricted unpickler: Mai's messages and Thespian's wire classes round-trip, anything that could run code
is refused before it runs, with a log line naming the peer and the global."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import io
import logging
import os
import pickle
import pkgutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs
from thespian.actors import ActorAddress, ActorExitRequest, ChildActorExited
from thespian.system.messages.admin import PendingActor
from thespian.system.messages.status import Thespian_StatusReq
from thespian.system.transport import TCPTransport
from thespian.system.transport.IPBase import TCPv4ActorAddress
from thespian.system.transport.streamBuffer import toSendBuffer

import bootstrap.loopback as loopback
import messages
from bootstrap import safe_pickle
from bootstrap.logs import plain_fields
from bootstrap.safe_pickle import RefusedPickle, SafeUnpickler
from config import load_config
from messages.errors import InsufficientVram, Reason
from messages.failure import Failure
from messages.requests import Embeddings
from messages.system import Init


def safe_loads(data: bytes) -> object:
    return SafeUnpickler(io.BytesIO(data)).load()


def every_message_class() -> list[type]:
    """Every class defined in a module of the `messages` package, found by walking it (nothing to forget)."""
    found = []
    for info in pkgutil.iter_modules(messages.__path__, "messages."):
        module = importlib.import_module(info.name)
        found += [obj for _, obj in inspect.getmembers(module, inspect.isclass) if obj.__module__ == info.name]
    return found


def an_instance(cls: type) -> object:
    """An instance without running validation (unpickling never runs __init__ either): defaults or plain text."""
    if issubclass(cls, enum.Enum):
        return next(iter(cls))
    if issubclass(cls, BaseException):
        return cls("a message")
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "x"
        object.__setattr__(obj, f.name, value)
    return obj


def address(port: int) -> ActorAddress:
    return ActorAddress(TCPv4ActorAddress("127.0.0.1", port, external=True))


class RunsCode:
    """The classic payload: unpickling calls `func(*args)`."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_message_classes_are_found():
    names = {cls.__name__ for cls in every_message_class()}
    assert {"SetMode", "Status", "Init", "Failure", "Reason", "MaiError", "ReplyChunk", "TerminalLine"} <= names


@pytest.mark.parametrize("cls", every_message_class(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_message_class_round_trips(cls):
    original = an_instance(cls)
    copy = safe_loads(pickle.dumps((address(1900), original)))[1]
    assert type(copy) is cls
    if dataclasses.is_dataclass(cls) or isinstance(original, enum.Enum):
        assert copy == original
    else:
        assert str(copy) == str(original)


def test_real_messages_with_their_contents_round_trip():
    cfg = load_config(env={})
    init = Init(cfg, (("coordinator", address(40001)), ("clip", address(40002))), restart_count=2)
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    error = InsufficientVram("no room", details={"needed_bytes": 5, "free_bytes": 1})

    got_init = safe_loads(pickle.dumps(init))
    assert got_init.config == cfg and got_init.peer("clip") == address(40002)
    got = safe_loads(pickle.dumps(Embeddings("r1", vectors, "cpu", "ViT-B-32")))
    assert np.array_equal(got.vectors, vectors) and got.vectors.dtype == np.float32
    got_error = safe_loads(pickle.dumps(error))
    assert type(got_error) is InsufficientVram and got_error.details == error.details
    assert got_error.reason is Reason.INSUFFICIENT_VRAM
    failure = Failure.from_error("r2", error)
    assert safe_loads(pickle.dumps(failure)).to_error().reason is Reason.INSUFFICIENT_VRAM


def test_thespian_wire_messages_round_trip():
    sender = address(1900)
    record = logging.LogRecord("mai.coordinator", logging.INFO, "x.py", 1, "mode.changed", None, None)
    record.mode, record.paths = "AUTOPILOT", [Path("/tmp/a")]
    for message in (
        PendingActor("actors.supervisor.Supervisor", None, 1, None, "mai-supervisor"),
        ChildActorExited(address(40003)),
        ActorExitRequest(),
        Thespian_StatusReq(),
    ):
        got_sender, got = safe_loads(pickle.dumps((sender, message)))
        assert got_sender == sender and type(got) is type(message)
    got_record = safe_loads(pickle.dumps((sender, record)))[1]
    assert got_record.getMessage() == "mode.changed" and got_record.mode == "AUTOPILOT"


def test_log_fields_of_any_type_reach_the_logger_process_as_plain_data():
    """Actors log with structlog; the fields travel as LogRecord attributes and must pass the guard."""
    fields = {"error": ValueError("boom"), "path": Path("/tmp/x"), "reason": Reason.TIMEOUT, "vector": np.float32(1.5),
              "pair": (1, Path("/a")), "nested": {"k": {Path("/b")}}}
    plain = plain_fields(None, "warning", {"event": "x", **fields, "exc_info": True})
    record = logging.LogRecord("mai.x", logging.WARNING, "x.py", 1, "x", None, None)
    record.__dict__.update({k: v for k, v in plain.items() if k not in ("event", "exc_info")})
    got = safe_loads(pickle.dumps((address(1900), record)))[1]
    assert (got.error, got.path, got.reason, got.vector) == ("boom", "/tmp/x", "timeout", "1.5")
    assert (got.pair, got.nested) == ([1, "/a"], {"k": ["/b"]})
    assert plain["exc_info"] is True  # handed to logging as is, which formats the traceback before sending


@pytest.mark.parametrize(
    "payload, refused",
    [
        (RunsCode(os.system, "touch /tmp/mai-pwned"), "posix.system"),
        (RunsCode(subprocess.Popen, ["touch", "/tmp/mai-pwned"]), "subprocess.Popen"),
        (RunsCode(eval, "__import__('os').system('touch /tmp/mai-pwned')"), "builtins.eval"),
        (RunsCode(getattr, RunsCode(importlib.import_module, "os"), "system"), "builtins.getattr"),
        (RunsCode(importlib.import_module, "antigravity"), "importlib.import_module"),
        # A function (not a class) and a re-exported stdlib class inside an allowed package.
        (RunsCode(messages.base.check_text, None, "x"), "messages.base.check_text"),
        (RunsCode(enum.Enum, "Evil", "A B"), "enum.Enum"),
    ],
)
def test_code_running_pickles_are_refused(payload, refused):
    data = pickle.dumps((address(1900), payload))
    with pytest.raises(RefusedPickle, match="only classes defined in Mai's messages package") as err:
        safe_loads(data)
    assert err.value.refused == refused


@pytest.mark.parametrize(
    "module, name",
    [
        ("messages.base", "os.system"),  # the stock unpickler follows dotted names from an allowed module
        ("messages.errors", "Enum"),  # a stdlib class imported into an allowed module, not defined there
        ("messages.no_such_module", "Thing"),
        ("messages", "MaiError"),  # a re-export: the class is defined in messages.errors
    ],
)
def test_names_reached_through_an_allowed_module_are_refused(module, name):
    data = b"\x80\x04c" + f"{module}\n{name}\n".encode() + b"\x8c\x04true\x85R."
    with pytest.raises(RefusedPickle) as err:
        safe_loads(data)
    assert err.value.refused == f"{module}.{name}"


@pytest.mark.parametrize(
    "request_, why",
    [
        (PendingActor("os.system", None, 1, None, None), "accepted: an Actor class"),
        (PendingActor("bench.control_plane.main", None, 1, None, None), "accepted: an Actor class"),
        (PendingActor("actors.no_such_module.Thing", None, 1, None, None), "No module named"),
        (PendingActor("actors.supervisor.Supervisor", None, 1, None, None, sourceHash="abc"), "no loaded source"),
    ],
)
def test_actor_creation_is_limited_to_mai_actor_classes(request_, why):
    with pytest.raises(RefusedPickle, match=why):
        safe_pickle.loads(pickle.dumps((address(1900), request_)))


def test_a_refusal_is_logged_with_the_peer_and_the_global():
    data = pickle.dumps((address(1900), RunsCode(os.system, "touch /tmp/mai-pwned")))
    with capture_logs() as logs, pytest.raises(RefusedPickle):
        safe_pickle.loads(data, peer="127.0.0.1:5555", listener="127.0.0.1:1900")
    assert logs == [
        {"event": "pickle.refused", "log_level": "warning", "peer": "127.0.0.1:5555", "listener": "127.0.0.1:1900",
         "refused": "posix.system", "pid": os.getpid(), "size_bytes": len(data)}
    ]


def test_thespian_tcp_transport_reads_incoming_data_through_the_guard(tmp_path):
    """Wiring: after loopback.apply, a connection's receive buffer refuses the payload and names the peer."""
    loopback.apply("127.0.0.1")
    assert safe_pickle.applied() and TCPTransport.serializer.loads is safe_pickle.loads
    marker = tmp_path / "ran"
    with socket.create_server(("127.0.0.1", 0)) as server:
        server_port = server.getsockname()[1]
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        client_port = client.getsockname()[1]
        try:
            incoming = TCPTransport.TCPIncoming(None, accepted)
            incoming.addData(toSendBuffer((address(1900), RunsCode(os.system, f"touch {marker}"))))
            assert incoming.receivedAllData()
            with capture_logs() as logs, pytest.raises(RefusedPickle):
                _ = incoming.data
        finally:
            client.close()
            accepted.close()
    assert not marker.exists()
    assert (logs[0]["peer"], logs[0]["listener"]) == (f"127.0.0.1:{client_port}", f"127.0.0.1:{server_port}")
