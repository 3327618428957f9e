"""The CLIP mover's reports may arrive out of order (Thespian's TCP transport runs up to 20 transmits at once, each
on its own connection: thespian/system/transport/asyncTransportBase.py MAX_PENDING_TRANSMITS), so the coordinator
keeps the newest by the time the mover read it. Seen on the real actors (tests/system/test_load.py at ed19d1c): the
mover's "cpu, not ready" sent before creating its model arrived after "ready", and status.clip.ready stayed False."""

from __future__ import annotations

from mai.sim.world import MIB
from messages.requests import ModeReached, SetMode
from messages.steps import ClipObserved, VlmObserved
from tests.unit.test_coordinator import MODEL
from tests.unit.test_degraded_parts import reading, unobserved

FOOTPRINT = 600 * MIB


def _status(w):
    return w.core.status("s", w.now)


def test_the_not_ready_report_sent_before_creation_and_delivered_after_ready_is_stale():
    # actors/clip_mover.py on_init: ClipObserved("cpu", 0, False) before the slow creation, then the ready one.
    w = unobserved()
    reading(w)
    created_at = w.now
    before_creation = created_at - 3.4
    w.send(ClipObserved("cpu", FOOTPRINT, True, "ViT-B-32", 4242, observed_at=created_at), "clip")
    w.send(ClipObserved("cpu", 0, False, "ViT-B-32", 4242, observed_at=before_creation), "clip")
    clip = _status(w).clip
    assert clip.ready and clip.device == "cpu"
    assert w.logs_of("clip.observed_stale")
    w.advance(1.0)
    w.send(ClipObserved("cpu", 0, False, "ViT-B-32", 4343, observed_at=w.now), "clip")  # a newer report still counts
    assert not _status(w).clip.ready


def test_a_report_read_before_a_move_began_does_not_undo_the_move():
    w = unobserved()
    reading(w)
    w.send(VlmObserved(MODEL, False, observed_at=w.now), "vlm")
    w.send(ClipObserved("cpu", FOOTPRINT, True, "ViT-B-32", 4242, observed_at=w.now), "clip")
    read_before_move = w.now
    w.advance(0.5)
    w.send(SetMode("r1", "autopilot", wait=True))
    w.advance(30)
    assert isinstance(w.reply("r1"), ModeReached) and _status(w).clip.device != "cpu"
    moved_to = _status(w).clip.device
    w.send(ClipObserved("cpu", FOOTPRINT, True, "ViT-B-32", 4242, observed_at=read_before_move), "clip")
    assert _status(w).clip.device == moved_to  # the move's result is the newer truth
