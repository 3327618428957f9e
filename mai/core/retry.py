"""Retry policy for backend calls: which failures are worth another attempt, and how long to wait first."""

from __future__ import annotations

from dataclasses import dataclass

from messages.errors import MaiError, Reason

# Transient: the backend may answer next time. Not retried: a missing model, a refusal for memory, bad input.
RETRYABLE = frozenset({Reason.BACKEND_UNREACHABLE, Reason.CONNECTION_LOST, Reason.TIMEOUT, Reason.BUSY, Reason.LOAD_FAILED})


def is_retryable(err: BaseException) -> bool:
    return isinstance(err, MaiError) and err.reason in RETRYABLE


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Delay before attempt number `attempt` (1-based; the first attempt has none)."""
        return 0.0 if attempt <= 1 else min(self.max_s, self.initial_s * self.factor ** (attempt - 2))
