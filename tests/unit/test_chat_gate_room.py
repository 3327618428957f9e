"""The room a chat model has on the GPU as it is (issue 12, hole 8): what tells "another program took the VRAM"
from "Mai's own plan claims the bytes for a while", so a mode switch never makes the agent load another model."""

from __future__ import annotations

from mai.core.chat_gate import grantable_bytes, room_bytes
from mai.core.plan import Demand, ModePolicy, World, plan_steps

GIB = 1024**3
MIB = 1024**2


def _world(**changes: object) -> World:
    base = dict(vlm_model="vlm", vlm_state="unloaded", vlm_footprint_bytes=6 * GIB, clip_placement="cpu",
                clip_footprint_bytes=600 * MIB, reserve_bytes=512 * MIB, gpu=True, free_bytes=6 * GIB,
                chat_model="big", chat_bytes=6 * GIB, chat_min_bytes=2 * GIB)
    base.update(changes)
    return World(**base)  # type: ignore[arg-type]


def test_a_mode_claiming_the_bytes_lowers_the_grantable_but_not_the_room() -> None:
    """RECORDING is about to load the VLM beside the chat model: the grantable drops below the chat model's
    footprint (the mode claims 6 GiB), yet the GPU itself still holds the chat model: no reason to switch."""
    world = _world()
    plan = plan_steps(world, ModePolicy("loaded", "cpu"), Demand())
    assert grantable_bytes(world, plan) < world.chat_bytes
    assert room_bytes(world) == 6 * GIB - 512 * MIB + 6 * GIB
    assert room_bytes(world) >= world.chat_bytes


def test_another_program_taking_the_vram_leaves_the_chat_model_no_room() -> None:
    world = _world(vlm_state="loaded", free_bytes=200 * MIB)
    assert room_bytes(world) == 200 * MIB - 512 * MIB + 6 * GIB
    assert room_bytes(world) < world.chat_bytes


def test_allocations_a_reading_may_already_show_count_once_in_the_room() -> None:
    """The grantable subtracts Mai's allocations since the reading (it may not show them yet); the room must not
    call a model squeezed on that double count."""
    world = _world(vlm_state="loaded", free_bytes=GIB, uncertain_bytes=6 * GIB)
    assert room_bytes(world) == GIB + 6 * GIB - 512 * MIB + 6 * GIB


def test_no_reading_no_room_figure() -> None:
    assert room_bytes(_world(free_bytes=None)) is None
    assert room_bytes(_world(gpu=None)) is None


def test_the_coordinator_gives_no_room_figure_while_a_step_is_in_flight() -> None:
    """Mid-load the coordinator's world counts the load as done while the reading may show it too: no room figure
    then, so the agent's between-turn check never switches models on a mode switch in progress."""
    from messages.conversation import GetGrantable
    from messages.requests import SetMode
    from tests.unit.test_coordinator import world as coordinator_world  # the virtual-clock harness

    w = coordinator_world()
    assert w.ask(GetGrantable("g1"), "chat").room_bytes is not None
    w.ask(SetMode("r1", "recording"))
    w.advance(1.0)  # the VLM load takes 4 s of virtual time
    assert w.core.step_in_flight is not None
    midway = w.ask(GetGrantable("g2"), "chat")
    assert midway.grantable_bytes is not None and midway.room_bytes is None
    w.advance(10.0)
    assert w.core.step_in_flight is None and w.ask(GetGrantable("g3"), "chat").room_bytes is not None
