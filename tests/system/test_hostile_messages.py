"""Garbage sent straight to the running actors: strings, numbers, dicts, and Mai's own messages with values their
constructors would refuse (unpickling skips `__post_init__`, so a socket can deliver what no constructor builds).

Every actor must answer such a request with a Failure naming the field, or ignore it, and keep working: same PID,
no restart, still answering what it is there for, and the system still switches modes afterwards."""

from __future__ import annotations

import decimal
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from actors.clip_mover import ClipMover
from actors.conversation_agent import ConversationAgent
from actors.mode_coordinator import ModeCoordinator
from actors.supervisor import Supervisor
from actors.vlm_loader import VlmLoader
from actors.vram_sampler import VramSampler
from messages.base import new_request_id
from messages.errors import InvalidRequest, Reason
from messages.failure import Failure
from messages.conversation import GetHistory, History
from messages.requests import ClipDeviceIs, GetClipDevice, GetStatus
from messages.status import Status
from messages.steps import GetVram, LoadVlm, StepFailed, VlmLoaded, VramReading
from messages.system import GetSystemInfo, Init, Peers, Ping, Pong, SystemInfo
from tests.property.test_hostile_input import MESSAGE_CLASSES, VALID, unchecked
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow

ACTOR_CLASSES = {"supervisor": Supervisor, "sampler": VramSampler, "vlm": VlmLoader, "clip": ClipMover,
                 "chat": ConversationAgent, "coordinator": ModeCoordinator}
# The supervisor's wiring: a valid one reconfigures the actor, as it should, so only refused ones are sent.
WIRING = {"Init", "Peers"}
BY_NAME = {cls.__name__: cls for cls in MESSAGE_CLASSES}


def _handled(actor_cls: type) -> list[type]:
    names = {name.removeprefix("receiveMsg_") for name in dir(actor_cls) if name.startswith("receiveMsg_")}
    return [BY_NAME[n] for n in sorted(names) if n in BY_NAME]


# Values that survive the trip (picklable; a Decimal is not on the unpickling allowlist, so it is refused there).
WIRE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**1024, max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.sampled_from(["", " ", "\x00", "../../etc"]),
    st.binary(max_size=16), st.lists(st.integers(), max_size=3), st.tuples(), st.tuples(st.text(max_size=3)),
    st.tuples(st.integers(), st.integers(), st.integers(), st.integers()),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3), st.sampled_from(list(Reason)),
    st.just(decimal.Decimal("1.5")),
)
GARBAGE = st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none(), st.binary(max_size=30),
                    st.dictionaries(st.text(max_size=8), WIRE_VALUES, max_size=4),
                    st.lists(WIRE_VALUES, max_size=4), st.tuples(st.text(max_size=5), st.integers()))


@st.composite
def hostile_message(draw: Any, handled: list[type]) -> tuple[Any, str | None]:
    """A message and, when its own constructor refuses it, the field the refusal names."""
    kind = draw(st.sampled_from(["odd_handled", "odd_any", "other_kind", "garbage"]))
    if kind == "garbage":
        return draw(GARBAGE), None
    pool = handled if kind == "odd_handled" and handled else list(BY_NAME.values())
    cls = draw(st.sampled_from(pool))
    values = dict(VALID[cls.__name__])
    if "request_id" in values:
        values["request_id"] = new_request_id()
    if kind != "other_kind":
        field = draw(st.sampled_from(sorted(values)))
        values[field] = draw(WIRE_VALUES)
    try:
        cls(**values)
        refused_field = None
    except InvalidRequest as err:
        refused_field = str(err.details.get("field"))
    assume(refused_field is not None or cls.__name__ not in WIRING)
    return unchecked(cls, values), refused_field


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with running_mai(tmp) as running:
        with running.client() as client:
            wait_for(lambda: client.get_status().clip.ready, timeout_s=90)
            info = client.system_info()
            addresses = {"supervisor": client._supervisor, **{c.role: c.address for c in info.children}}
            pids = {role: _ping(client, address).pid for role, address in addresses.items()}
            yield running, client, addresses, pids


def _ping(client: Any, address: Any, timeout_s: float = 20.0) -> Pong:
    reply = client._ask_address(address, Ping(new_request_id()), timeout_s)
    assert isinstance(reply, Pong), reply
    return reply


# What each actor is there for: a request only an initialised, working actor answers (Ping is answered even by an
# actor whose configuration was taken away, so it proves nothing).
PROBES = {
    "supervisor": (lambda: GetSystemInfo(new_request_id()), SystemInfo),
    "sampler": (lambda: GetVram(new_request_id()), VramReading),
    "vlm": (lambda: LoadVlm(new_request_id(), "probe:latest"), (VlmLoaded, StepFailed)),  # Ollama is not there
    "clip": (lambda: GetClipDevice(new_request_id()), ClipDeviceIs),
    "chat": (lambda: GetHistory(new_request_id(), 1), History),
    "coordinator": (lambda: GetStatus(new_request_id()), Status),
}


def _works(client: Any, role: str, address: Any, timeout_s: float = 20.0) -> bool:
    build, answer = PROBES[role]
    request = build()
    key = getattr(request, "request_id", None) or request.step_id
    with client._asys.private() as ctx:
        reply = ctx.ask(address, request, timeout_s)
        while reply is not None and key not in (getattr(reply, "request_id", None), getattr(reply, "step_id", None)):
            reply = ctx.listen(timeout_s)
    return isinstance(reply, answer)


def _send(client: Any, address: Any, message: Any, refused_field: str | None) -> Any:
    """ask when an answer is due (a request with a usable request_id), else tell; the reply or None."""
    request_id = getattr(message, "request_id", None)
    with client._asys.private() as ctx:
        if not (isinstance(request_id, str) and request_id.strip()) or isinstance(message, Failure):
            ctx.tell(address, message)
            return None
        reply = ctx.ask(address, message, 10.0 if refused_field else 2.0)
        while reply is not None and getattr(reply, "request_id", None) != request_id:
            reply = ctx.listen(2.0)
        return reply


@pytest.mark.parametrize("role", sorted(ACTOR_CLASSES))
def test_an_actor_refuses_or_ignores_hostile_messages_and_keeps_running(system, role):
    running, client, addresses, pids = system
    address = addresses[role]
    handled = _handled(ACTOR_CLASSES[role])

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=hostile_message(handled))
    def one(case: tuple[Any, str | None]) -> None:
        message, refused_field = case
        reply = _send(client, address, message, refused_field)
        if refused_field is not None and reply is not None:
            assert isinstance(reply, Failure), f"{role} answered {reply!r} to {message!r}"
            assert reply.reason is Reason.INVALID_REQUEST, reply
            if type(message) in handled:  # else "does not accept" is the answer
                assert refused_field in reply.message, reply
        elif refused_field is not None and isinstance(getattr(message, "request_id", None), str) \
                and getattr(message, "request_id").strip() and not isinstance(message, Failure):
            pytest.fail(f"{role} did not answer {type(message).__name__} refused on {refused_field}")
        assert _ping(client, address).pid == pids[role], f"{role} was replaced after {message!r}"
        assert _works(client, role, address), f"{role} stopped working after {message!r}"

    one()


def test_after_the_garbage_mai_still_answers_and_switches_modes(system):
    running, client, addresses, pids = system
    info = client.system_info()
    assert {c.role: c.restarts for c in info.children} == {role: 0 for role in pids if role != "supervisor"}
    assert {role: _ping(client, a).pid for role, a in addresses.items()} == pids
    reached = client.set_mode("idle", wait=True, timeout_s=60)
    assert reached.mode == "idle"
    assert running.status_json()["gpu"]["mode"] == "idle"  # the CLI renders whatever status holds now


@pytest.mark.parametrize("role", sorted(ACTOR_CLASSES))
def test_a_wiring_message_without_a_configuration_does_not_take_an_actors_away(system, role):
    running, client, addresses, pids = system
    with client._asys.private() as ctx:  # an actor used to adopt it, then hold every later message for an Init
        ctx.tell(addresses[role], unchecked(Init, {"config": None, "peers": (), "restart_count": 0}))
        ctx.tell(addresses[role], unchecked(Peers, {"peers": (("coordinator", "nowhere"),)}))
    assert _works(client, role, addresses[role])


def test_a_forged_child_exit_does_not_start_a_second_copy_of_a_live_actor(system):
    """Thespian's ChildActorExited travels on the same sockets as everything else, so anyone on loopback can send
    one naming a live actor. The supervisor restarts only a child whose process is really gone: a second CLIP mover
    or VLM loader would hold a second model and fight the first over the same VRAM."""
    from thespian.actors import ChildActorExited

    running, client, addresses, pids = system
    before = client.system_info()
    log_path = Path(running.config.system.state_dir) / "mai.log"
    start = log_path.stat().st_size

    def decided() -> list[dict]:
        """The supervisor's verdict on the exit it was told about: ignored, or taken for real (then a restart)."""
        with open(log_path, encoding="utf-8") as f:
            f.seek(start)
            lines = [json.loads(line) for line in f if '"child.exit' in line]
        return [e for e in lines if e.get("child") == "clip" and e["event"] in ("child.exit_ignored", "child.exited")]

    with client._asys.private() as ctx:
        ctx.tell(addresses["supervisor"], ChildActorExited(addresses["clip"]))
    (verdict,) = wait_for(decided, timeout_s=30)
    assert verdict["event"] == "child.exit_ignored", verdict  # and the log says why
    after = client.system_info()
    assert after.address_of("clip") == before.address_of("clip")
    assert [c.restarts for c in after.children] == [c.restarts for c in before.children]
    assert _ping(client, addresses["clip"]).pid == pids["clip"] and _works(client, "clip", addresses["clip"])
