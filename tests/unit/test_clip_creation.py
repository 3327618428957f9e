"""The CLIP mover's verdict on a failed creation (mai.core.clip_creation, issue 12 hole 2), on the errors the real
adapter raises: a reason naming the cause, retried only when Hugging Face could not deliver the weights."""

from __future__ import annotations

import os

import pytest

from backends.clip import OpenClipAdapter
from mai.core.clip_creation import CreationFailure, creation_failure
from mai.core.retry import Backoff
from messages.errors import MaiError


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - the test inspects whatever the real code raised
        return err
    raise AssertionError("expected the call to fail")


def test_weights_hugging_face_could_not_deliver_are_retried_with_backoff(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _raised(lambda: OpenClipAdapter("ViT-B-32", "laion2b_s34b_b79k"))
    backoff = Backoff(5.0, 300.0)
    first, third = creation_failure("ViT-B-32", err, 1, backoff), creation_failure("ViT-B-32", err, 3, backoff)
    assert first.retry_in_s == 5.0 and third.retry_in_s == 20.0
    assert "LocalEntryNotFoundError" in first.reason and first.reason.endswith("retrying in 5 s")


def test_a_corrupt_checkpoint_is_not_retried_and_says_what_to_fix(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(os.urandom(4096))
    err = _raised(lambda: OpenClipAdapter("ViT-Tiny-test", str(path)))
    outcome = creation_failure("ViT-Tiny-test", err, 1)
    assert outcome.retry_in_s is None
    assert str(path) in outcome.reason and "SafetensorError" in outcome.reason
    assert outcome.reason.endswith("not retried: fix clip.pretrained")


def test_a_broken_torch_install_is_not_retried_and_names_the_import(tmp_path, monkeypatch):
    # What a broken install raises on `import torch` (a CUDA library missing), as the mover's import meets it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ImportError('libcudnn.so.9: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {name: mod for name, mod in list(__import__("sys").modules.items()) if name == "torch" or name.startswith("torch.")}
    for name in saved:
        monkeypatch.delitem(__import__("sys").modules, name)
    err = _raised(lambda: __import__("torch"))
    outcome = creation_failure("ViT-B-32", err, 1)
    assert outcome == CreationFailure(
        "CLIP model 'ViT-B-32' unavailable: ImportError: libcudnn.so.9: cannot open shared object file: No such file "
        "or directory; not retried: fix the torch / open_clip_torch install", None)


def test_an_invalid_configuration_is_not_retried():
    outcome = creation_failure("ViT-B-32", MaiError("precision 'fp8' is not supported"), 4)
    assert outcome.retry_in_s is None and "fix the clip section" in outcome.reason
