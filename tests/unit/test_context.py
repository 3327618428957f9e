"""What a chat model is fed: the canonical conversation trimmed to its window.

Most tests count one token per word and no per-message overhead, so the arithmetic can be done by eye.
"""

from __future__ import annotations

import pytest

from mai.core.context import (
    SUMMARY_PREFIX,
    TRUNCATION_MARKER,
    approx_tokens,
    fit_to_window,
    merge_consecutive,
)
from messages.chat import ChatMessage
from messages.errors import InvalidRequest


def words(text: str) -> int:
    return len(text.split())


def system(text: str) -> ChatMessage:
    return ChatMessage("system", text)


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


def fit(messages, window, *, reserve=0, fraction=0.7, count=words, overhead=0):
    return fit_to_window(messages, window, count, reserve_for_reply=reserve, compress_at_fraction=fraction,
                         message_overhead_tokens=overhead)


def turn(n: int) -> str:
    return f"Turn {n} says something. " + " ".join(["word"] * 26)  # 30 words, first sentence "Turn n says something."


def long_chat(turns: int) -> list[ChatMessage]:
    """system (3 words), the user's instructions (4 words), `turns` 30-word turns (an odd number, assistant first
    and last), then the latest question (3 words)."""
    assert turns % 2 == 1
    chat = [system("You are Mai."), user("Always answer in French.")]
    for n in range(turns):
        chat.append(assistant(turn(n)) if n % 2 == 0 else user(turn(n)))
    return chat + [user("What about tomorrow?")]


# -- approx_tokens and merging ---------------------------------------------------------------------------------


def test_approx_tokens_is_a_quarter_of_the_characters_rounded_up() -> None:
    assert [approx_tokens(t) for t in ["", "a", "abcd", "abcde", "x" * 400]] == [0, 1, 1, 2, 100]


def test_consecutive_messages_of_one_role_are_merged() -> None:
    merged = merge_consecutive([system("A"), system("B"), user("hi"), user(""), user("there"),
                                assistant("x"), assistant("y")])
    assert merged == (system("A\n\nB"), user("hi\n\nthere"), assistant("x\n\ny"))


# -- no trimming needed ----------------------------------------------------------------------------------------


def test_a_short_conversation_is_fed_whole() -> None:
    chat = [system("You are Mai."), user("Hello there."), assistant("Hi! How can I help?"), user("Tell a joke.")]
    plan = fit(chat, window=100)
    assert plan.messages == tuple(chat)
    assert (plan.dropped, plan.compressed, plan.truncated, plan.tokens) == (0, False, False, 3 + 2 + 5 + 3)
    assert plan.kept == (0, 1, 2, 3)


def test_it_is_fed_whole_up_to_the_compression_threshold() -> None:
    chat = long_chat(5)  # 3 + 4 + 150 + 3 = 160 words
    assert fit(chat, window=229, fraction=0.7).dropped == 0  # 160 <= 70 % of 229 (160.3)
    assert fit(chat, window=228, fraction=0.7).dropped > 0  # 160 > 159.6


def test_an_interrupted_reply_leaves_two_user_messages_which_are_merged() -> None:
    # The store does not feed back the interrupted reply, so the user's two messages are adjacent.
    chat = [system("You are Mai."), user("Write a poem."), user("Actually, a haiku.")]
    assert fit(chat, window=100).messages == (system("You are Mai."), user("Write a poem.\n\nActually, a haiku."))


# -- compression -----------------------------------------------------------------------------------------------


def test_compression_keeps_system_first_instruction_recent_turns_and_the_latest_question() -> None:
    chat = long_chat(11)  # 3 + 4 + 330 + 3 = 340 words
    plan = fit(chat, window=300, reserve=30, fraction=0.7)  # budget 270, compress to 210

    assert plan.compressed and not plan.truncated
    assert plan.tokens <= 210
    fed = plan.messages
    assert fed[0] == system("You are Mai.")
    assert fed[1] == user("Always answer in French.")  # the user's instructions
    assert fed[2].role == "system" and fed[2].content.startswith(SUMMARY_PREFIX)
    assert fed[-1] == user("What about tomorrow?")
    # The most recent turns follow the summary, unchanged and in order.
    assert fed[3:-1] == tuple(chat[i] for i in plan.kept[2:-1])
    assert plan.kept[2:] == tuple(range(plan.kept[2], len(chat)))
    assert plan.dropped == len(chat) - len(plan.kept)
    assert fed[2] == plan.summary


def test_the_summary_lists_the_first_sentence_of_each_left_out_message() -> None:
    chat = long_chat(5) + [assistant("Sure."), user("And then?")]  # 163 words
    plan = fit(chat, window=200, fraction=0.7)  # compress to 140
    assert plan.summary == system(
        "Earlier in this conversation (2 messages, summarised):\n"
        "- assistant: Turn 0 says something.\n"
        "- user: Turn 1 says something."
    )
    # It stands where the first left-out message stood.
    assert plan.messages == (chat[0], chat[1], plan.summary, *chat[4:])
    assert (plan.dropped, plan.kept, plan.tokens) == (2, (0, 1, 4, 5, 6, 7, 8, 9), 122)


def test_a_long_first_sentence_is_cut_in_the_summary() -> None:
    rambling = "so " * 800  # no full stop: the whole text is its first sentence
    chat = [system("S."), user("Rules."), assistant(rambling), user("Q?")]
    plan = fit(chat, window=1000, fraction=0.5, count=approx_tokens)
    assert plan.kept == (0, 1, 3)
    line = plan.summary.content.splitlines()[1]
    assert line.startswith("- assistant: so so") and line.endswith("…")
    assert len(line) == len("- assistant: ") + 120


def test_when_many_messages_are_left_out_the_summary_shows_the_newest() -> None:
    chat = long_chat(201)
    plan = fit(chat, window=1000, fraction=0.7)  # the summary may take a quarter of 700
    header, *lines = plan.summary.content.splitlines()
    assert header.startswith(f"{SUMMARY_PREFIX} (")
    assert "are only counted." in header
    assert lines and words(plan.summary.content) <= 700 // 4
    # the newest left-out message is the last line of the summary
    newest_dropped = max(set(range(len(chat))) - set(plan.kept))
    assert lines[-1] == f"- {chat[newest_dropped].role}: Turn {newest_dropped - 2} says something."


def test_remember_messages_are_instructions_too() -> None:
    chat = long_chat(11)
    chat.insert(5, user("/remember my name is Ada."))
    chat.insert(6, assistant("Noted."))
    plan = fit(chat, window=300, reserve=30)
    fed_contents = [m.content for m in plan.messages]
    assert any(c.startswith("/remember my name is Ada.") for c in fed_contents)
    assert 5 in plan.kept and 6 not in plan.kept


def test_the_result_never_exceeds_the_budget_even_with_a_counter_that_does_not_add_up() -> None:
    def bumpy(text: str) -> int:  # merging and joining change the count: not additive
        return len(text) // 3 + text.count("\n") * 5 + 1

    for window in range(150, 2000, 37):
        plan = fit(long_chat(121), window=window, reserve=window // 5, count=bumpy, overhead=4)
        assert plan.tokens <= window - window // 5
        assert plan.tokens == sum(bumpy(m.content) + 4 for m in plan.messages)
        assert plan.messages[0].content.startswith("You are Mai.")
        # (in the smallest windows, no summary fits, so the instructions and the question end up merged)
        assert plan.messages[-1].role == "user" and plan.messages[-1].content.endswith("What about tomorrow?")


def test_the_per_message_overhead_counts() -> None:
    chat = [system("You are Mai."), user("Hi.")]
    assert fit(chat, window=100, overhead=4).tokens == 3 + 1 + 8


# -- truncation ------------------------------------------------------------------------------------------------


def test_an_oversized_latest_message_is_cut_in_the_middle() -> None:
    huge = "start " + "filler " * 500 + "end"
    chat = [system("You are Mai."), user("Earlier."), assistant("Yes."), user(huge)]
    plan = fit(chat, window=100, reserve=20)
    assert plan.truncated and not plan.compressed
    assert plan.tokens <= 80
    assert plan.kept == (0, 3) and plan.dropped == 2
    sys_msg, cut = plan.messages
    assert sys_msg == system("You are Mai.")
    assert cut.role == "user" and TRUNCATION_MARKER in cut.content
    assert cut.content.startswith("start filler") and cut.content.endswith("filler end")


def test_an_oversized_system_prompt_is_cut_too_when_nothing_else_helps() -> None:
    chat = [system("rule " * 300), user("question " * 300)]
    plan = fit(chat, window=50, count=approx_tokens)
    assert plan.truncated and plan.tokens <= 50
    assert all(TRUNCATION_MARKER in m.content for m in plan.messages)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        fit([user("x")], window=0)
    with pytest.raises(InvalidRequest):
        fit([user("x")], window=10, reserve=-1)
    with pytest.raises(InvalidRequest):
        fit([user("x")], window=10, fraction=0)


def test_an_empty_conversation_is_an_empty_plan() -> None:
    plan = fit([], window=10)
    assert (plan.messages, plan.tokens, plan.dropped) == ((), 0, 0)
