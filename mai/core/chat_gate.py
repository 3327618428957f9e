"""The chat side of the GPU gate, as arithmetic: how much VRAM a chat model may take now, and the refusal when it
asks for more.

A chat model comes after Mai's own parts: what it may take is the free VRAM less the reserve, less what the mode's
plan still has to allocate (the VLM in RECORDING not loaded yet, CLIP on its way to the GPU in AUTOPILOT), plus what
the chat model holds itself (switching models gives those bytes back first). While a chat model still fits beside
the VLM and CLIP, it also leaves them their room when they are off the GPU (the agent comes back for them; a chat
model in their place would have to yield, and be loaded again for the next turn). One exception, so that a user's
turn does not fail while a VLM sits unused: when not even the smallest chat model fits beside an idle VLM (no lease
held or asked for), the VLM's bytes count too, and the plan unloads it for the chat load. Bytes that finished
freeing steps gave back count (the gate confirms them before it grants a load that relies on them); bytes that
freeing steps still to run will give back do not. A part that is down claims and keeps nothing: it cannot use the
room, and the chat model yields when it is back (issue 12, hole 6). Pure: the coordinator passes the world it
projects past the step in flight and the plan it runs.
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
    if plan.vlm_goal.state == "loaded" and not vlm_on and LOAD_VLM not in refused and "vlm" not in world.down:
        claims += world.vlm_footprint_bytes
    if plan.clip_goal.state == "gpu" and world.clip_placement != "gpu" and MOVE_CLIP_GPU not in refused \
            and "clip" not in world.down:
        claims += world.clip_footprint_bytes
    return claims


def kept_for_mai_bytes(world: World, plan: Plan) -> int:
    """The footprints of the VLM and CLIP while they are off the GPU and the plan does not claim them now: the agent
    uses them through its day, so a chat model leaves them their room — when a chat model still fits beside them."""
    if not world.gpu or not world.chat_leaves_room:
        return 0
    kept = 0
    if world.vlm_state not in ("loaded", "loading") and plan.vlm_goal.state != "loaded" and "vlm" not in world.down:
        kept += world.vlm_footprint_bytes
    if world.clip_placement != "gpu" and plan.clip_goal.state != "gpu" and "clip" not in world.down:
        kept += world.clip_footprint_bytes
    return kept


def grantable_bytes(world: World, plan: Plan) -> int | None:
    """What a chat model may take now, never negative, always against a reading (never "unlimited": issue 12, hole 7).
    Without a GPU reading (psutil stands in when NVML and CUDA both fail) the host memory reading bounds it: the
    model then runs in host memory, or on a GPU Mai cannot see. Without any reading yet it is 0 (the coordinator
    waits for one before it answers). Two adjustments need the
    smallest chat model's footprint (`world.chat_min_bytes`; none without it): while that model still fits beside the
    VLM and CLIP, their room is kept for them (`kept_for_mai_bytes`); when it does not fit even beside an idle VLM,
    the VLM's bytes count — it gives its place (`plan.vlm_yields_to_chat`) rather than the turn failing."""
    if world.gpu is None or world.free_bytes is None:
        return 0
    if world.gpu is False:
        return max(0, world.free_bytes - world.reserve_bytes + world.chat_bytes)
    room = (world.free_bytes + world.unconfirmed_bytes - world.reserve_bytes - mode_claims_bytes(world, plan)
            + world.chat_bytes)
    kept = kept_for_mai_bytes(world, plan)
    if world.chat_min_bytes and room - kept >= world.chat_min_bytes:
        room -= kept
    elif world.vlm_idle and world.vlm_state == "loaded" and room < world.chat_min_bytes:
        room += world.vlm_footprint_bytes
    return max(0, room)


def room_bytes(world: World) -> int | None:
    """The room the chat model has as the GPU is now: free less the reserve plus what it holds, without the mode's
    claims or the room kept for the VLM and CLIP. A chat model that no longer fits here has been squeezed by
    something outside Mai's plan (another program); Mai's own steps ask it to yield instead (issue 12, hole 8).
    Optimistic where the grantable is conservative (allocations a reading may already show count once, not twice):
    it answers "is the model surely squeezed?", a reason to load another one. None without a reading; the
    coordinator also gives None while a step is in flight (its world is then a projection, not the GPU as it is)."""
    if world.gpu is None or world.free_bytes is None:
        return None
    return max(0, world.free_bytes + world.uncertain_bytes + world.unconfirmed_bytes - world.reserve_bytes
               + world.chat_bytes)


def chat_refusal(model: str, needed_bytes: int, grantable: int, world: World, plan: Plan) -> InsufficientVram:
    """A chat load that would not fit (invariant 12): `free_bytes` is the grantable, so the agent can choose a
    smaller model with it. Beyond an idle VLM (already counted in the grantable when it would give its place),
    nothing Mai holds yields to a chat model, so nothing is evictable."""
    claims = mode_claims_bytes(world, plan)
    kept = _kept_now(world, plan)
    message = (
        f"chat model {model} needs {gib(needed_bytes)}, the GPU gate can grant {gib(grantable)} "
        f"({gib(world.free_bytes or 0)} free, {gib(world.reserve_bytes)} reserved"
        + (f", {gib(claims)} still to load for the mode" if claims else "")
        + (f", {gib(kept)} kept for the VLM and CLIP while they are off the GPU (chat.leave_room_for_agent)"
           if kept else "")
        + (f", {gib(world.chat_bytes)} of it held by {world.chat_model}" if world.chat_bytes else "")
        + f"); to fit, {would_have_to_yield(world, plan)} would have to yield"
    )
    return InsufficientVram(message, needed_bytes=needed_bytes, free_bytes=grantable, evictable=())


def would_have_to_yield(world: World, plan: Plan) -> str:
    """Who holds or claims the VRAM a refused chat load lacks, for the person reading the refusal: Mai's parts the
    mode keeps on the GPU (none of them yields to a chat model), else other programs."""
    holders = []
    if _kept_now(world, plan):
        holders.append("the room kept for the VLM and CLIP (set chat.leave_room_for_agent: false to lend it)")
    if world.vlm_state in ("loaded", "loading") or mode_claims_bytes(world, plan) and plan.vlm_goal.state == "loaded":
        holders.append(f"the VLM {world.vlm_model} ({gib(world.vlm_footprint_bytes)}, kept for the mode)")
    if world.clip_placement == "gpu" or plan.clip_goal.state == "gpu":
        holders.append(f"CLIP on the GPU ({gib(world.clip_footprint_bytes)})")
    return ", ".join(holders) if holders else "other programs on the GPU (Mai holds nothing there)"


def _kept_now(world: World, plan: Plan) -> int:
    """The bytes `grantable_bytes` keeps for the VLM and CLIP right now (0 when it does not keep them)."""
    if not world.gpu or world.free_bytes is None:
        return 0
    room = (world.free_bytes + world.unconfirmed_bytes - world.reserve_bytes - mode_claims_bytes(world, plan)
            + world.chat_bytes)
    kept = kept_for_mai_bytes(world, plan)
    return kept if kept and world.chat_min_bytes and room - kept >= world.chat_min_bytes else 0
