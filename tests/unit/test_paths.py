"""Mai's state is private to the user: the state directory 0700 and every file Mai creates 0600 whatever the umask
(SQLite's -wal/-shm and rotated logs included), and a state directory others can enter is tightened, saying so."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from backends.history_store import HistoryStore
from bootstrap.logs import PrivateRotatingFileHandler, log_defs
from bootstrap.paths import private_dir, private_file
from bootstrap.system import prepare_state_dir
from config import load_config
from mai.sim.gpu_ledger import GpuLedger
from messages.chat import ChatMessage


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask000", "umask022", "umask277"])
def umask(request):
    """The modes must not depend on the umask, even one that would take the owner's own write bit away."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_a_new_directory_and_its_missing_parents_are_0700(tmp_path, umask):
    path = private_dir(tmp_path / "a" / "b" / "state")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", path)] == [0o700] * 3


def test_an_open_directory_is_tightened_and_reported(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    seen = []
    private_dir(state, lambda path, old, new: seen.append((path, old, new)))
    assert mode(state) == 0o700 and seen == [(state, 0o755, 0o700)]
    private_dir(state, lambda *args: seen.append(args))  # already private: nothing to say
    assert len(seen) == 1


def test_an_existing_folder_outside_the_state_dir_is_left_as_the_user_set_it(tmp_path):
    os.chmod(tmp_path, 0o755)
    private_dir(tmp_path, tighten_existing=False)
    assert mode(tmp_path) == 0o755


def test_a_file_where_the_state_dir_should_be_is_named(tmp_path):
    (tmp_path / "state").write_text("x")
    with pytest.raises(NotADirectoryError, match="state exists and is not a directory"):
        private_dir(tmp_path / "state")


def test_a_new_file_is_0600_and_an_open_one_is_tightened_keeping_its_content(tmp_path, umask):
    assert mode(private_file(tmp_path / "new")) == 0o600
    old = tmp_path / "old"
    old.write_text("kept")
    os.chmod(old, 0o644)
    seen = []
    private_file(old, lambda path, was, now: seen.append((was, now)))
    assert mode(old) == 0o600 and old.read_text() == "kept" and seen == [(0o644, 0o600)]


def test_sqlite_databases_and_their_wal_files_are_0600(tmp_path, umask):
    with HistoryStore(tmp_path / "history" / "chat.sqlite") as store:
        conversation = store.new_conversation("be brief", now=1.0)
        store.append(conversation, ChatMessage("user", "hello"), model=None, now=2.0)
        ledger = GpuLedger(tmp_path / "sim-gpu.sqlite", total_bytes=1000)
        ledger.allocate("clip", 10)
        files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
        assert {"chat.sqlite", "chat.sqlite-wal", "chat.sqlite-shm", "sim-gpu.sqlite"} <= set(files)  # WAL while open
        assert {name: mode(next(tmp_path.rglob(name))) for name in files} == {name: 0o600 for name in files}
    assert mode(tmp_path / "history") == 0o700


def test_the_log_file_stays_0600_across_rotation(tmp_path, umask):
    spec = log_defs("info", tmp_path / "mai.log", console=False)["handlers"]["file"]
    assert spec["()"] is PrivateRotatingFileHandler
    handler = PrivateRotatingFileHandler(spec["filename"], maxBytes=200, backupCount=3)
    try:
        for i in range(20):
            handler.emit(logging.LogRecord("mai.test", logging.INFO, "x", 1, f"line {i} padded to rotate", None, None))
    finally:
        handler.close()
    logs = sorted(tmp_path.glob("mai.log*"))
    assert len(logs) >= 2, logs  # it did rotate
    assert {p.name: mode(p) for p in logs} == {p.name: 0o600 for p in logs}


def test_prepare_state_dir_tightens_an_open_state_dir_and_says_so(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    cfg = load_config(env={}, overrides={"system.state_dir": str(state)})
    prepare_state_dir(cfg)
    assert mode(state) == 0o700 and mode(state / "mai.log") == 0o600
    console = capsys.readouterr().err
    assert "mai: warning: others could enter Mai's state directory" in console and "0755 -> 0700" in console
    [line] = (state / "mai.log").read_text().splitlines()
    event = json.loads(line)
    assert (event["level"], event["event"], event["paths"]) == ("warning", "state_dir.tightened", [f"{state} 0755 -> 0700"])
    prepare_state_dir(cfg)  # nothing left to tighten: silent
    assert capsys.readouterr().err == "" and len((state / "mai.log").read_text().splitlines()) == 1


def test_a_detached_start_warns_on_the_terminal_before_it_exposes_mai(tmp_path, monkeypatch, capsys):
    """`mai start` hands the system to a background process whose warning lands in console.log only: the CLI itself
    must say it on the user's terminal."""
    import yaml

    from bootstrap import system as boot
    from mai import cli

    config = tmp_path / "mai.yaml"
    config.write_text(yaml.safe_dump({"system": {"bind_address": "0.0.0.0", "allow_remote": True,
                                                 "state_dir": str(tmp_path / "state")}}))
    monkeypatch.setattr(boot, "probe_admin", lambda cfg: boot.AdminProbe("mai", cfg.system.admin_port, "0.1.0"))
    assert cli.main(["--config", str(config), "start"]) == 0  # "already running": nothing is started
    err = capsys.readouterr().err
    assert "mai: warning: system.bind_address is 0.0.0.0 and system.allow_remote is true" in err
