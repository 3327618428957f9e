"""What a chat model is fed: the canonical conversation trimmed to the model's window. Pure functions.

The canonical list lives in the history store and is never shortened; this module only decides which of its
messages a given model sees, so a switch to a model with a smaller window loses nothing for good.

The rule (`fit_to_window`):
1. If the whole conversation takes at most `compress_at_fraction` of the window (and fits the budget, the window
   minus `reserve_for_reply`), the model gets all of it.
2. Otherwise it is compressed to that fraction. Always kept: every system message and the latest user message.
   Kept when they fit, in this order: the user's instructions, then the most recent messages, newest first, as a
   contiguous run. "The user's instructions" are the FIRST user message and every user message whose content
   starts with "/remember". Whatever is left out is replaced by ONE system message, placed where the first
   left-out message stood: "Earlier in this conversation (N messages, summarised):" followed by the first sentence
   of each left-out message (newest ones first if they do not all fit a quarter of the target).
3. If the system messages and the latest user message alone exceed the budget, only they are fed: the latest
   user message is cut in its middle (marked with `TRUNCATION_MARKER`) and, if that is not enough, the system
   messages too. The plan says `truncated=True`; this is the only case where `tokens` may exceed the budget
   (when not even the markers fit).
Consecutive messages of one role are merged at the end (the LM Studio SDK raises on two assistant or two system
messages in a row). A message costs `count_tokens(content) + message_overhead_tokens` (the chat template's
role markers); `ContextPlan.tokens` is that sum over what is fed, counted on the merged messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from messages.chat import ChatMessage
from messages.errors import InvalidRequest

SUMMARY_PREFIX = "Earlier in this conversation"
TRUNCATION_MARKER = "\n[… cut to fit the context window …]\n"
REMEMBER_PREFIX = "/remember"
MERGE_SEPARATOR = "\n\n"
SUMMARY_SHARE = 4  # the summary may take up to 1/SUMMARY_SHARE of the target
SUMMARY_LINE_CHARS = 120

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class ContextPlan:
    """What to feed a model. `kept`: indices of the input messages that are fed (merged, perhaps cut);
    `dropped`: how many input messages are not; `summary`: the message standing in for them, if any."""

    messages: tuple[ChatMessage, ...]
    dropped: int
    compressed: bool
    tokens: int
    truncated: bool = False
    kept: tuple[int, ...] = ()
    summary: ChatMessage | None = None


def approx_tokens(text: str) -> int:
    """Deterministic stand-in when a backend cannot count: about four characters a token, at least 1."""
    return math.ceil(len(text) / 4)


def merge_consecutive(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """Consecutive messages of one role become one, their non-empty contents joined by a blank line."""
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            parts = [p for p in (merged[-1].content, message.content) if p]
            merged[-1] = ChatMessage(message.role, MERGE_SEPARATOR.join(parts))
        else:
            merged.append(message)
    return tuple(merged)


def is_instruction(index: int, message: ChatMessage, first_user: int | None) -> bool:
    """The user's instructions: the first user message, and any user message starting with "/remember"."""
    return message.role == "user" and (index == first_user or message.content.lstrip().startswith(REMEMBER_PREFIX))


def fit_to_window(
    messages: Sequence[ChatMessage],
    window_tokens: int,
    count_tokens: CountTokens,
    *,
    reserve_for_reply: int,
    compress_at_fraction: float = 0.7,
    message_overhead_tokens: int = 4,
) -> ContextPlan:
    """The plan for feeding `messages` to a model with a `window_tokens` context (rules in the module docstring).

    `count_tokens` is called about twice per message (results are cached within the call): wrap a remote counter
    in a cache of your own if conversations are long."""
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 1:
        raise InvalidRequest(f"fit_to_window: window_tokens must be an integer >= 1, got {window_tokens!r}")
    if isinstance(reserve_for_reply, bool) or not isinstance(reserve_for_reply, int) or reserve_for_reply < 0:
        raise InvalidRequest(f"fit_to_window: reserve_for_reply must be an integer >= 0, got {reserve_for_reply!r}")
    if not 0 < compress_at_fraction <= 1:
        raise InvalidRequest(f"fit_to_window: compress_at_fraction must be in (0, 1], got {compress_at_fraction!r}")
    if message_overhead_tokens < 0:
        raise InvalidRequest(f"fit_to_window: message_overhead_tokens must be >= 0, got {message_overhead_tokens!r}")
    return _Fitter(tuple(messages), window_tokens, count_tokens, reserve_for_reply, compress_at_fraction,
                   message_overhead_tokens).plan()


class _Fitter:
    """One fit_to_window call: the inputs, a token cache, and the steps of the rule."""

    def __init__(
        self,
        messages: tuple[ChatMessage, ...],
        window_tokens: int,
        count_tokens: CountTokens,
        reserve_for_reply: int,
        compress_at_fraction: float,
        overhead: int,
    ) -> None:
        self.messages = messages
        self.budget = window_tokens - reserve_for_reply
        self.target = min(self.budget, math.floor(window_tokens * compress_at_fraction))
        self.overhead = overhead
        self._count = count_tokens
        self._cache: dict[str, int] = {}

    def count(self, text: str) -> int:
        if text not in self._cache:
            self._cache[text] = max(0, int(self._count(text)))
        return self._cache[text]

    def cost(self, message: ChatMessage) -> int:
        return self.count(message.content) + self.overhead

    def measure(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.cost(m) for m in messages)

    def plan(self) -> ContextPlan:
        msgs, everything = self.messages, tuple(range(len(self.messages)))
        whole = merge_consecutive(msgs)
        whole_tokens = self.measure(whole)
        if whole_tokens <= self.target:
            return ContextPlan(whole, 0, False, whole_tokens, kept=everything)

        users = [i for i, m in enumerate(msgs) if m.role == "user"]
        latest_user = users[-1] if users else None
        must = {i for i, m in enumerate(msgs) if m.role == "system"} | ({latest_user} - {None})
        if self.measure(merge_consecutive([msgs[i] for i in sorted(must)])) > self.budget:
            return self._truncated(sorted(must), latest_user)

        first_user = users[0] if users else None
        instructions = [i for i in everything if i not in must and is_instruction(i, msgs[i], first_user)]
        others = [i for i in everything if i not in must]
        lines = {i: _summary_line(msgs[i]) for i in others}
        summary_cap = self.target // SUMMARY_SHARE
        header_cost = self.count(_summary_header(len(others), 0)) + self.overhead
        dropped_line_cost = sum(self.count(line) for line in lines.values())

        def summary_estimate(line_cost: int, any_dropped: bool) -> int:
            return min(summary_cap, header_cost + line_cost) if any_dropped else 0

        kept, used = set(must), sum(self.cost(msgs[i]) for i in must)
        kept_instructions: list[int] = []
        kept_tail: list[int] = []
        for group, stop_at_first_misfit in ((instructions, False), ([i for i in reversed(others)], True)):
            for i in group:
                if i in kept:
                    continue
                after = dropped_line_cost - self.count(lines[i])
                still_dropped = len(others) - (len(kept) - len(must)) - 1 > 0
                if used + self.cost(msgs[i]) + summary_estimate(after, still_dropped) <= self.target:
                    kept.add(i)
                    used += self.cost(msgs[i])
                    dropped_line_cost = after
                    (kept_instructions if group is instructions else kept_tail).append(i)
                elif stop_at_first_misfit:
                    break

        # The estimate adds token counts; a real tokenizer may not. Shed until the real count fits the budget.
        kept_tail.sort()
        with_summary = True
        while True:
            plan = self._assemble(sorted(kept), lines, summary_cap if with_summary else None)
            if plan.tokens <= self.budget:
                return plan
            if kept_tail:
                kept.discard(kept_tail.pop(0))
            elif with_summary and plan.summary is not None:
                with_summary = False
            else:  # only instructions are left to shed; must alone fits, so this ends
                kept.discard(kept_instructions.pop())

    def _assemble(self, kept: list[int], lines: dict[int, str], summary_cap: int | None) -> ContextPlan:
        msgs = self.messages
        kept_set = set(kept)
        dropped = [i for i in range(len(msgs)) if i not in kept_set]
        summary = self._summary(dropped, lines, summary_cap) if dropped and summary_cap is not None else None
        selected = [msgs[i] for i in kept]
        if summary is not None:
            selected.insert(sum(1 for i in kept if i < dropped[0]), summary)
        fed = merge_consecutive(selected)
        return ContextPlan(fed, len(dropped), summary is not None, self.measure(fed), kept=tuple(kept),
                           summary=summary)

    def _summary(self, dropped: list[int], lines: dict[int, str], cap: int) -> ChatMessage | None:
        """Lines for the newest dropped messages that fit `cap`, in conversation order, under one header."""
        shown: list[int] = []
        cost = self.count(_summary_header(len(dropped), len(dropped))) + self.overhead
        if cost > cap:
            return None
        for i in reversed(dropped):
            line_cost = self.count(lines[i]) + 1  # + the newline
            if cost + line_cost > cap:
                break
            shown.append(i)
            cost += line_cost
        text = _summary_header(len(dropped), len(dropped) - len(shown))
        text += "".join("\n" + lines[i] for i in reversed(shown))
        return ChatMessage("system", text)

    def _truncated(self, must: list[int], latest_user: int | None) -> ContextPlan:
        """Only the system messages and the latest user message, cut in the middle until they fit."""
        selected = {i: self.messages[i] for i in must}
        cut_order = ([latest_user] if latest_user is not None else []) + sorted(
            (i for i in must if i != latest_user), key=lambda i: -self.cost(self.messages[i])
        )
        for i in cut_order:
            rest = self.measure(merge_consecutive([m for j, m in selected.items() if j != i]))
            room = self.budget - rest - self.overhead
            message = selected[i]
            selected[i] = ChatMessage(message.role, _cut_middle(message.content, room, self.count))
            if self.measure(merge_consecutive(list(selected.values()))) <= self.budget:
                break
        fed = merge_consecutive([selected[i] for i in must])
        return ContextPlan(fed, len(self.messages) - len(must), False, self.measure(fed), truncated=True,
                           kept=tuple(must))


def _summary_header(total: int, not_shown: int) -> str:
    head = f"{SUMMARY_PREFIX} ({total} message{'s' if total != 1 else ''}, summarised):"
    if not_shown:
        head += f" the oldest {not_shown} are only counted."
    return head


def _summary_line(message: ChatMessage) -> str:
    """"- role: first sentence", whitespace collapsed, at most SUMMARY_LINE_CHARS characters."""
    text = " ".join(message.content.split())
    match = re.match(r"(.+?[.!?])(?:\s|$)", text)
    sentence = match.group(1) if match else text
    if len(sentence) > SUMMARY_LINE_CHARS:
        sentence = sentence[: SUMMARY_LINE_CHARS - 1].rstrip() + "…"
    return f"- {message.role}: {sentence or '(empty)'}"


def _cut_middle(text: str, max_tokens: int, count: CountTokens) -> str:
    """`text` with its middle replaced by TRUNCATION_MARKER, keeping as many characters as fit `max_tokens`
    (binary search; exact for any counter that grows with the text). Unchanged if it already fits."""
    if count(text) <= max_tokens:
        return text

    def keep(n: int) -> str:
        head, tail = n - n // 2, n // 2
        return text[:head] + TRUNCATION_MARKER + (text[len(text) - tail:] if tail else "")

    low, high = 0, len(text) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if count(keep(middle)) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return keep(low)
