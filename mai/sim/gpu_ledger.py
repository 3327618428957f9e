"""A simulated GPU shared by several processes through one SQLite file.

The Ollama and LM Studio doubles, Mai's simulated CLIP and VRAM probe, and test probes all allocate from the same
ledger, so the simulated VRAM behaves like one device: allocations beyond its size fail, and every change is
recorded in one time-ordered event log. System tests then check invariants over that log with the pure helpers
at the bottom (`peak_used`, `over_commits`, `overlapping_operations`).

Concurrency: WAL mode, every write in `BEGIN IMMEDIATE` (one writer at a time, readers never blocked), and a
busy timeout so contending processes wait instead of failing. A connection is opened per call, which keeps the
object safe to share between threads and to inherit across `fork`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from bootstrap.paths import private_file
from messages.errors import InvalidRequest, OutOfMemory
from messages.resources import VramSnapshot

EVENT_KINDS = ("alloc", "free", "oom", "begin", "end")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # release_at is NULL while held, else the time a delayed free takes effect.
    "CREATE TABLE IF NOT EXISTS holdings (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL,"
    " nbytes INTEGER NOT NULL, release_at REAL)",
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL,"
    " owner TEXT NOT NULL, op TEXT NOT NULL, nbytes INTEGER NOT NULL, used_after INTEGER NOT NULL)",
)


@dataclass(frozen=True)
class LedgerEvent:
    """One change or marker. `used_after` is the device's used bytes right after it (delayed frees still count
    until they take effect), so invariants can be checked from the log alone.

    `op` qualifies the kind: for begin/end the operation ("load", "unload", "move_gpu", "move_cpu"); for a free,
    "released" when bytes actually came back or "scheduled" when a delayed free was requested (no change yet).
    """

    seq: int
    t: float
    kind: str
    owner: str
    op: str
    nbytes: int
    used_after: int


class GpuLedger:
    """One simulated GPU of `total_bytes`, persisted at `path` and shared by every process that opens it.

    Opening an existing ledger keeps its size; `reset=True` (or `reset()`) clears it and may resize it.
    """

    def __init__(
        self,
        path: str | Path,
        total_bytes: int | None = None,
        device_name: str = "Simulated GPU",
        *,
        reset: bool = False,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._readers: dict[tuple[int, int], sqlite3.Connection] = {}
        if total_bytes is not None and (not isinstance(total_bytes, int) or total_bytes <= 0):
            raise InvalidRequest(f"GpuLedger total_bytes must be a positive int, got {total_bytes!r}")
        private_file(self.path)  # 0600 before SQLite creates it (and its -wal/-shm) with the umask
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            with _immediate(conn):  # executescript() would commit mid-transaction, so one statement at a time
                for statement in _SCHEMA:
                    conn.execute(statement)
                existing = _meta(conn, "total_bytes")
                if existing is None and total_bytes is None:
                    raise InvalidRequest(f"GpuLedger {self.path} does not exist yet: total_bytes is required")
                if existing is None or reset:
                    _clear(conn)
                    size = str(total_bytes or existing)
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('total_bytes', ?)", (size,))
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('device_name', ?)", (device_name,))

    # -- writes ---------------------------------------------------------------------------------------------

    def allocate(self, owner: str, nbytes: int, *, allow_partial: bool = False) -> int:
        """Add up to `nbytes` to `owner`'s holding and return how many were allocated.

        If they do not fit: with `allow_partial`, whatever is free is allocated (possibly 0); otherwise an
        'oom' event is recorded and `OutOfMemory` raised (details: needed_bytes, free_bytes, owner).
        """
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidRequest(f"allocate: nbytes must be an int >= 0, got {nbytes!r}")
        with self._write() as (conn, now):
            total, used = self._total(conn), _used(conn, now)
            free = max(total - used, 0)
            if nbytes <= free or allow_partial:
                granted = min(nbytes, free)
                if granted:
                    conn.execute("INSERT INTO holdings (owner, nbytes) VALUES (?, ?)", (owner, granted))
                _record(conn, now, "alloc", owner, "allocate", granted, used + granted)
                return granted
            _record(conn, now, "oom", owner, "allocate", nbytes, used)
        # Raised after the transaction committed, so the 'oom' event stays in the log.
        raise OutOfMemory(
            f"simulated GPU: {owner} needs {nbytes} bytes but only {free} of {total} are free",
            details={"needed_bytes": nbytes, "free_bytes": free, "owner": owner},
        )

    def free(self, owner: str, *, delay_s: float = 0.0) -> int:
        """Release all of `owner`'s bytes and return how many. With `delay_s` > 0 they come back only at
        now + delay_s, like VRAM that lags behind a process that ended; until then they still count as used."""
        with self._write() as (conn, now):
            (held,) = conn.execute(
                "SELECT COALESCE(SUM(nbytes), 0) FROM holdings WHERE owner = ? AND release_at IS NULL", (owner,)
            ).fetchone()
            if not held:
                return 0
            if delay_s > 0:
                conn.execute(
                    "UPDATE holdings SET release_at = ? WHERE owner = ? AND release_at IS NULL", (now + delay_s, owner)
                )
                _record(conn, now, "free", owner, "scheduled", held, _used(conn, now))
            else:
                conn.execute("DELETE FROM holdings WHERE owner = ? AND release_at IS NULL", (owner,))
                _record(conn, now, "free", owner, "released", held, _used(conn, now))
            return held

    def begin(self, owner: str, op: str) -> None:
        """Mark the start of a VRAM-changing operation ("load", "unload", "move_gpu", "move_cpu")."""
        self._marker("begin", owner, op)

    def end(self, owner: str, op: str) -> None:
        self._marker("end", owner, op)

    def reset(self, total_bytes: int | None = None) -> None:
        """Forget every holding and event; optionally resize the device."""
        with self._write() as (conn, _now):
            _clear(conn)
            if total_bytes is not None:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'total_bytes'", (str(total_bytes),))

    # -- reads ----------------------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with closing(self._connect()) as conn:
            return self._total(conn)

    def usage(self) -> dict[str, int]:
        """owner -> bytes currently held (pending delayed frees still count until due)."""
        rows = self._settle_if_due().execute(
            "SELECT owner, SUM(nbytes) FROM holdings GROUP BY owner HAVING SUM(nbytes) > 0 ORDER BY owner"
        ).fetchall()
        return {owner: int(nbytes) for owner, nbytes in rows}

    def snapshot(self) -> VramSnapshot:
        conn = self._settle_if_due()
        now = time.time()
        total, used = self._total(conn), _used(conn, now)
        name = _meta(conn, "device_name") or "Simulated GPU"
        return VramSnapshot(
            total_bytes=total,
            used_bytes=used,
            free_bytes=max(total - used, 0),
            source="simulated",
            device_name=name,
            taken_at=now,
            gpu_present=True,
        )

    def events(self) -> list[LedgerEvent]:
        """Every event so far, in the order they happened."""
        rows = self._settle_if_due().execute(
            "SELECT seq, t, kind, owner, op, nbytes, used_after FROM events ORDER BY seq"
        ).fetchall()
        return [LedgerEvent(*row) for row in rows]

    # -- internals ------------------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This process's and thread's reader connection, kept: the sampler reads on every wait and every step, NVML
        answers in microseconds, and a new connection parses the schema again (most of a read's cost)."""
        key = (os.getpid(), threading.get_ident())
        if self._readers.get(key) is None:
            self._readers[key] = self._connect()
        return self._readers[key]

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so the write lock is taken up front.
        return sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)

    @contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, float]]:
        with closing(self._connect()) as conn, _immediate(conn):
            now = time.time()  # read under the write lock, so event times follow sequence order
            _settle(conn, now)
            yield conn, now

    def _marker(self, kind: str, owner: str, op: str) -> None:
        with self._write() as (conn, now):
            _record(conn, now, kind, owner, op, 0, _used(conn, now))

    def _settle_if_due(self) -> sqlite3.Connection:
        """Turn due delayed frees into 'free' events (a cheap read first, so plain readers rarely write); returns the
        reader connection, for the read that follows."""
        conn = self._reader()
        if conn.execute("SELECT 1 FROM holdings WHERE release_at <= ? LIMIT 1", (time.time(),)).fetchone():
            with _immediate(conn):
                _settle(conn, time.time())  # read under the write lock, so event times follow sequence order
        return conn

    def _total(self, conn: sqlite3.Connection) -> int:
        return int(_meta(conn, "total_bytes") or 0)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _used(conn: sqlite3.Connection, now: float) -> int:
    (used,) = conn.execute(
        "SELECT COALESCE(SUM(nbytes), 0) FROM holdings WHERE release_at IS NULL OR release_at > ?", (now,)
    ).fetchone()
    return int(used)


def _settle(conn: sqlite3.Connection, now: float) -> None:
    due = conn.execute(
        "SELECT owner, SUM(nbytes) FROM holdings WHERE release_at <= ? GROUP BY owner ORDER BY MIN(release_at)", (now,)
    ).fetchall()
    if not due:
        return
    conn.execute("DELETE FROM holdings WHERE release_at <= ?", (now,))
    used = _used(conn, now)
    for owner, nbytes in due:
        _record(conn, now, "free", owner, "released", int(nbytes), used)


def _clear(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM holdings")
    conn.execute("DELETE FROM events")


def _record(conn: sqlite3.Connection, now: float, kind: str, owner: str, op: str, nbytes: int, used: int) -> None:
    conn.execute(
        "INSERT INTO events (t, kind, owner, op, nbytes, used_after) VALUES (?, ?, ?, ?, ?, ?)",
        (now, kind, owner, op, nbytes, used),
    )


# -- invariant helpers over an event list (pure) ----------------------------------------------------------------


def peak_used(events: Iterable[LedgerEvent]) -> int:
    """The most bytes ever in use."""
    return max((e.used_after for e in events), default=0)


def over_commits(events: Iterable[LedgerEvent], total: int) -> list[LedgerEvent]:
    """Events after which more than `total` bytes were in use."""
    return [e for e in events if e.used_after > total]


def overlapping_operations(events: Iterable[LedgerEvent]) -> list[tuple[LedgerEvent, LedgerEvent]]:
    """Pairs of begin events, earlier first, whose operations belong to different owners and overlap in time.

    An operation runs from its begin to the next end with the same owner and op; one never ended runs forever.
    Order is by sequence number, which is the order the ledger serialised them in.
    """
    intervals: list[tuple[LedgerEvent, int]] = []  # (begin event, seq of its end)
    open_ops: dict[tuple[str, str], list[LedgerEvent]] = {}
    for e in sorted(events, key=lambda e: e.seq):
        if e.kind == "begin":
            open_ops.setdefault((e.owner, e.op), []).append(e)
        elif e.kind == "end" and open_ops.get((e.owner, e.op)):
            intervals.append((open_ops[(e.owner, e.op)].pop(0), e.seq))
    intervals += [(b, 2**63) for pending in open_ops.values() for b in pending]
    intervals.sort(key=lambda iv: iv[0].seq)
    overlaps = []
    for i, (a, a_end) in enumerate(intervals):
        for b, _b_end in intervals[i + 1 :]:
            if b.seq > a_end:
                break
            if b.owner != a.owner:
                overlaps.append((a, b))
    return overlaps
