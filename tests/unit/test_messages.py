"""Messages refuse invalid values where they are built, naming the field, the value and what is accepted."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, strategies as st

from messages import AcquireLease, ChatMessage, EmbedImages, EmbedTexts, Failure, SetMode, VramSnapshot
from messages.errors import InsufficientVram, InvalidRequest, Reason
from messages.steps import MoveClip, PartHealth, WaitVramFree


@pytest.mark.parametrize(
    "build, field, accepted",
    [
        (lambda: SetMode("r1", "Auto Pilot"), "SetMode.mode", "mode name"),
        (lambda: SetMode("r1", "idle", timeout_s=0), "SetMode.timeout_s", ">= 0.001"),
        (lambda: SetMode("", "idle"), "SetMode.request_id", "non-empty"),
        (lambda: AcquireLease("r", "", 10), "AcquireLease.holder", "non-empty"),
        (lambda: AcquireLease("r", "me", float("nan")), "AcquireLease.ttl_s", "finite"),
        (lambda: MoveClip("s", "tpu"), "MoveClip.device", "'cpu', 'gpu'"),
        (lambda: PartHealth("disk", False), "PartHealth.part", "'gpu', 'vlm', 'clip', 'chat'"),
        (lambda: WaitVramFree("s", 0, 10, fraction=1.5), "WaitVramFree.fraction", "<= 1.0"),
        (lambda: ChatMessage("robot", "hi"), "ChatMessage.role", "'system', 'user', 'assistant'"),
        (lambda: VramSnapshot(-1, 0, 0, "nvml", "gpu", 0.0), "VramSnapshot.total_bytes", ">= 0"),
        (lambda: EmbedTexts("r", ()), "EmbedTexts.texts", "non-empty tuple"),
        (lambda: EmbedImages("r", ("a.png",), "shm", (1, 2, 2, 3)), "EmbedImages.paths", "not both"),
        (lambda: EmbedImages("r", (), "shm", (1, 2, 2, 4)), "EmbedImages.shm_shape", "(n, height, width, 3)"),
    ],
)
def test_invalid_fields_are_named_with_what_is_accepted(build, field, accepted):
    with pytest.raises(InvalidRequest) as err:
        build()
    assert field in str(err.value) and accepted in str(err.value)
    assert err.value.reason is Reason.INVALID_REQUEST and err.value.details["field"] == field


def test_mode_names_are_case_insensitive():
    assert SetMode("r", "AUTOPILOT").mode == "autopilot"


def test_failure_round_trips_to_the_matching_error_through_pickle():
    failure = Failure.from_error("r9", InsufficientVram("VLM needs more room", needed_bytes=6, free_bytes=2, evictable=("clip",)))
    again = pickle.loads(pickle.dumps(failure))
    err = again.to_error()
    assert isinstance(err, InsufficientVram) and err.reason is Reason.INSUFFICIENT_VRAM
    assert err.details["needed_bytes"] == "6" and "VLM needs more room" in str(err)
    assert Failure.from_error("r", KeyError("x")).reason is Reason.INTERNAL


MODE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _is_mode_name(text: str) -> bool:
    """The documented rule, written out without the product's regex: 1-32 of [a-z0-9_], starting with a letter."""
    return 1 <= len(text) <= 32 and text[0] in MODE_CHARS[:26] and all(c in MODE_CHARS for c in text)


modes = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=MODE_CHARS + "ABCXYZ-\n ", min_size=0, max_size=40),  # near misses of valid names
    st.sampled_from(["autopilot", "RECORDING", "idle\n", "\nidle", "a" * 32, "a" * 33, "_x", "9x"]),
)


@given(modes, st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**400)))
def test_set_mode_accepts_exactly_the_valid_values_and_names_the_field_it_refuses(mode, timeout):
    mode_ok = _is_mode_name(mode.lower())
    try:  # an int too large for a float is no finite number either
        timeout_ok = math.isfinite(float(timeout))
    except OverflowError:
        timeout_ok = False
    timeout_ok = timeout_ok and timeout >= 0.001
    try:
        message = SetMode("r", mode, timeout_s=timeout)
    except InvalidRequest as err:  # anything else escapes and fails the test
        assert not (mode_ok and timeout_ok), f"refused a valid SetMode({mode!r}, timeout_s={timeout!r}): {err}"
        field = "SetMode.mode" if not mode_ok else "SetMode.timeout_s"  # checked in field order
        assert err.details["field"] == field and field in str(err), (mode, timeout, str(err))
        assert ("mode name" if not mode_ok else ">= 0.001") in str(err)
        return
    assert mode_ok and timeout_ok, f"accepted SetMode({mode!r}, timeout_s={timeout!r})"
    assert message.mode == mode.lower() and message.timeout_s == timeout
