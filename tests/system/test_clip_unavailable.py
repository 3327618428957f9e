"""A CLIP that does not exist is reported as unavailable, never as "cpu": the real Mai (separate processes), the
real client, a CLIP configuration whose checkpoint is missing (the mover's model creation fails as it does for a
user with a wrong `clip.pretrained`)."""

from __future__ import annotations

import pytest

from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow


def test_get_clip_device_answers_unavailable_for_a_clip_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-checkpoint.safetensors"
    clip = {"backend": "simulated", "model": "ViT-Tiny-test", "pretrained": str(missing)}
    with running_mai(tmp_path, clip=clip) as system, system.client() as client:
        degraded = wait_for(lambda: dict(client.get_status().degraded).get("clip"), timeout_s=60)
        assert str(missing) in degraded  # the mover really failed to create it, and says why
        assert not client.get_status().clip.ready
        device = client.get_clip_device()
        assert device == "unavailable" and str(missing) in device.reason  # the same cause as the degraded status
