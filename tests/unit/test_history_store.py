"""The persisted conversation: turns are durable once written, survive a SIGKILL mid-reply, and a crashed reply is
marked 'interrupted' and never fed back to a model."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from backends.history_store import HistoryStore, StoredMessage
from messages.chat import ChatMessage
from messages.errors import InvalidRequest

SYSTEM = "You are Mai."


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "conversation.db"


@pytest.fixture
def store(db: Path):
    with HistoryStore(db) as opened:
        yield opened


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


def test_a_new_conversation_starts_with_its_system_prompt_and_becomes_current(store: HistoryStore) -> None:
    assert store.current_conversation() is None
    first = store.new_conversation(SYSTEM, now=1.0)
    assert store.current_conversation() == first
    assert store.messages_for_model(first) == [ChatMessage("system", SYSTEM)]
    second = store.new_conversation("", now=2.0)  # an empty prompt adds no message
    assert store.current_conversation() == second
    assert store.history(second) == []


def test_a_turn_is_stored_in_order_with_its_model_and_status(store: HistoryStore) -> None:
    conv = store.new_conversation(SYSTEM, now=0.0)
    store.append(conv, user("Hello"), model=None, now=1.0)
    reply = store.begin_reply(conv, "qwen2.5-7b-instruct", now=1.5)
    assert store.history(conv)[-1] == StoredMessage(reply, "assistant", "", "qwen2.5-7b-instruct", "pending", 1.5)

    store.update_reply(reply, "Hi", status="pending")  # a checkpoint while streaming
    assert store.history(conv)[-1].content == "Hi"
    assert store.messages_for_model(conv) == [ChatMessage("system", SYSTEM), user("Hello")]  # not finished yet

    store.update_reply(reply, "Hi there!", status="complete", model="llama3.2:3b")  # finished on another model
    assert store.messages_for_model(conv) == [ChatMessage("system", SYSTEM), user("Hello"), assistant("Hi there!")]
    last = store.history(conv)[-1]
    assert (last.content, last.status, last.model) == ("Hi there!", "complete", "llama3.2:3b")


def test_failed_and_interrupted_replies_are_kept_but_never_fed_to_a_model(store: HistoryStore) -> None:
    conv = store.new_conversation(SYSTEM, now=0.0)
    store.append(conv, user("One"), model=None, now=1.0)
    failed = store.begin_reply(conv, "m1", now=2.0)
    store.update_reply(failed, "Half an ans", status="failed")
    store.append(conv, assistant("An answer."), model="m2", now=3.0)
    store.append(conv, user("Two"), model=None, now=4.0)
    store.append(conv, assistant("Cut off mid"), model="m2", now=5.0, status="interrupted")

    assert [m.status for m in store.history(conv)] == ["complete", "complete", "failed", "complete", "complete",
                                                       "interrupted"]
    assert [m.content for m in store.history(conv, include_incomplete=False)] == [SYSTEM, "One", "An answer.", "Two"]
    assert store.messages_for_model(conv)[-1] == user("Two")


def test_turns_survive_closing_and_reopening(db: Path) -> None:
    with HistoryStore(db) as store:
        conv = store.new_conversation(SYSTEM, now=0.0)
        store.append(conv, user("Remember me"), model=None, now=1.0)
        store.append(conv, assistant("I will."), model="m", now=2.0)
    with HistoryStore(db) as reopened:
        assert reopened.current_conversation() == conv
        assert reopened.messages_for_model(conv) == [
            ChatMessage("system", SYSTEM), user("Remember me"), assistant("I will.")
        ]


def test_the_database_is_private_and_in_wal_mode(db: Path, store: HistoryStore) -> None:
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_pickled_store_reopens_the_same_file(db: Path, store: HistoryStore) -> None:
    conv = store.new_conversation(SYSTEM, now=0.0)
    with pickle.loads(pickle.dumps(store)) as copy:  # as an actor or a spawned process would receive it
        copy.append(conv, user("from elsewhere"), model=None, now=1.0)
    assert store.messages_for_model(conv)[-1] == user("from elsewhere")


def test_bad_requests_are_refused(store: HistoryStore) -> None:
    conv = store.new_conversation(SYSTEM, now=0.0)
    with pytest.raises(InvalidRequest):
        store.append(conv, user("x"), model=None, now=1.0, status="done")
    with pytest.raises(InvalidRequest):
        store.append("no-such-conversation", user("x"), model=None, now=1.0)
    with pytest.raises(InvalidRequest):
        store.update_reply(12345, "text", status="complete")
    with pytest.raises(InvalidRequest):
        store.history("no-such-conversation")
    assert [m.content for m in store.history(conv)] == [SYSTEM]  # a refused write leaves nothing behind


# -- crashes and other processes -------------------------------------------------------------------------------


def _stream_until_killed(store: HistoryStore, conv: str, checkpointed) -> None:
    """Child: one complete turn, then a reply that is streaming when the parent kills us."""
    store.append(conv, user("Tell me a story"), model=None, now=10.0)
    store.append(conv, assistant("Once upon a time, the end."), model="m1", now=11.0)
    store.append(conv, user("Another one"), model=None, now=12.0)
    reply = store.begin_reply(conv, "m1", now=13.0)
    store.update_reply(reply, "There was a", status="pending")
    checkpointed.set()
    signal.pause()  # streaming forever, until SIGKILL


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_reply_streaming_when_the_process_is_killed_is_marked_interrupted(db: Path) -> None:
    store = HistoryStore(db)
    conv = store.new_conversation(SYSTEM, now=0.0)
    ctx = multiprocessing.get_context("fork")  # the child inherits `store` and must open its own connection
    checkpointed = ctx.Event()
    child = ctx.Process(target=_stream_until_killed, args=(store, conv, checkpointed))
    child.start()
    try:
        assert checkpointed.wait(timeout=30)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
    store.close()

    with HistoryStore(db) as restarted:
        assert restarted.mark_interrupted(now=20.0) == 1
        assert restarted.mark_interrupted(now=21.0) == 0
        rows = restarted.history(conv)
        assert [(m.role, m.content, m.status) for m in rows] == [
            ("system", SYSTEM, "complete"),
            ("user", "Tell me a story", "complete"),
            ("assistant", "Once upon a time, the end.", "complete"),
            ("user", "Another one", "complete"),
            ("assistant", "There was a", "interrupted"),  # the partial text is kept for the record
        ]
        assert restarted.messages_for_model(conv)[-1] == user("Another one")  # but never fed back


def _write_turns(path: str, conv: str, count: int) -> None:
    with HistoryStore(path) as store:
        for n in range(count):
            store.append(conv, user(f"question {n}"), model=None, now=float(n))
            reply = store.begin_reply(conv, "m", now=n + 0.5)
            store.update_reply(reply, f"answer {n}", status="complete")


def test_a_reader_in_this_process_sees_consistent_history_while_another_process_writes(db: Path) -> None:
    with HistoryStore(db) as store:
        conv = store.new_conversation(SYSTEM, now=0.0)
        writer = multiprocessing.get_context("spawn").Process(target=_write_turns, args=(str(db), conv, 40))
        writer.start()
        try:
            while writer.is_alive():
                fed = store.messages_for_model(conv)  # never a pending reply, always system first
                assert fed[0] == ChatMessage("system", SYSTEM)
                assert all(m.content for m in fed)
            writer.join(timeout=60)
        finally:
            if writer.is_alive():
                writer.kill()
        assert writer.exitcode == 0
        fed = store.messages_for_model(conv)
        assert len(fed) == 1 + 2 * 40
        assert fed[-2:] == [user("question 39"), assistant("answer 39")]
