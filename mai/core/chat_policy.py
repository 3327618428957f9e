"""Which chat model the conversation agent uses now, and what it does when one fails: a pure policy.

The agent feeds it readings (`choose` with the VRAM the gate could grant and which backends answer) and outcomes
(`record_failure`, `record_success`); the policy answers with a `Choice` or a `FailureVerdict`. It never sleeps,
reads the clock or touches a backend: `now` always comes in, so tests drive it with a virtual clock.

The rules, in the order they apply:
- A model is *usable* when its backend is reachable, it is installed (when that is known), it is not cooling down
  after failures and its footprint fits the grantable VRAM.
- A turn's needs (`TurnNeeds`, from mai.core.turn_needs; none given: every usable model meets them) narrow the
  usable models, in this order: (a) a model without a capability the turn needs never answers it; (b) when some
  of the rest holds the conversation in its window without summarising, only those; when none does, only those
  that keep the most of it; (c) when some of the rest reach the turn's minimum tier, only those (a tier is a
  preference: the best that can run answers a turn no model of that tier can take). A usable model that passes
  all three is *adequate*.
- Among adequate models the rank is: not known to be too slow, higher tier, fewer recent failures, faster learned
  speed (a measured model ahead of an unmeasured one), then chain order.
- A model pinned by `mai switch` wins while it is usable and has the turn's capabilities.
- Switching *down* (the current model no longer fits, failed, is too slow, or is not adequate for this turn)
  happens at once, to the best adequate model.
- A simple turn (a greeting: no kind of need) stays on the current model while it is adequate: a switch costs a
  load (`record_load` learns how long one takes; the reason says it).
- Switching *up* while the current model is still adequate waits for hysteresis: the current model has been in
  use for `hysteresis_s`, and the better one has been usable in every reading for the last `hysteresis_s`. So
  readings that flap between two values cannot make the model flap.
- Failures: retry the same model with exponential backoff up to `max_retries`, then it cools down (`cooldown_s`,
  doubling on each cool-down without a success in between, up to 10x) and the agent moves on down the chain.
  A missing model or a refusal for memory is not retried: it cools down at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from messages.base import check_int, check_text, invalid
from messages.errors import InvalidRequest, Reason

if TYPE_CHECKING:
    from config.schema import ModelSpec
    from mai.core.turn_needs import TurnNeeds

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
    capabilities: frozenset[str] = frozenset({"chat"})

    def __post_init__(self) -> None:
        check_text(self, "key")
        check_text(self, "backend")
        check_int(self, "tier")
        check_int(self, "context_window", minimum=1)
        check_int(self, "footprint_bytes")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))

    @classmethod
    def from_spec(cls, spec: ModelSpec, footprint_bytes: int | None = None) -> Candidate:
        """From a catalog entry; `footprint_bytes` (a measurement) replaces the declared `footprint_mb`."""
        return cls(
            key=spec.key,
            backend=spec.backend,
            tier=spec.tier,
            context_window=spec.context_window,
            footprint_bytes=spec.footprint_mb * MiB if footprint_bytes is None else footprint_bytes,
            capabilities=frozenset(spec.capabilities),
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
        self._load_s: dict[str, float] = {}  # key -> how long its last load took (a switch's cost)
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
        self._chain[self._chain.index(old)] = dataclasses.replace(old, footprint_bytes=footprint_bytes)

    def record_load(self, key: str, load_s: float) -> None:
        """A load of `key` took `load_s`: what switching to it costs, said in the reasons of later switches."""
        self.candidate(key)
        if math.isfinite(load_s) and load_s >= 0:
            self._load_s[key] = float(load_s)

    # -- decisions ------------------------------------------------------------------------------------------

    def choose(
        self,
        grantable_bytes: int | None,
        availability: Availability,
        now: float,
        current: str | None = None,
        pinned: str | None = None,
        needs: TurnNeeds | None = None,
        dry_run: bool = False,
    ) -> Choice:
        """The model to use now. `grantable_bytes`: VRAM the gate could give a chat model, counting what the
        current chat model already holds (None: no GPU limit known, everything fits). `needs`: the turn's (None:
        no turn, as between turns). `dry_run`: a question (`select_best_model`), not a decision acted on."""
        blockers = {c.key: self._blockers(c, grantable_bytes, availability, now) for c in self._chain}
        for key, why in blockers.items():
            if why:
                self._usable_since.pop(key, None)
            else:
                self._usable_since.setdefault(key, now)
        in_use_before = self._in_use
        if current is not None and (self._in_use is None or self._in_use[0] != current):
            self._in_use = (current, now)  # the caller runs a model we did not pick (or we just started)

        hard, adequacy, note = self._needs_blockers(blockers, needs)
        usable = sorted((c for c in self._chain if not adequacy[c.key]), key=lambda c: self._rank(c, now))
        key, reason, held_by, simple_hold = self._decide(usable, hard, adequacy, now, current, pinned, needs)
        rejected = tuple(
            (c.key, self._why_not(c, key, adequacy, usable, held_by, simple_hold, pinned, now))
            for c in self._chain if c.key != key
        )
        if needs is not None and key is not None and current is not None and key != current:
            reason += "; " + self._load_cost(key)
        if note:
            reason += f"; {note}"
        if dry_run:
            self._in_use = in_use_before
        elif key is not None and (self._in_use is None or self._in_use[0] != key):
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

    def _needs_blockers(
        self, blockers: dict[str, list[str]], needs: TurnNeeds | None
    ) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
        """(hard, adequacy, note): `hard` adds the capabilities the turn needs to the resource blockers (a pin
        answers to these); `adequacy` adds rules (b) and (c) of the module docstring; `note` says when no usable
        model reaches the tier asked for."""
        hard = {key: list(why) for key, why in blockers.items()}
        if needs is None:
            return hard, hard, ""
        cands = {c.key: c for c in self._chain}
        for key, c in cands.items():
            missing = sorted(needs.capabilities - c.capabilities)
            if missing:
                hard[key].append(f"lacks {', '.join(missing)} ({needs.describe()})")
        adequacy = {key: list(why) for key, why in hard.items()}
        left = [key for key in cands if not adequacy[key]]
        judged = [key for key in left if key in needs.windows]
        holding = [key for key in judged if needs.windows[key].holds]
        if holding:
            for key in judged:
                if key not in holding:
                    fit = needs.windows[key]
                    adequacy[key].append(f"its {cands[key].context_window:,}-token window would summarise the "
                                         f"conversation ({fit.total_tokens:,} tokens); another holds it whole")
        elif judged:
            most = max(needs.windows[key].kept_tokens for key in judged)
            for key in judged:
                fit = needs.windows[key]
                if fit.kept_tokens < most:
                    adequacy[key].append(f"keeps less of the conversation ({fit.kept_tokens:,} of "
                                         f"{fit.total_tokens:,} tokens; another keeps {most:,})")
        left = [key for key in cands if not adequacy[key]]
        note = ""
        if needs.min_tier and left:
            if any(cands[key].tier >= needs.min_tier for key in left):
                for key in left:
                    if cands[key].tier < needs.min_tier:
                        adequacy[key].append(f"tier {cands[key].tier} < {needs.min_tier} asked for "
                                             f"{needs.describe()}")
            else:
                note = f"no model of tier >= {needs.min_tier} can answer now ({needs.describe()}): the best that can"
        return hard, adequacy, note

    def _load_cost(self, key: str) -> str:
        measured = self._load_s.get(key)
        return (f"the switch costs a load of {key} (~{measured:.1f} s last time)" if measured is not None
                else f"the switch costs a load of {key}")

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
        hard: dict[str, list[str]],
        adequacy: dict[str, list[str]],
        now: float,
        current: str | None,
        pinned: str | None,
        needs: TurnNeeds | None,
    ) -> tuple[str | None, str, str | None, bool]:
        """(key, reason, the current model when hysteresis or a simple turn is what keeps it, a simple turn's
        hold). `usable`: the adequate models, best first."""
        pinned_note = ""
        if pinned is not None:
            pinned_why = self._unusable_reason(pinned, hard)
            if pinned_why is None:
                return pinned, "pinned by mai switch", None, False
            pinned_note = f"pinned {pinned} is not usable ({pinned_why}); "
        if not usable:
            return None, pinned_note + "no chat model is usable" + self._for_turn(needs), None, False
        best = usable[0]
        current_why = self._unusable_reason(current, adequacy) if current is not None else None
        if current is None:
            return best.key, pinned_note + f"best usable model (tier {best.tier})" + self._for_turn(needs), None, False
        if current_why is None and self._slow_now(current, now):
            current_why = f"too slow ({self._speed[current][0]:.1f} tokens/s, minimum {self._min_tokens_per_s:g})"
        if current_why is not None:
            if best.key == current:  # too slow, yet nothing else is usable
                return current, pinned_note + f"{current} is {current_why}, but nothing else is usable", None, False
            return best.key, pinned_note + f"switched from {current}: {current_why}", None, False
        if best.key == current:
            return current, pinned_note + "current model is still the best usable" + self._for_turn(needs), None, False
        if needs is not None and needs.simple:
            return current, pinned_note + f"a simple turn stays on {current}: it is adequate and " \
                + self._load_cost(best.key).replace("the switch", "a switch"), current, True
        better = usable[: [c.key for c in usable].index(current)]
        held_s = now - self._in_use[1] if self._in_use is not None and self._in_use[0] == current else 0.0
        if held_s >= self._hysteresis_s:
            for c in better:
                stable_s = now - self._usable_since[c.key]
                if stable_s >= self._hysteresis_s:
                    return c.key, pinned_note + f"upgrade from {current}: usable for {stable_s:.0f} s", None, False
        return current, pinned_note + f"keeping {current}: a better model waits for hysteresis", current, False

    @staticmethod
    def _for_turn(needs: TurnNeeds | None) -> str:
        return "" if needs is None else f" for a {needs.describe()} turn" if needs.simple else f" for {needs.describe()}"

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
        simple_hold: bool,
        pinned: str | None,
        now: float,
    ) -> str:
        if blockers[c.key] or chosen is None:
            return "; ".join(blockers[c.key]) or "not chosen"
        if chosen == pinned:
            return f"{pinned} is pinned by mai switch"
        order = [u.key for u in usable]
        if chosen in order and order.index(c.key) < order.index(chosen):
            if simple_hold:
                return f"better, but a simple turn stays on {held_by} (a switch costs a load)"
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
