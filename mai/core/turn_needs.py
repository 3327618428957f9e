"""What a turn needs of the model that answers it, read from the message and the conversation. Pure functions.

Two questions, one per concern of the chat model choice (mai.core.chat_policy decides with both answers):
- The task (`estimate_needs`): which kinds of turn the message is (TurnKind: code, a request for long reasoning,
  a long message, an image, a tool call), each with the text that showed it, and what the catalog's `turns.needs`
  rules then ask of a model: a minimum tier and capabilities. A message of none of these kinds is *simple*.
- The conversation (`window_fits`): for each model, whether its context window holds the whole conversation
  without summarising, and how much of it the model would be fed otherwise. It runs `fit_to_window`, the rule that
  really feeds the model, with that model's own token counter, so "holds" here is exactly "not compressed" there.

Token counts are the chat backends' counters (`ChatBackends.token_counter`: today a deterministic estimate of four
characters a token for LM Studio and Ollama alike; an exact count would be a round trip per message). The message's
length for the `long` kind is counted with the counter of the model in use (the chain's first when none is).

Detection is by plain patterns, chosen to miss rather than to cry wolf where a false alarm costs a refusal: an
image is only a markdown image, a data URL, or a path or URL to an image file ("a .png" in prose is not one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from mai.core.context import CountTokens, fit_to_window
from messages.chat import ChatMessage
from messages.conversation import TurnKind

if TYPE_CHECKING:
    from config.schema import TurnRules

_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|function |const |let |var |public |private |return\b"
    r"|fn |func |package |SELECT |INSERT |UPDATE |for \(|if \(|while \(|.*\)\s*\{\s*$|.*;\s*$|\}\s*$)",
    re.MULTILINE,
)
_CODE_WORDS = re.compile(
    r"\b(code|function|method|bug|debug|refactor|compile[sr]?|traceback|stack trace|exception|segfault|regex"
    r"|python|javascript|typescript|rust|golang|java|c\+\+|sql|unit tests?)\b", re.IGNORECASE)
_TRACEBACK = "Traceback (most recent call last)"
_REASONING = re.compile(
    r"step[- ]by[- ]step|think (it )?through|think (hard|carefully|deeply)|reason (it )?(out|through|carefully)"
    r"|\b(prove|proof|derive|derivation)\b|in (depth|detail)|detailed (analysis|explanation)|explain why"
    r"|pros and cons|trade-?offs", re.IGNORECASE)
_IMAGE_EXT = r"\.(png|jpe?g|gif|webp|bmp|tiff?)\b"
_IMAGE = re.compile(
    r"!\[[^\]]*\]\([^)]+\)|data:image/[a-z+]+;base64,"
    r"|(https?://|file://|~/|\./|\.\./|/)[^\s'\"<>]*" + _IMAGE_EXT, re.IGNORECASE)
_TOOL = re.compile(r"\b(call|use|invoke|run)\b[^.?!\n]{0,40}\btools?\b|\b(tool|function)[ _]calls?\b"
                   r"|\"tool_calls\"", re.IGNORECASE)
_EVIDENCE_CHARS = 40
_MIN_CODE_LINES = 2


@dataclass(frozen=True)
class WindowFit:
    """How a model's context window takes the conversation: `holds` it whole (not summarised, not cut), else
    `kept_tokens` of its `total_tokens` are fed as they were (the rest summarised or cut)."""

    holds: bool
    kept_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TurnNeeds:
    """What one turn needs. `kinds`: kind -> the text that showed it. `windows`: model key -> WindowFit (a model
    missing from it is not judged by its window). `simple`: none of the kinds, so any adequate model will do."""

    kinds: Mapping[TurnKind, str]
    message_tokens: int
    min_tier: int = 0
    capabilities: frozenset[str] = frozenset()
    windows: Mapping[str, WindowFit] = field(default_factory=dict)

    @property
    def simple(self) -> bool:
        return not self.kinds

    def describe(self) -> str:
        """'code (```), long (2,412 tokens)' or 'simple': for log lines and replies."""
        if self.simple:
            return f"simple ({self.message_tokens} tokens)"
        return ", ".join(f"{kind.value} ({why})" for kind, why in self.kinds.items())


def detect_kinds(text: str, message_tokens: int, long_at_tokens: int) -> dict[TurnKind, str]:
    """The kinds of turn `text` is, each with what showed it (quoted, shortened)."""
    kinds: dict[TurnKind, str] = {}
    code_lines = _CODE_LINE.findall(text)
    if _FENCE.search(text):
        kinds[TurnKind.CODE] = "a fenced code block"
    elif _TRACEBACK in text:
        kinds[TurnKind.CODE] = "a Python traceback"
    elif len(code_lines) >= _MIN_CODE_LINES:
        kinds[TurnKind.CODE] = f"{len(code_lines)} code-like lines"
    elif match := _CODE_WORDS.search(text):
        kinds[TurnKind.CODE] = f"the word {match.group(0)!r}"
    if match := _REASONING.search(text):
        kinds[TurnKind.REASONING] = f"{_quote(match.group(0))}"
    if message_tokens >= long_at_tokens:
        kinds[TurnKind.LONG] = f"{message_tokens:,} tokens, long from {long_at_tokens:,}"
    if match := _IMAGE.search(text):
        kinds[TurnKind.IMAGE] = _quote(match.group(0))
    if match := _TOOL.search(text):
        kinds[TurnKind.TOOL] = _quote(match.group(0))
    return kinds


def estimate_needs(text: str, rules: TurnRules, count_tokens: CountTokens) -> TurnNeeds:
    """The turn's kinds and what the catalog's rules ask of a model for them (the highest tier any kind asks,
    every capability any kind asks). Windows are added by the caller (`with_windows`)."""
    tokens = max(0, int(count_tokens(text)))
    kinds = detect_kinds(text, tokens, rules.long_at_tokens)
    min_tier, capabilities = 0, set()
    for kind in kinds:
        need = rules.need(kind.value)
        min_tier = max(min_tier, need.min_tier)
        capabilities.update(need.capabilities)
    return TurnNeeds(kinds, tokens, min_tier, frozenset(capabilities))


def with_windows(needs: TurnNeeds, windows: Mapping[str, WindowFit]) -> TurnNeeds:
    return TurnNeeds(needs.kinds, needs.message_tokens, needs.min_tier, needs.capabilities, dict(windows))


@dataclass(frozen=True)
class WindowSpec:
    """One model as `window_fits` needs it: its window, its counter and the room it keeps for the reply."""

    key: str
    window_tokens: int
    count_tokens: CountTokens
    reserve_for_reply: int


def window_fits(messages: Sequence[ChatMessage], models: Sequence[WindowSpec], *,
                compress_at_fraction: float) -> dict[str, WindowFit]:
    """For each model, how its window takes `messages` (the canonical conversation, the new user message last),
    by the rule that feeds it (`fit_to_window`)."""
    fits = {}
    for model in models:
        counted: dict[str, int] = {}
        count = _cached(model.count_tokens, counted)
        plan = fit_to_window(messages, model.window_tokens, count, reserve_for_reply=model.reserve_for_reply,
                             compress_at_fraction=compress_at_fraction)
        total = sum(count(m.content) for m in messages)
        holds = not (plan.dropped or plan.compressed or plan.truncated)
        kept = plan.tokens if plan.truncated else sum(count(messages[i].content) for i in plan.kept)
        fits[model.key] = WindowFit(holds, total if holds else min(kept, total), total)
    return fits


def _cached(count: CountTokens, cache: dict[str, int]) -> Callable[[str], int]:
    def counted(text: str) -> int:
        if text not in cache:
            cache[text] = max(0, int(count(text)))
        return cache[text]

    return counted


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= _EVIDENCE_CHARS else text[: _EVIDENCE_CHARS - 1] + "…")
