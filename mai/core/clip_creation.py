"""What the CLIP mover does when creating its model fails: the degraded reason status shows, and whether to try again.

Every failure to create CLIP becomes a reason naming its cause, never an exception that leaves status saying "the
model is still being created". Only a cause that can change by itself is retried: weights Hugging Face could not
deliver (the adapter's BackendUnavailable, `details["retryable"]`); the reason says when. A corrupt checkpoint, an
unknown tag, a broken torch install stay until someone fixes them: the reason says what to fix.

Pure: the mover passes the error and how many tries failed, and sets its own timer.
"""

from __future__ import annotations

from dataclasses import dataclass

from mai.core.retry import Backoff
from messages.errors import MaiError

RETRY_BACKOFF = Backoff(initial_s=5.0, max_s=300.0)  # Hugging Face down: try again at 5 s, 10 s, ... every 5 min


@dataclass(frozen=True)
class CreationFailure:
    reason: str  # for status (`mai status` degraded clip: ...) and the log
    retry_in_s: float | None  # None: not retried


def creation_failure(model: str, err: BaseException, failures: int, backoff: Backoff = RETRY_BACKOFF) -> CreationFailure:
    """`failures`: how many tries failed, this one included (1 after the first)."""
    cause = str(err) if isinstance(err, MaiError) else f"{type(err).__name__}: {err}"
    text = f"CLIP model {model!r} unavailable: {cause}"
    details = err.details if isinstance(err, MaiError) else {}
    if details.get("retryable") is True:
        delay = backoff.delay(failures + 1)
        return CreationFailure(f"{text}; retrying in {delay:g} s", delay)
    if isinstance(err, ImportError) or details.get("missing_module"):
        fix = "fix the torch / open_clip_torch install"
    elif details.get("pretrained") is not None:
        fix = "fix clip.pretrained"
    else:
        fix = "fix the clip section of the configuration"
    return CreationFailure(f"{text}; not retried: {fix}", None)
