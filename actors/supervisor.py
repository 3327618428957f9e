"""The root actor: creates the long-lived actors, wires their addresses, restarts a crashed child with backoff.

It is the only top-level actor (top-level actors have no parent to notice their death) and the only one with a
globalName; clients ask it for the others' addresses, which change on restart."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import psutil

from thespian.actors import ActorExitRequest, ChildActorExited, WakeupMessage

from actors.base import MaiActor
from mai import __version__
from mai.core.restart import RestartPolicy
from messages.base import new_request_id
from messages.system import ChildInfo, GetSystemInfo, Init, Peers, Ping, Pong, SystemInfo

SUPERVISOR_NAME = "mai-supervisor"
EXIT_RECHECK_S = 0.5  # a child whose process still runs when its exit is reported is looked at again this late

# role → actor class; created in this order (the coordinator last, so it can reach everyone at Init).
CHILDREN: tuple[tuple[str, str], ...] = (
    ("sampler", "actors.vram_sampler.VramSampler"),
    ("vlm", "actors.vlm_loader.VlmLoader"),
    ("clip", "actors.clip_mover.ClipMover"),
    ("chat", "actors.conversation_agent.ConversationAgent"),
    ("coordinator", "actors.mode_coordinator.ModeCoordinator"),
)


class Supervisor(MaiActor):
    role = "supervisor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.children: dict[str, Any] = {}  # role → address
        self.created_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self.last_exit: dict[str, float] = {}
        self.pending_restart: set[str] = set()
        self.pids: dict[str, int] = {}  # role → pid, from each child's Pong: an exit is believed only if it is gone
        self.stopping = False
        self.policy = RestartPolicy()

    def on_init(self, init: Init) -> None:
        system = init.config.system
        self.policy = RestartPolicy(system.restart_backoff_initial_s, system.restart_backoff_max_s)
        if self.children:  # a second Init (config reload): pass it on
            for role in self.children:
                self._init_child(role)
            return
        for role, cls in CHILDREN:
            self.children[role] = self.createActor(cls)
            self.created_at[role] = time.time()
            self.restarts[role] = 0
        for role in self.children:
            self._init_child(role)
        self.log.info("supervisor.started", children=sorted(self.children), pid=os.getpid())

    def _peers(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.children.items())) + (("supervisor", self.myAddress),)

    def _init_child(self, role: str) -> None:
        self.send(self.children[role], Init(self.config, self._peers(), self.restarts.get(role, 0)))
        self.send(self.children[role], Ping(new_request_id()))  # its pid, to check a reported exit against

    def receiveMsg_Pong(self, msg: Pong, sender: Any) -> None:
        role = next((r for r, a in self.children.items() if a == sender), None)
        if role is not None:
            self.pids[role] = msg.pid

    def _still_running(self, role: str) -> bool:
        """The child's process is alive (not a zombie) and ours. Thespian reaps a child before it reports the exit,
        so a reported exit of a live process is forged: ChildActorExited travels on the same sockets as any message."""
        pid = self.pids.get(role)
        if pid is None:
            return False
        try:
            proc = psutil.Process(pid)
            return proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def receiveMsg_GetSystemInfo(self, msg: GetSystemInfo, sender: Any) -> None:
        children = tuple(
            ChildInfo(role, self.children.get(role), self.restarts.get(role, 0), self.last_exit.get(role))
            for role, _ in CHILDREN
        )
        config = self.config.to_dict() if self.config is not None else {}
        self.send(sender, SystemInfo(msg.request_id, __version__, self.started_at, os.getpid(), children, config))

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        role = next((r for r, a in self.children.items() if a == msg.childAddress), None)
        if role is None or self.stopping or role in self.pending_restart:
            return  # unknown, shutting down, or the duplicate ChildActorExited Thespian sometimes sends
        if self._still_running(role):  # forged, or the process is still winding down: look again shortly
            self.wakeupAfter(datetime.timedelta(seconds=EXIT_RECHECK_S), payload=("recheck", role, msg.childAddress))
            return
        self._exited(role)

    def _exited(self, role: str) -> None:
        self.pids.pop(role, None)
        now = time.time()
        delay, count = self.policy.delay(self.restarts.get(role, 0), now - self.created_at.get(role, now))
        self.restarts[role] = count
        self.last_exit[role] = now
        self.children[role] = None
        self.pending_restart.add(role)
        self.log.warning("child.exited", child=role, restart_in_s=round(delay, 3), restarts=count)
        self.wakeupAfter(datetime.timedelta(seconds=delay), payload=("restart", role))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        payload = msg.payload
        if isinstance(payload, tuple) and payload[0] == "recheck" and not self.stopping:
            role, address = payload[1], payload[2]
            if self.children.get(role) != address or role in self.pending_restart:
                return  # already handled
            if self._still_running(role):
                self.log.warning("child.exit_ignored", child=role, pid=self.pids.get(role),
                                 why="reported exited, but its process still runs: a forged ChildActorExited")
            else:
                self._exited(role)
            return
        if not (isinstance(payload, tuple) and payload[0] == "restart") or self.stopping:
            return
        role = payload[1]
        cls = dict(CHILDREN)[role]
        self.children[role] = self.createActor(cls)
        self.created_at[role] = time.time()
        self.pending_restart.discard(role)
        self._init_child(role)
        peers = Peers(self._peers())
        for other, address in self.children.items():
            if other != role and address is not None:
                self.send(address, peers)
        self.log.info("child.restarted", child=role, restarts=self.restarts[role])

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self.stopping = True
        self.log.info("supervisor.stopping")
