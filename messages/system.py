"""Messages of the actor system's own life: wiring, liveness and what the supervisor knows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from messages.base import check_instance, check_int, check_number, check_text, invalid


def check_peers(obj: object) -> None:
    """(role, actor address or None) pairs: an actor sends to these, so anything else would break every send."""
    from thespian.actors import ActorAddress

    peers = getattr(obj, "peers")
    if not isinstance(peers, tuple) or not all(
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
        and (pair[1] is None or isinstance(pair[1], ActorAddress))
        for pair in peers
    ):
        raise invalid(type(obj).__name__, "peers", peers, "a tuple of (role, actor address or None) pairs")


@dataclass(frozen=True)
class Init:
    """Supervisor → child, right after creation and after every restart: configuration and peer addresses.
    A child rebuilds its state from the world on Init (reconcile), never from a stale copy."""

    config: Any  # config.MaiConfig (frozen dataclasses, pickle-safe)
    peers: tuple[tuple[str, Any], ...]  # (role, ActorAddress)
    restart_count: int = 0

    def __post_init__(self) -> None:
        from config.schema import MaiConfig  # here: config imports messages

        check_instance(self, "config", MaiConfig)  # an actor adopts it: anything else leaves the actor unusable
        check_peers(self)
        check_int(self, "restart_count")

    def peer(self, role: str) -> Any:
        return dict(self.peers).get(role)


@dataclass(frozen=True)
class Ping:
    request_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class Pong:
    request_id: str
    role: str
    pid: int
    started_at: float

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "role")
        check_int(self, "pid", minimum=1)
        check_number(self, "started_at")


@dataclass(frozen=True)
class ChildInfo:
    role: str
    address: Any  # ActorAddress
    restarts: int
    last_exit_at: float | None = None


@dataclass(frozen=True)
class GetSystemInfo:
    request_id: str

    def __post_init__(self) -> None:
        check_text(self, "request_id")


@dataclass(frozen=True)
class SystemInfo:
    """What the supervisor knows: version, uptime, its children (roles, addresses, restarts), the config."""

    request_id: str
    version: str
    started_at: float
    supervisor_pid: int
    children: tuple[ChildInfo, ...]
    config: dict = field(default_factory=dict)  # MaiConfig.to_dict(): secrets redacted

    def __post_init__(self) -> None:
        check_text(self, "request_id")
        check_text(self, "version")
        check_number(self, "started_at")
        check_int(self, "supervisor_pid", minimum=1)
        check_instance(self, "config", dict)

    def address_of(self, role: str) -> Any:
        for child in self.children:
            if child.role == role:
                return child.address
        return None


@dataclass(frozen=True)
class Peers:
    """Supervisor → children after a restart changed someone's address."""

    peers: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        check_peers(self)

    def peer(self, role: str) -> Any:
        return dict(self.peers).get(role)
