"""Which chat model the conversation agent uses now, and what it does when one fails: a pure policy.

The agent feeds it readings (`choose` with the VRAM the gate could grant and which backends answer) and outcomes
(`record_failure`, `record_success`); the policy answers with a `Choice` or a `FailureVerdict`. It never sleeps,
reads the clock or touches a backend: `now` always comes in, so tests drive it with a virtual clock.

The rules, in the order they apply:
- A model is *usable* when its backend is reachable, it is installed (when that is known), it is not cooling down
  after failures and its footprint fits the grantable VRAM.
- Among usable models the rank is: not known to be too slow, higher tier, fewer recent failures, faster learned
  speed (a measured model ahead of an unmeasured one), then chain order.
- A model pinned by `mai switch` wins while it is usable.
- Switching *down* (the current model no longer fits, failed, or is too slow) happens at once, to the best usable.
- Switching *up* while the current model is still usable waits for hysteresis: the current model has been in use
  for `hysteresis_s`, and the better one has been usable in every reading for the last `hysteresis_s`. So
  readings that flap between two values cannot make the model flap.
- Failures: retry the same model with exponential backoff up to `max_retries`, then it cools down (`cooldown_s`,
  doubling on each cool-down without a success in between, up to 10x) and the agent moves on down the chain.
  A missing model or a refusal for memory is not retried: it cools down at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from messages.base import check_int, check_text, invalid
from messages.errors import InvalidRequest, Reason

if TYPE_CHECKING:
    from config.schema import ModelSpec

GiB = 1024**3
MiB = 1024**2
COOLDOWN_MAX_FACTOR = 10
SPEED_WEIGHT_OF_NEW_SAMPLE = 0.5  # exponential moving average: recent replies count most, one outlier does not
# Retrying the same model cannot help: it is not there, or it does not fit.
NOT_RETRIED = frozenset(r.value for r in (Reason.MODEL_NOT_FOUND, Reason.OUT_OF_MEMORY, Reason.INSUFFICIENT_VRAM))
BACKEND_LABELS = {"lmstudio": "LM Studio", "ollama": "Ollama"}


@dataclass(frozen=True)
class Candidate:
    """One model of the chat chain, as the policy sees it. `footprint_bytes`: learned if known, else declared."""

    key: str
    backend: str
    tier: int
    context_window: int
    footprint_bytes: int

    def __post_init__(self) -> None:
        check_text(self, "key")
        check_text(self, "backend")
        check_int(self, "tier")
        check_int(self, "context_window", minimum=1)
        check_int(self, "footprint_bytes")

    @classmethod
    def from_spec(cls, spec: ModelSpec, footprint_bytes: int | None = None) -> Candidate:
        """From a catalog entry; `footprint_bytes` (a measurement) replaces the declared `footprint_mb`."""
        return cls(
            key=spec.key,
            backend=spec.backend,
            tier=spec.tier,
            context_window=spec.context_window,
            footprint_bytes=spec.footprint_mb * MiB if footprint_bytes is None else footprint_bytes,
        )


@dataclass(frozen=True)
class Availability:
    """What answers right now. `installed` None means unknown: then nothing is filtered for it."""

    reachable_backends: frozenset[str]
    installed: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reachable_backends", frozenset(self.reachable_backends))
        if self.installed is not None:
            object.__setattr__(self, "installed", frozenset(self.installed))


@dataclass(frozen=True)
class Choice:
    """The model to use (None: none is usable), why, and why each other model was not chosen (chain order)."""

    key: str | None
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FailureVerdict:
    """What to do after a failure: retry the same model after `delay_s`, or move on (it cools down until then)."""

    retry_same: bool
    delay_s: float
    cooldown_until: float | None


@dataclass
class _Cooldown:
    until: float
    reason: str


class ChatPolicy:
    """Model selection and switching for one conversation agent. See the module docstring for the rules.

    Every `choose` call is a decision on a fresh reading: the caller acts on it (switches when the key differs
    from `current`). The policy remembers the readings it saw, which is how it knows how long a better model has
    fitted, and which model is in use since when.
    """

    def __init__(
        self,
        chain: Sequence[Candidate],
        *,
        cooldown_s: float,
        hysteresis_s: float,
        max_retries: int,
        retry_backoff_s: float,
        min_tokens_per_s: float,
        memory_s: float = 600.0,
    ) -> None:
        """`memory_s`: how long a failure or a speed measurement counts for ranking; after that a model that
        failed or was slow (say, while the GPU was crowded) gets a fresh chance."""
        keys = [c.key for c in chain]
        if not chain or len(set(keys)) != len(keys):
            raise InvalidRequest(f"ChatPolicy needs a non-empty chain of distinct models, got {keys!r}")
        for name, value in (
            ("cooldown_s", cooldown_s),
            ("hysteresis_s", hysteresis_s),
            ("retry_backoff_s", retry_backoff_s),
            ("min_tokens_per_s", min_tokens_per_s),
            ("memory_s", memory_s),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise invalid("ChatPolicy", name, value, "a finite number >= 0")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise invalid("ChatPolicy", "max_retries", max_retries, "an integer >= 0")
        self._chain: list[Candidate] = list(chain)
        self._cooldown_s = float(cooldown_s)
        self._hysteresis_s = float(hysteresis_s)
        self._max_retries = max_retries
        self._retry_backoff_s = float(retry_backoff_s)
        self._min_tokens_per_s = float(min_tokens_per_s)
        self._memory_s = float(memory_s)
        self._failures_in_row: dict[str, int] = {}
        self._cooldowns_in_row: dict[str, int] = {}
        self._cooldowns: dict[str, _Cooldown] = {}
        self._failure_times: dict[str, list[float]] = {}
        self._speed: dict[str, tuple[float, float]] = {}  # key -> (tokens/s, measured at)
        self._usable_since: dict[str, float] = {}  # key -> first reading of its current run of usable readings
        self._in_use: tuple[str, float] | None = None  # the model in use, since when

    # -- the chain ------------------------------------------------------------------------------------------

    @property
    def chain(self) -> tuple[Candidate, ...]:
        return tuple(self._chain)

    def candidate(self, key: str) -> Candidate:
        for candidate in self._chain:
            if candidate.key == key:
                return candidate
        raise InvalidRequest(f"{key!r} is not in the chat chain ({', '.join(c.key for c in self._chain)})")

    def learn_footprint(self, key: str, footprint_bytes: int) -> None:
        """A measured footprint replaces the declared one (the loader measured VRAM before and after)."""
        old = self.candidate(key)
        new = Candidate(old.key, old.backend, old.tier, old.context_window, footprint_bytes)
        self._chain[self._chain.index(old)] = new

    # -- decisions ------------------------------------------------------------------------------------------

    def choose(
        self,
        grantable_bytes: int | None,
        availability: Availability,
        now: float,
        current: str | None = None,
        pinned: str | None = None,
    ) -> Choice:
        """The model to use now. `grantable_bytes`: VRAM the gate could give a chat model, counting what the
        current chat model already holds (None: no GPU limit known, everything fits)."""
        blockers = {c.key: self._blockers(c, grantable_bytes, availability, now) for c in self._chain}
        for key, why in blockers.items():
            if why:
                self._usable_since.pop(key, None)
            else:
                self._usable_since.setdefault(key, now)
        if current is not None and (self._in_use is None or self._in_use[0] != current):
            self._in_use = (current, now)  # the caller runs a model we did not pick (or we just started)

        usable = sorted((c for c in self._chain if not blockers[c.key]), key=lambda c: self._rank(c, now))
        key, reason, held_by = self._decide(usable, blockers, now, current, pinned)
        rejected = tuple(
            (c.key, self._why_not(c, key, blockers, usable, held_by, pinned, now)) for c in self._chain if c.key != key
        )
        if key is not None and (self._in_use is None or self._in_use[0] != key):
            self._in_use = (key, now)
        return Choice(key, reason, rejected)

    def record_failure(self, key: str, reason: str, now: float) -> FailureVerdict:
        """A load or a reply on `key` failed for `reason` (a `Reason` code or a sentence)."""
        self.candidate(key)
        self._failure_times.setdefault(key, []).append(now)
        failures = self._failures_in_row.get(key, 0) + 1
        if failures <= self._max_retries and _code(reason) not in NOT_RETRIED:
            self._failures_in_row[key] = failures
            return FailureVerdict(True, self._retry_backoff_s * 2 ** (failures - 1), None)
        self._failures_in_row[key] = 0  # after the cool-down it gets its retries again
        cooldowns = self._cooldowns_in_row.get(key, 0) + 1
        self._cooldowns_in_row[key] = cooldowns
        duration = min(self._cooldown_s * 2 ** (cooldowns - 1), self._cooldown_s * COOLDOWN_MAX_FACTOR)
        self._cooldowns[key] = _Cooldown(now + duration, _describe(reason))
        return FailureVerdict(False, 0.0, now + duration)

    def record_success(self, key: str, now: float, tokens_per_s: float | None) -> None:
        """A reply completed: the failure streak is over, and the reply's speed (if measured) is learned."""
        self.candidate(key)
        self._failures_in_row.pop(key, None)
        self._cooldowns_in_row.pop(key, None)
        self._cooldowns.pop(key, None)
        if tokens_per_s is None or not math.isfinite(tokens_per_s) or tokens_per_s < 0:
            return
        previous = self._speed.get(key)
        if previous is not None and now - previous[1] <= self._memory_s:
            w = SPEED_WEIGHT_OF_NEW_SAMPLE
            tokens_per_s = w * tokens_per_s + (1 - w) * previous[0]
        self._speed[key] = (tokens_per_s, now)

    # -- what the agent and `mai models` ask ----------------------------------------------------------------

    def too_slow(self, key: str) -> bool:
        """The learned speed (latest measurements) is below `min_tokens_per_s`: a reason to switch away."""
        speed = self._speed.get(key)
        return speed is not None and speed[0] < self._min_tokens_per_s

    def learned_speed(self, key: str) -> float | None:
        speed = self._speed.get(key)
        return None if speed is None else speed[0]

    def cooling_down(self, now: float) -> dict[str, float]:
        """key -> seconds left, for every model still cooling down at `now`."""
        return {key: cd.until - now for key, cd in self._cooldowns.items() if cd.until > now}

    # -- internals ------------------------------------------------------------------------------------------

    def _blockers(
        self, c: Candidate, grantable_bytes: int | None, availability: Availability, now: float
    ) -> list[str]:
        """Every reason `c` cannot be used now (empty: usable)."""
        why = []
        if c.backend not in availability.reachable_backends:
            why.append(f"{BACKEND_LABELS.get(c.backend, c.backend)} unreachable")
        if availability.installed is not None and c.key not in availability.installed:
            why.append("not installed")
        cooldown = self._cooldowns.get(c.key)
        if cooldown is not None and cooldown.until > now:
            why.append(f"cooling down {math.ceil(cooldown.until - now)} s after: {cooldown.reason}")
        if grantable_bytes is not None and c.footprint_bytes > grantable_bytes:
            why.append(f"needs {_gib(c.footprint_bytes)}, {_gib(max(grantable_bytes, 0))} grantable")
        return why

    def _slow_now(self, key: str, now: float) -> bool:
        speed = self._speed.get(key)
        return speed is not None and now - speed[1] <= self._memory_s and speed[0] < self._min_tokens_per_s

    def _speed_now(self, key: str, now: float) -> float:
        speed = self._speed.get(key)
        return speed[0] if speed is not None and now - speed[1] <= self._memory_s else 0.0

    def _recent_failures(self, key: str, now: float) -> int:
        times = [t for t in self._failure_times.get(key, ()) if now - t <= self._memory_s]
        self._failure_times[key] = times
        return len(times)

    def _rank(self, c: Candidate, now: float) -> tuple[bool, int, int, float, int]:
        """Smaller is better."""
        return (
            self._slow_now(c.key, now),
            -c.tier,
            self._recent_failures(c.key, now),
            -self._speed_now(c.key, now),
            self._chain.index(c),
        )

    def _decide(
        self,
        usable: list[Candidate],
        blockers: dict[str, list[str]],
        now: float,
        current: str | None,
        pinned: str | None,
    ) -> tuple[str | None, str, str | None]:
        """(key, reason, the current model when hysteresis is what keeps it)."""
        pinned_note = ""
        if pinned is not None:
            pinned_why = self._unusable_reason(pinned, blockers)
            if pinned_why is None:
                return pinned, "pinned by mai switch", None
            pinned_note = f"pinned {pinned} is not usable ({pinned_why}); "
        if not usable:
            return None, pinned_note + "no chat model is usable", None
        best = usable[0]
        current_why = self._unusable_reason(current, blockers) if current is not None else None
        if current is None:
            return best.key, pinned_note + f"best usable model (tier {best.tier})", None
        if current_why is None and self._slow_now(current, now):
            current_why = f"too slow ({self._speed[current][0]:.1f} tokens/s, minimum {self._min_tokens_per_s:g})"
        if current_why is not None:
            if best.key == current:  # too slow, yet nothing else is usable
                return current, pinned_note + f"{current} is {current_why}, but nothing else is usable", None
            return best.key, pinned_note + f"switched from {current}: {current_why}", None
        if best.key == current:
            return current, pinned_note + "current model is still the best usable", None
        better = usable[: [c.key for c in usable].index(current)]
        held_s = now - self._in_use[1] if self._in_use is not None and self._in_use[0] == current else 0.0
        if held_s >= self._hysteresis_s:
            for c in better:
                stable_s = now - self._usable_since[c.key]
                if stable_s >= self._hysteresis_s:
                    return c.key, pinned_note + f"upgrade from {current}: usable for {stable_s:.0f} s", None
        return current, pinned_note + f"keeping {current}: a better model waits for hysteresis", current

    def _unusable_reason(self, key: str, blockers: dict[str, list[str]]) -> str | None:
        if key not in blockers:
            return "not in the chat chain"
        return "; ".join(blockers[key]) or None

    def _why_not(
        self,
        c: Candidate,
        chosen: str | None,
        blockers: dict[str, list[str]],
        usable: list[Candidate],
        held_by: str | None,
        pinned: str | None,
        now: float,
    ) -> str:
        if blockers[c.key] or chosen is None:
            return "; ".join(blockers[c.key]) or "not chosen"
        if chosen == pinned:
            return f"{pinned} is pinned by mai switch"
        order = [u.key for u in usable]
        if chosen in order and order.index(c.key) < order.index(chosen):
            if held_by is not None and self._in_use is not None and now - self._in_use[1] < self._hysteresis_s:
                held_s = now - self._in_use[1]
                return f"better, but {held_by} has been in use only {held_s:.0f} s of {self._hysteresis_s:g} s"
            stable_s = now - self._usable_since[c.key]
            return f"better, but usable only for {stable_s:.0f} s of {self._hysteresis_s:g} s"
        if self._slow_now(c.key, now):
            return f"too slow: {self._speed[c.key][0]:.1f} tokens/s, minimum {self._min_tokens_per_s:g}"
        winner = self.candidate(chosen)
        if c.tier != winner.tier:  # ranked after the chosen one and not slow: a lower tier
            return f"lower tier ({c.tier}) than {chosen} ({winner.tier})"
        failures, winner_failures = self._recent_failures(c.key, now), self._recent_failures(chosen, now)
        if failures > winner_failures:
            return f"same tier as {chosen}, {failures} recent failure{'s' if failures != 1 else ''}"
        speed, winner_speed = self._speed_now(c.key, now), self._speed_now(chosen, now)
        if speed < winner_speed:
            shown = f"{speed:.1f}" if speed else "not measured"
            return f"same tier as {chosen}, slower ({shown} vs {winner_speed:.1f} tokens/s)"
        return f"same tier as {chosen}, later in the chain"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def _code(reason: str) -> str:
    # Reason hashes by member name, not value, so compare plain strings.
    return reason.value if isinstance(reason, Reason) else str(reason)


def _describe(reason: str) -> str:
    """A reason code reads as words ("prediction_failed" -> "prediction failed"); a sentence stays as it is."""
    text = _code(reason)
    return text.replace("_", " ") if text in _REASON_CODES else text


_REASON_CODES = frozenset(r.value for r in Reason)
