"""Restart policy for supervised children: exponential backoff that forgets a crash once a child stayed up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    initial_s: float = 0.5
    max_s: float = 30.0
    stable_after_s: float = 60.0  # a child that lived this long starts again from the initial delay

    def delay(self, previous_restarts: int, lived_s: float) -> tuple[float, int]:
        """(delay before restarting, the restart count to record) for a child that just exited."""
        count = 0 if lived_s >= self.stable_after_s else previous_restarts
        return min(self.initial_s * (2**count), self.max_s), count + 1
