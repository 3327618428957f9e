"""The chat side of the GPU gate, as arithmetic: how much VRAM a chat model may take now, and the refusal when it
asks for more.

A chat model comes after Mai's own parts: what it may take is the free VRAM less the reserve, less what the mode's
plan still has to allocate (the VLM in RECORDING not loaded yet, CLIP on its way to the GPU in AUTOPILOT), plus what
the chat model holds itself (switching models gives those bytes back first). Bytes that finished freeing steps gave
back count (the gate confirms them before it grants a load that relies on them); bytes that freeing steps still to
run will give back do not. Pure: the coordinator passes the world it projects past the step in flight and the plan
it runs.
"""

from __future__ import annotations

from mai.core.plan import LOAD_VLM, MOVE_CLIP_GPU, Plan, World, gib
from messages.errors import InsufficientVram

# Chat steps: granted to the conversation agent (a ChatGrant reply to its ChatNeeds), never planned by the mode.
CHAT_LOAD = "chat_load"  # unload the agent's current model if any, then load the one it asked for
CHAT_UNLOAD = "chat_unload"


def mode_claims_bytes(world: World, plan: Plan) -> int:
    """VRAM the mode's plan still has to allocate, including steps that are blocked for now (a part down, a
    backoff, a read first) — they keep their bytes — but not steps it refused (they will not happen)."""
    if not world.gpu:
        return 0
    refused = {r.kind for r in plan.refusals}
    claims = 0
    vlm_on = world.vlm_state in ("loaded", "loading")
    if plan.vlm_goal.state == "loaded" and not vlm_on and LOAD_VLM not in refused:
        claims += world.vlm_footprint_bytes
    if plan.clip_goal.state == "gpu" and world.clip_placement != "gpu" and MOVE_CLIP_GPU not in refused:
        claims += world.clip_footprint_bytes
    return claims


def grantable_bytes(world: World, plan: Plan) -> int | None:
    """What a chat model may take now, never negative. None: no GPU, so no VRAM limit (the model runs on the CPU).
    Without a reading yet it is 0 (the coordinator waits for one before it answers)."""
    if world.gpu is False:
        return None
    if world.gpu is None or world.free_bytes is None:
        return 0
    room = (world.free_bytes + world.unconfirmed_bytes - world.reserve_bytes - mode_claims_bytes(world, plan)
            + world.chat_bytes)
    return max(0, room)


def chat_refusal(model: str, needed_bytes: int, grantable: int, world: World, plan: Plan) -> InsufficientVram:
    """A chat load that would not fit (invariant 12): `free_bytes` is the grantable, so the agent can choose a
    smaller model with it. Nothing Mai holds yields to a chat model, so nothing is evictable."""
    claims = mode_claims_bytes(world, plan)
    message = (
        f"chat model {model} needs {gib(needed_bytes)}, the GPU gate can grant {gib(grantable)} "
        f"({gib(world.reserve_bytes)} reserved"
        + (f", {gib(claims)} still to load for the mode" if claims else "")
        + (f", {gib(world.chat_bytes)} of it held by {world.chat_model}" if world.chat_bytes else "")
        + ")"
    )
    return InsufficientVram(message, needed_bytes=needed_bytes, free_bytes=grantable, evictable=())
