"""The needs estimator (mai.core.turn_needs) and the catalog's `turns` rules (config/schema.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_config
from config.schema import TurnNeed, TurnRules
from mai.core.context import approx_tokens, fit_to_window
from mai.core.turn_needs import WindowSpec, detect_kinds, estimate_needs, window_fits
from messages.chat import ChatMessage
from messages.conversation import TurnKind
from config.schema import FrozenMap

RULES = TurnRules(2000, FrozenMap({"code": TurnNeed(2), "reasoning": TurnNeed(3), "long": TurnNeed(3),
                                   "image": TurnNeed(0, ("vision",)), "tool": TurnNeed(2, ("tools",))}))


def kinds(text: str, long_at: int = 2000) -> set[TurnKind]:
    return set(detect_kinds(text, approx_tokens(text), long_at))


@pytest.mark.parametrize("text", ["hi", "hello there!", "how are you today?", "thanks, that helps",
                                  "how do I make a .png file smaller?", "what is the capital of France?"])
def test_plain_messages_are_simple(text: str) -> None:
    needs = estimate_needs(text, RULES, approx_tokens)
    assert needs.simple and needs.min_tier == 0 and not needs.capabilities, needs.kinds


@pytest.mark.parametrize(("text", "kind"), [
    ("```python\nprint(1)\n```", TurnKind.CODE),
    ("def f(x):\n    return x + 1\nclass A:\n    pass", TurnKind.CODE),
    ("Traceback (most recent call last):\n  File 'x.py'", TurnKind.CODE),
    ("why does my python script crash?", TurnKind.CODE),
    ("explain step by step how tides work", TurnKind.REASONING),
    ("prove that there are infinitely many primes", TurnKind.REASONING),
    ("what is in ![cat](/tmp/cat.png)?", TurnKind.IMAGE),
    ("describe /home/me/shots/screen.jpg please", TurnKind.IMAGE),
    ("look at https://example.com/a/b.webp", TurnKind.IMAGE),
    ("please call the weather tool for Paris", TurnKind.TOOL),
    ('{"tool_calls": []}', TurnKind.TOOL),
])
def test_each_kind_is_detected_with_its_evidence(text: str, kind: TurnKind) -> None:
    found = detect_kinds(text, approx_tokens(text), 2000)
    assert kind in found and found[kind], found


def test_a_long_message_is_long_from_the_threshold_counted_by_the_given_counter() -> None:
    text = "word " * 2000  # 10,000 characters: 2,500 tokens at four characters a token
    assert TurnKind.LONG in kinds(text)
    assert TurnKind.LONG not in kinds(text, long_at=2501)
    needs = estimate_needs(text, RULES, lambda t: len(t))  # a counter that counts characters: 10,000 tokens
    assert needs.message_tokens == 10_000 and TurnKind.LONG in needs.kinds


def test_rules_combine_the_highest_tier_and_every_capability() -> None:
    text = "```\nx = 1\n```\nplease call the lint tool, step by step"
    needs = estimate_needs(text, RULES, approx_tokens)
    assert set(needs.kinds) == {TurnKind.CODE, TurnKind.TOOL, TurnKind.REASONING}
    assert needs.min_tier == 3 and needs.capabilities == {"tools"}
    assert "code" in needs.describe() and "tool" in needs.describe()


def test_without_rules_a_kind_asks_nothing() -> None:
    needs = estimate_needs("```\nx = 1\n```", TurnRules(), approx_tokens)
    assert not needs.simple and needs.min_tier == 0 and not needs.capabilities


def test_window_fits_agree_with_fit_to_window() -> None:
    """`holds` is exactly "fit_to_window does not compress", for each model's own counter and reserve."""
    conversation = [ChatMessage("system", "be brief")] + [
        ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 1000) for i in range(30)]
    specs = [WindowSpec("small", 1024, approx_tokens, 256), WindowSpec("big", 32768, approx_tokens, 1024),
             WindowSpec("dense", 32768, lambda t: len(t), 1024)]  # one token a character: 30k tokens
    fits = window_fits(conversation, specs, compress_at_fraction=0.7)
    for spec in specs:
        plan = fit_to_window(conversation, spec.window_tokens, spec.count_tokens,
                             reserve_for_reply=spec.reserve_for_reply, compress_at_fraction=0.7)
        assert fits[spec.key].holds == (not plan.compressed and not plan.dropped and not plan.truncated)
    assert not fits["small"].holds and fits["big"].holds and not fits["dense"].holds
    assert fits["small"].kept_tokens < fits["dense"].kept_tokens <= fits["dense"].total_tokens
    assert fits["big"].kept_tokens == fits["big"].total_tokens


# --- the catalog's turns: section -----------------------------------------------------------------------------

CATALOG = """
models:
  - {key: big, backend: lmstudio, tier: 3, context_window: 32768, footprint_mb: 5600, capabilities: [chat, tools]}
roles:
  chat: [big]
"""


def load_catalog(tmp_path: Path, turns: str) -> object:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOG + turns)
    return load_config(overrides={"system.models_file": str(path)}, env={})


def test_the_default_catalog_has_turn_rules() -> None:
    cfg = load_config(env={})
    assert cfg.turns.need("code").min_tier >= 2 and "vision" in cfg.turns.need("image").capabilities
    assert cfg.to_dict()["turns"]["needs"]["tool"]["capabilities"] == ["tools"]


def test_a_catalog_without_turns_asks_nothing(tmp_path: Path) -> None:
    cfg = load_catalog(tmp_path, "")
    assert cfg.turns == TurnRules() and cfg.turns.need("code") == TurnNeed()


def test_turn_rules_are_read(tmp_path: Path) -> None:
    cfg = load_catalog(tmp_path, "turns:\n  long_at_tokens: 500\n  needs:\n    code: tier >= 2\n"
                                  "    image: capability vision\n    tool: [tier >= 1, capability tools]\n")
    assert cfg.turns.long_at_tokens == 500
    assert cfg.turns.need("code") == TurnNeed(2) and cfg.turns.need("image") == TurnNeed(0, ("vision",))
    assert cfg.turns.need("tool") == TurnNeed(1, ("tools",))


@pytest.mark.parametrize(("needs", "path", "accepted", "suggestion"), [
    ("    cod: tier >= 2\n", "turns.needs.cod", "code, reasoning, long, image, tool", "code"),
    ("    code: tier > 2\n", "turns.needs.code", "'tier >= N'", None),
    ("    image: capability vison\n", "turns.needs.image", "capability C", "vision"),
    ("    code: 3\n", "turns.needs.code", "or a list of them", None),
])
def test_bad_turn_rules_name_what_is_accepted(tmp_path: Path, needs: str, path: str, accepted: str,
                                              suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        load_catalog(tmp_path, "turns:\n  needs:\n" + needs)
    problems = {p.path: p for p in caught.value.problems}
    assert path in problems, caught.value
    assert accepted in problems[path].accepted and problems[path].suggestion == suggestion


def test_bad_long_at_tokens_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_catalog(tmp_path, "turns:\n  long_at_tokens: 0\n")
    assert [p.path for p in caught.value.problems] == ["turns.long_at_tokens"]
    assert "an integer >= 1" in str(caught.value)
