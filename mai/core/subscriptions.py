"""Who gets the coordinator's events: subscribers that renew before their ttl runs out.

A subscription lapses on its own instead of needing an unsubscribe, because a client that crashed (or a `mai events`
that was killed) never says goodbye; Thespian would otherwise keep sending to a dead address forever. Pure: the
actor passes the time in. The actor keeps a copy on disk, so a restarted coordinator goes on publishing to them at
once instead of after each subscriber's next renewal (events in between would reach nobody)."""

from __future__ import annotations

from typing import Any


class Subscribers:
    """Tokens (actor addresses: comparable but NOT hashable) with an expiry time, in the order they subscribed."""

    def __init__(self) -> None:
        self._entries: list[list[Any]] = []  # [token, expires_at]

    def _find(self, token: Any) -> list[Any] | None:
        return next((entry for entry in self._entries if entry[0] == token), None)

    def add(self, token: Any, now: float, ttl_s: float) -> None:
        """Subscribe, or renew: the subscription now lasts until `now + ttl_s`."""
        entry = self._find(token)
        if entry is None:
            self._entries.append([token, now + ttl_s])
        else:
            entry[1] = now + ttl_s

    def remove(self, token: Any) -> bool:
        """Unsubscribe; False if the token was not subscribed (or had lapsed and been dropped)."""
        entry = self._find(token)
        if entry is not None:
            self._entries.remove(entry)
        return entry is not None

    def live(self, now: float) -> list[Any]:
        """The tokens to send an event to now; lapsed ones are dropped."""
        self._entries = [entry for entry in self._entries if entry[1] > now]
        return [token for token, _ in self._entries]

    def next_expiry(self) -> float | None:
        """When the next subscription lapses (for a timer), or None with no subscribers."""
        return min((at for _, at in self._entries), default=None)

    def entries(self) -> list[tuple[Any, float]]:
        """(token, expires_at) in subscription order: what a restarted coordinator restores."""
        return [(token, at) for token, at in self._entries]

    def restore(self, entries: list[tuple[Any, float]], now: float) -> int:
        """Take back the subscriptions a predecessor held (those still live); returns how many."""
        for token, at in entries:
            if at > now and self._find(token) is None:
                self._entries.append([token, at])
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        return self._find(token) is not None
