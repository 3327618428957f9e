"""Selection by the task and by the conversation (issue 13), as properties of ChatPolicy fed by turn_needs.

Random chains (tiers, windows, footprints, capabilities, backends), random turn rules, random conversations and
random messages (greetings, code, images, tool calls, long texts), a sequence of turns on a virtual clock with the
grantable VRAM and the reachable backends drawn for each. Fresh draws on every run (the suite's profile). What must
hold on every turn, whatever the policy's ranking does:
1. a turn never gets a model without a capability it needs (pinned or not);
2. a simple turn never swaps away from the loaded model while that model fits, is reachable, has what the turn
   needs and holds the conversation (nobody pinned another);
3. whenever some model that can run now (reachable, fits) and has the turn's capabilities holds the conversation
   in its window without summarising, the chosen one does too (nobody pinned another);
and the turn gets a model whenever one can run with the turn's capabilities.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.schema import FrozenMap, TurnNeed, TurnRules
from mai.core.chat_policy import Availability, Candidate, ChatPolicy
from mai.core.context import approx_tokens
from mai.core.turn_needs import WindowSpec, estimate_needs, window_fits, with_windows
from messages.chat import ChatMessage

GiB = 1024**3
COMPRESS_AT = 0.7
MAX_TOKENS = 512
EXTRA_CAPABILITIES = ("vision", "tools")

MESSAGES = st.one_of(
    st.sampled_from(["hi", "hello!", "thanks", "how are you?", "good morning"]),
    st.sampled_from(["```python\nprint('x')\n```\nwhy?", "my python script raises an exception",
                     "explain step by step", "what is in ![a](/tmp/a.png)?", "describe ./shot.jpg",
                     "call the search tool for cats"]),
    st.integers(100, 12_000).map(lambda n: "word " * (n // 5)),  # long messages, 25 to 2,400 tokens
    st.text(max_size=80),
)


@st.composite
def chains(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(2, 5))
    return [Candidate(key=f"m{i}", backend=draw(st.sampled_from(["lmstudio", "ollama"])), tier=draw(st.integers(0, 4)),
                      context_window=draw(st.sampled_from([512, 1024, 2048, 8192, 32768])),
                      footprint_bytes=draw(st.integers(1, 8)) * GiB // 2,
                      capabilities=frozenset({"chat"}) | frozenset(draw(st.lists(st.sampled_from(EXTRA_CAPABILITIES),
                                                                                  max_size=2))))
            for i in range(n)]


@st.composite
def rules(draw: st.DrawFn) -> TurnRules:
    needs = {}
    for kind in ("code", "reasoning", "long", "image", "tool"):
        if draw(st.booleans()):
            caps = tuple(draw(st.lists(st.sampled_from(EXTRA_CAPABILITIES), max_size=1)))
            needs[kind] = TurnNeed(draw(st.integers(0, 4)), caps)
    return TurnRules(draw(st.sampled_from([50, 500, 2000])), FrozenMap(needs))


def conversation(lengths: list[int]) -> list[ChatMessage]:
    messages = [ChatMessage("system", "You are Mai.")]
    for i, n in enumerate(lengths):
        messages.append(ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i} " + "y" * n))
    return messages


def specs(chain: list[Candidate]) -> list[WindowSpec]:
    return [WindowSpec(c.key, c.context_window, approx_tokens, min(MAX_TOKENS, c.context_window // 4)) for c in chain]


BOTH = frozenset({"lmstudio", "ollama"})
TURN = st.tuples(MESSAGES, st.one_of(st.just(10 * GiB), st.integers(0, 10 * GiB)),
                 st.one_of(st.just(BOTH), st.frozensets(st.sampled_from(sorted(BOTH)), min_size=1)), st.floats(0, 120))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains(), turn_rules=rules(), history=st.lists(st.one_of(st.integers(0, 300), st.integers(0, 4000)), max_size=12),
       turns=st.lists(TURN, min_size=1, max_size=6), hysteresis_s=st.sampled_from([0.0, 30.0]),
       start_on=st.one_of(st.integers(0, 4), st.none()), pin=st.one_of(st.none(), st.none(), st.integers(0, 4)))
def test_what_each_turn_gets(chain, turn_rules, history, turns, hysteresis_s, start_on, pin) -> None:
    policy = ChatPolicy(chain, cooldown_s=60, hysteresis_s=hysteresis_s, max_retries=1, retry_backoff_s=0.5,
                        min_tokens_per_s=0.0)
    by_key = {c.key: c for c in chain}
    current = chain[start_on].key if start_on is not None and start_on < len(chain) else None
    pinned = chain[pin].key if pin is not None and pin < len(chain) else None
    messages = conversation(history)
    now = 0.0
    for text, grantable, reachable, wait_s in turns:
        now += wait_s
        messages = messages + [ChatMessage("user", text or "?")]
        needs = with_windows(estimate_needs(text, turn_rules, approx_tokens),
                             window_fits(messages, specs(chain), compress_at_fraction=COMPRESS_AT))
        availability = Availability(frozenset(reachable))

        def can_run(key: str) -> bool:  # reachable, fits the grantable VRAM, has the turn's capabilities
            c = by_key[key]
            return c.backend in reachable and c.footprint_bytes <= grantable and needs.capabilities <= c.capabilities

        choice = policy.choose(grantable, availability, now, current=current, pinned=pinned, needs=needs)
        why = f"{choice} for {needs.describe()} (current {current}, pinned {pinned})"

        # 1. never a model without a capability the turn needs
        if choice.key is not None:
            assert needs.capabilities <= by_key[choice.key].capabilities, why
        # ... and a model whenever one can run with them
        assert (choice.key is None) == (not any(can_run(k) for k in by_key)), why
        if pinned is None:
            # 2. a simple turn stays on an adequate loaded model
            if needs.simple and current is not None and can_run(current) and needs.windows[current].holds:
                assert choice.key == current, why
            # 3. a window that holds the conversation whenever a model that can run has one
            if any(can_run(k) and needs.windows[k].holds for k in by_key):
                assert needs.windows[choice.key].holds, why
            elif choice.key is not None:  # none holds it: the one that keeps most of it
                most = max(needs.windows[k].kept_tokens for k in by_key if can_run(k))
                assert needs.windows[choice.key].kept_tokens == most, why
        if choice.key is not None:
            current = choice.key
            messages = messages + [ChatMessage("assistant", "ok " * (len(text) % 50))]
