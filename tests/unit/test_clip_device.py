"""The CLIP mover's answer to GetClipDevice (spec property 12): a model that was never created is "unavailable"
with the reason its creation failed, never "cpu"; a created one answers where its weights really are. The mover's
creation runs for real (a checkpoint path that does not exist fails inside open_clip, as for a user's typo)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from actors.clip_mover import ClipMover
from backends.clip import OpenClipAdapter
from config import load_config
from messages.base import revalidate
from messages.errors import InvalidRequest
from messages.requests import CLIP_UNAVAILABLE, ClipDeviceIs, GetClipDevice


def _mover(tmp_path: Any, pretrained: str | None) -> tuple[ClipMover, list[tuple[str, Any]]]:
    sent: list[tuple[str, Any]] = []
    mover = ClipMover()
    mover.send = lambda to, msg: sent.append((to, msg))
    mover.wakeupAfter = lambda *args, **kwargs: None
    mover.config = load_config(env={"HOME": str(tmp_path)}, overrides={
        "clip.backend": "openclip", "clip.model": "ViT-Tiny-test", "clip.pretrained": pretrained,
        "system.state_dir": str(tmp_path / "state")})
    mover.peers = {"coordinator": "coordinator"}
    return mover, sent


def _device_reply(mover: ClipMover, sent: list[tuple[str, Any]]) -> ClipDeviceIs:
    mover.receiveMsg_GetClipDevice(GetClipDevice("r1"), "client")
    to, reply = sent[-1]
    assert to == "client" and isinstance(reply, ClipDeviceIs) and reply.request_id == "r1"
    revalidate(reply)  # what the client checks on arrival
    return reply


def test_a_clip_whose_checkpoint_is_missing_answers_unavailable_with_the_cause(tmp_path):
    missing = tmp_path / "no-such-checkpoint.safetensors"
    mover, sent = _mover(tmp_path, str(missing))
    mover.on_init(SimpleNamespace(config=mover.config))
    assert mover.adapter is None and mover.failure  # the real creation failed
    reply = _device_reply(mover, sent)
    assert reply.device == CLIP_UNAVAILABLE != "cpu"
    assert reply.reason == mover.failure and str(missing) in reply.reason
    assert reply.model == "ViT-Tiny-test"


def test_a_created_clip_answers_where_its_weights_are_and_no_reason(tmp_path):
    mover, sent = _mover(tmp_path, None)
    mover.adapter = OpenClipAdapter("ViT-Tiny-test", None, seed=0)
    assert _device_reply(mover, sent) == ClipDeviceIs("r1", "cpu", "ViT-Tiny-test", "")


def test_an_unavailable_device_without_a_reason_is_refused():
    with pytest.raises(InvalidRequest, match=r"ClipDeviceIs\.reason"):
        ClipDeviceIs("r1", CLIP_UNAVAILABLE, "ViT-B-32", "")
