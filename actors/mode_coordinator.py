"""ModeCoordinator: owns the mode, the plan in progress and the GPU gate. Never blocks: every message goes to the
pure core (`mai.core.coordinator`), and this shell only executes the effects the core returns — send a step,
reply, publish to subscribers, set a timer, log, persist a learned footprint."""

from __future__ import annotations

import datetime
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from bootstrap import safe_pickle
from bootstrap.paths import private_file, subscribers_file
from mai.core.coordinator import (
    Coordinator,
    CoordinatorSettings,
    Log,
    PersistFootprint,
    Publish,
    ReadVram,
    ReobserveVlm,
    Reply,
    SendStep,
    Tell,
    Tick,
    WakeAt,
)
from mai.core.footprints import FOOTPRINTS_FILE
from mai.core.subscriptions import Subscribers
from messages.base import new_request_id
from messages.requests import SetMode, Subscribe, Subscribed, Unsubscribe, Unsubscribed
from messages.steps import GetVram, Reobserve, WatchVram
from messages.system import Init

# Messages the core decides on; each gets a one-line handler that hands it over.
CORE_MESSAGES = (
    "SetMode", "EnsureVlm", "AcquireLease", "ReleaseLease", "PlaceClip", "GetStatus", "GetGrantable", "ChatNeeds",
    "VlmObserved", "ClipObserved", "PartHealth", "ResourceChanged", "VramReading",
    "VlmLoaded", "VlmUnloaded", "ClipMoved", "VramRecovered", "ChatLoaded", "ChatUnloaded", "StepFailed",
    "ModelSwitched",
)
# Field names a stdlib LogRecord owns: logging refuses them as fields ("Attempt to overwrite 'message'"), and the
# exception would abort the handler between two effects (a reply or the next step lost). Logged with a "_" suffix.
RESERVED_LOG_FIELDS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


def _urgency(effect: Any) -> int:
    """Execution order of one message's effects: steps and replies, then events, then logs, timers and files."""
    if isinstance(effect, (SendStep, ReadVram, ReobserveVlm, Reply)):
        return 0
    return 1 if isinstance(effect, Publish) else 2


# Who executes each step message (a step in flight is sent again to that actor's successor if it is restarted).
STEP_EXECUTOR = {"LoadVlm": "vlm", "UnloadVlm": "vlm", "MoveClip": "clip", "WaitVramFree": "sampler",
                 "ChatYield": "chat", "ChatGrant": "chat"}


def _json_load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save(path: Path, data: bytes) -> None:
    tmp = private_file(path.with_suffix(".tmp"))  # 0600 from the start, not after a moment with the umask's mode
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a crash never leaves half a file


def _json_save(path: Path, data: Any) -> None:
    _save(path, json.dumps(data).encode())


class ModeCoordinator(MaiActor):
    role = "coordinator"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.core: Coordinator | None = None
        self.subscribers = Subscribers()
        self.wakeups: set[float] = set()  # pending wakeup times (Thespian cannot cancel a wakeup)
        self.saved_modes: tuple[str, str] | None = None  # (mode, target) as last written to mode.json

    # --- state files ------------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return Path(self.config.system.state_dir) / name

    def on_init(self, init: Init) -> None:
        footprints = _json_load(self._path(FOOTPRINTS_FILE)) or {}
        saved = _json_load(self._path("mode.json")) or {}
        saved_mode, saved_target = saved.get("mode"), saved.get("target")
        settings = CoordinatorSettings.from_config(init.config)
        initial = saved_mode if saved_mode in settings.modes else None
        self.core = Coordinator(settings, time.time(), learned_footprints=footprints, initial_mode=initial)
        self.saved_modes = (self.core.mode, self.core.target_mode)
        restored = self._restore_subscribers()
        self.log.info("coordinator.ready", mode=self.core.mode, restored_mode=initial or "", learned=sorted(footprints),
                      subscribers=restored)
        self._wire(frozenset(("sampler", "vlm", "clip", "chat")))
        if initial is not None and saved_target in settings.modes and saved_target != initial:
            # A restart in the middle of a mode change goes on toward the mode last asked for, as if asked again.
            self.log.info("coordinator.target_restored", mode=initial, target=saved_target)
            self._to_core(SetMode(new_request_id(), saved_target), None)

    def on_peers(self, restarted: frozenset[str]) -> None:
        self._wire(restarted - {"chat"})  # a restarted agent reports the model it adopted on its own
        step = self.core.step_in_flight if self.core is not None else None
        role = STEP_EXECUTOR.get(type(step).__name__)
        if role in restarted:
            # Its predecessor died with the step (and its result): every step is idempotent, so the successor,
            # which has rebuilt its state from the world, simply does it again.
            self.log.warning("step.resent", target=role, step=type(step).__name__)
            self.send(self.peers[role], step)

    def _wire(self, roles: frozenset[str]) -> None:
        """(Re)connect to these executors: watch VRAM, and ask the others what they observe now (reconcile)."""
        if "sampler" in roles and self.peers.get("sampler") is not None:
            self.send(self.peers["sampler"], WatchVram("coordinator"))
        for role in ("vlm", "clip", "chat"):
            if role in roles and self.peers.get(role) is not None:
                self.send(self.peers[role], Reobserve())

    # --- the core ---------------------------------------------------------------------------------------------
    def _to_core(self, msg: Any, sender: Any) -> None:
        if self.core is None:
            return  # not initialised yet: the supervisor's Init is always first in this mailbox
        request_id = getattr(msg, "request_id", "")
        effects = self.guarded(request_id, sender, self.core.handle, msg, sender, time.time())
        # The next step and the replies first (each is on someone's critical path), then events, then the rest, each
        # group in the core's order: an event or a log line is a message too (to a subscriber, to the logger
        # process), and each one sent first would delay them.
        for effect in sorted(effects or (), key=_urgency):
            self._execute(effect)
        modes = (self.core.mode, self.core.target_mode)
        if modes != self.saved_modes:  # what a restart (of this actor or of Mai) restores
            _json_save(self._path("mode.json"), {"mode": modes[0], "target": modes[1]})
            self.saved_modes = modes

    def _execute(self, effect: Any) -> None:
        if isinstance(effect, SendStep):
            target = self.peers.get(effect.target)
            if target is None:  # that actor is being restarted: the step times out in the core and is re-planned
                self.log.warning("step.no_peer", target=effect.target, step=type(effect.message).__name__)
            else:
                self.send(target, effect.message)
        elif isinstance(effect, Reply):
            if effect.to is not None:  # None: a request the shell made itself (a restored target)
                self.send(effect.to, effect.message)
        elif isinstance(effect, Publish):
            for subscriber in self.subscribers.live(time.time()):
                self.send(subscriber, effect.event)
        elif isinstance(effect, ReadVram):
            if self.peers.get("sampler") is not None:
                self.send(self.peers["sampler"], GetVram(new_request_id()))
        elif isinstance(effect, ReobserveVlm):
            if self.peers.get("vlm") is not None:
                self.send(self.peers["vlm"], Reobserve())
        elif isinstance(effect, Tell):
            if self.peers.get(effect.target) is not None:
                self.send(self.peers[effect.target], effect.message)
        elif isinstance(effect, WakeAt):
            self._wake_at(effect.at)
        elif isinstance(effect, Log):
            self.log.info(effect.event, **{(f"{k}_" if k in RESERVED_LOG_FIELDS else k): v
                                           for k, v in effect.fields.items()})
        elif isinstance(effect, PersistFootprint):
            path = self._path(FOOTPRINTS_FILE)
            data = _json_load(path)
            data = data if isinstance(data, dict) else {}
            data[effect.key] = effect.nbytes  # old-format entries stay: an older Mai reading this file still finds them
            _json_save(path, data)

    def _wake_at(self, at: float) -> None:
        now = time.time()
        if any(pending <= at + 0.005 for pending in self.wakeups if pending >= now - 1):
            return  # an earlier wakeup will come first; its tick re-plans anyway
        self.wakeups.add(at)
        self.wakeupAfter(datetime.timedelta(seconds=max(0.0, at - now)), payload=at)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        self.wakeups.discard(msg.payload)
        self._to_core(Tick(), None)

    # --- subscriptions ------------------------------------------------------------------------------------------
    def receiveMsg_Subscribe(self, msg: Subscribe, sender: Any) -> None:
        self.subscribers.add(sender, time.time(), msg.ttl_s)
        self.send(sender, Subscribed(msg.request_id, msg.ttl_s))
        self._save_subscribers()

    def receiveMsg_Unsubscribe(self, msg: Unsubscribe, sender: Any) -> None:
        self.subscribers.remove(sender)
        self.send(sender, Unsubscribed(msg.request_id))
        self._save_subscribers()

    def _save_subscribers(self) -> None:
        """On every subscribe, renewal and unsubscribe (a renewal comes every ttl/3 per subscriber): what a successor
        needs to go on publishing at once after this actor dies."""
        try:
            _save(subscribers_file(self.config), pickle.dumps(self.subscribers.entries()))
        except (OSError, pickle.PicklingError) as err:
            self.log.warning("subscribers.not_saved", error=str(err))

    def _restore_subscribers(self) -> int:
        """The predecessor's live subscriptions (read through the same restricted unpickler as the sockets: only
        Thespian addresses and plain data)."""
        try:
            entries = safe_pickle.loads(subscribers_file(self.config).read_bytes(), peer="subscribers file")
            return self.subscribers.restore([(token, float(at)) for token, at in entries], time.time())
        except FileNotFoundError:
            return 0
        except Exception as err:  # noqa: BLE001 - a damaged file only costs the events until the next renewal
            self.log.warning("subscribers.not_restored", error=str(err))
            return 0


for _name in CORE_MESSAGES:
    setattr(ModeCoordinator, f"receiveMsg_{_name}", ModeCoordinator._to_core)
