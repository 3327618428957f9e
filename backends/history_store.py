"""The canonical conversation, persisted: the only module that touches the history database.

Every turn is written before anything depends on it: the user's message when it arrives, a 'pending' assistant
row before streaming starts, its partial text at checkpoints, its final status at the end. So after any crash the
database holds every completed turn, and the reply that was streaming is marked 'interrupted' on the next start
(`mark_interrupted`) instead of being lost or fed back to a model as if it were complete.

Durability and sharing: WAL journal, synchronous=FULL (a turn is on disk once `append` returns), every write in
`BEGIN IMMEDIATE`, a busy timeout so a reader in another process (the CLI, `mai.Mai`) waits instead of failing.
A connection belongs to the process that opened it: after a fork the child opens its own. The database and its
directory are private to the user (0600 / 0700 when this module creates them): conversations are personal.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bootstrap.paths import private_dir, private_file
from messages.chat import ChatMessage
from messages.errors import InvalidRequest

STATUSES = ("complete", "pending", "interrupted", "failed")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS conversations (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
    " created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " conversation_id TEXT NOT NULL REFERENCES conversations(id), role TEXT NOT NULL, content TEXT NOT NULL,"
    " model TEXT, status TEXT NOT NULL CHECK (status IN ('complete', 'pending', 'interrupted', 'failed')),"
    " created_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id)",
    "CREATE INDEX IF NOT EXISTS messages_by_status ON messages (status)",
)


@dataclass(frozen=True)
class StoredMessage:
    """One row of the history. `status`: complete | pending (streaming) | interrupted (crashed) | failed."""

    id: int
    role: str
    content: str
    model: str | None
    status: str
    created_at: float

    def as_chat(self) -> ChatMessage:
        return ChatMessage(self.role, self.content)


class HistoryStore:
    """The conversation database at `path`. Safe to use from several processes and threads."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        # Before SQLite creates them with the umask (it gives the -wal and -shm files the database's mode).
        private_dir(self.path.parent, tighten_existing=False)
        private_file(self.path)
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- writes ---------------------------------------------------------------------------------------------

    def new_conversation(self, system_prompt: str, now: float) -> str:
        """A new conversation, which becomes the current one; its system prompt (if any) is its first message."""
        conversation_id = uuid.uuid4().hex
        with self._write() as conn:
            conn.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?)", (conversation_id, now))
            if system_prompt:
                _insert(conn, conversation_id, ChatMessage("system", system_prompt), None, now, "complete")
        return conversation_id

    def append(
        self, conversation_id: str, message: ChatMessage, *, model: str | None, now: float, status: str = "complete"
    ) -> int:
        """Store one message; returns its id. Durable when this returns."""
        _check_status(status)
        if not isinstance(message, ChatMessage):
            raise InvalidRequest(f"append: message must be a ChatMessage, got {type(message).__name__}")
        with self._write() as conn:
            _require_conversation(conn, conversation_id)
            return _insert(conn, conversation_id, message, model, now, status)

    def begin_reply(self, conversation_id: str, model: str, now: float) -> int:
        """A 'pending' assistant row, written BEFORE streaming starts, so a crash mid-reply leaves a trace."""
        return self.append(conversation_id, ChatMessage("assistant", ""), model=model, now=now, status="pending")

    def update_reply(self, message_id: int, content: str, *, status: str, model: str | None = None) -> None:
        """Checkpoint a reply's partial text (status 'pending') or record its end; `model` if it changed."""
        _check_status(status)
        with self._write() as conn:
            row = conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise InvalidRequest(f"update_reply: no message with id {message_id}")
            ChatMessage(row[0], content)  # validates the content
            conn.execute(
                "UPDATE messages SET content = ?, status = ?, model = COALESCE(?, model) WHERE id = ?",
                (content, status, model, message_id),
            )

    def mark_interrupted(self, now: float) -> int:
        """On start-up after a crash: every 'pending' row becomes 'interrupted'. Returns how many did.
        (`now` is part of the call so a caller's clock stays the only clock; rows keep their creation time.)"""
        with self._write() as conn:
            return conn.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'pending'").rowcount

    # -- reads ----------------------------------------------------------------------------------------------

    def current_conversation(self) -> str | None:
        """The conversation started last, or None if there is none yet."""
        with self._read() as conn:
            row = conn.execute("SELECT id FROM conversations ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def history(self, conversation_id: str, *, include_incomplete: bool = True) -> list[StoredMessage]:
        """Every message of the conversation in order; only the complete ones with `include_incomplete=False`."""
        query = "SELECT id, role, content, model, status, created_at FROM messages WHERE conversation_id = ?"
        if not include_incomplete:
            query += " AND status = 'complete'"
        with self._read() as conn:
            _require_conversation(conn, conversation_id)
            rows = conn.execute(query + " ORDER BY id", (conversation_id,)).fetchall()
        return [StoredMessage(*row) for row in rows]

    def messages_for_model(self, conversation_id: str) -> list[ChatMessage]:
        """The complete messages in order: what a model is fed before trimming. An interrupted, failed or
        still-pending reply is not fed back."""
        return [m.as_chat() for m in self.history(conversation_id, include_incomplete=False)]

    def close(self) -> None:
        with self._guard():
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn, self._pid = None, None

    def __reduce__(self):  # another process gets its own store on the same file, never this one's connection
        return (_reopen, (str(self.path), self._busy_timeout_s))

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (a connection inherited across fork must not be used: open a new one)."""
        if self._conn is None or self._pid != os.getpid():
            # isolation_level=None: transactions are explicit, BEGIN IMMEDIATE takes the write lock up front.
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _guard(self) -> threading.Lock:
        # A lock copied by fork may be held by a thread that does not exist in the child: start afresh there.
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._lock

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._guard():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._guard():
            conn = self._connection()
            conn.execute("BEGIN")  # one snapshot for the whole read
            try:
                yield conn
            finally:
                conn.execute("COMMIT")


def _reopen(path: str, busy_timeout_s: float) -> HistoryStore:
    return HistoryStore(path, busy_timeout_s=busy_timeout_s)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}, got {status!r}")


def _require_conversation(conn: sqlite3.Connection, conversation_id: str) -> None:
    if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
        raise InvalidRequest(f"unknown conversation {conversation_id!r}")


def _insert(
    conn: sqlite3.Connection, conversation_id: str, message: ChatMessage, model: str | None, now: float, status: str
) -> int:
    cursor = conn.execute(
        "INSERT INTO messages (conversation_id, role, content, model, status, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (conversation_id, message.role, message.content, model, status, now),
    )
    return int(cursor.lastrowid)
