"""Creating CLIP fails the ways the real libraries fail, and the adapter says which kind of failure it is (issue 12,
hole 2): a corrupt checkpoint (safetensors' `SafetensorError`, not one of the errors open_clip wraps) is a LoadFailed
naming the file and the cause, and not retryable (weights Hugging Face cannot deliver are the retryable kind:
tests/contract/test_clip_adapter.py). Real open_clip and safetensors, a real file of garbage bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.clip import OpenClipAdapter
from messages.errors import LoadFailed, Reason

TINY = "ViT-Tiny-test"


@pytest.fixture
def corrupt_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "x.safetensors"
    path.write_bytes(os.urandom(4096))  # garbage: safetensors reads an 8-byte header length, then refuses it
    return path


def test_a_corrupt_safetensors_checkpoint_is_a_load_failure_naming_the_file_and_cause(corrupt_checkpoint):
    with pytest.raises(LoadFailed) as caught:
        OpenClipAdapter(TINY, str(corrupt_checkpoint))
    err = caught.value
    assert err.reason == Reason.LOAD_FAILED
    assert str(corrupt_checkpoint) in str(err) and "SafetensorError" in str(err)
    assert "header" in str(err)  # safetensors' own words: "Error while deserializing header: ..."
    assert err.details["retryable"] is False

