"""Keep every Thespian socket on the configured address (loopback by default).

Thespian binds every listener (admin, each actor, the logger, an external client) to INADDR_ANY and unpickles
whatever reaches it (reference/thespian.md §8.1, §9). No setting changes that, so we rewrite the bind host
right after each `IPActorAddress` is built. It must be applied before `ActorSystem()` in every process that
starts or joins a system; forked actors inherit it, and actor modules re-apply it on import for spawn.

Binding to loopback still lets every local process reach the sockets, so `apply` also installs the restricted
unpickler of `bootstrap.safe_pickle`: the two must be in place at the same moments, in the same processes.
"""

from __future__ import annotations

import os

from thespian.system.transport import IPBase

from bootstrap import safe_pickle

_ENV = "THESPIAN_BASE_IPADDR"  # Thespian's own variable for the advertised IP; we also bind to it
_original_init = IPBase.IPActorAddress.__init__


def _patched_init(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    _original_init(self, *args, **kwargs)
    host = os.environ.get(_ENV, "127.0.0.1")
    bind_host, port = self.bindname[0], self.bindname[1]
    if bind_host in ("", "0.0.0.0"):
        self.bindname = (host, port)


def apply(bind_address: str = "127.0.0.1") -> None:
    """Bind and advertise on `bind_address`, and refuse foreign pickles, in this process and every process it
    forks. Idempotent."""
    os.environ[_ENV] = bind_address
    safe_pickle.apply()
    if IPBase.IPActorAddress.__init__ is not _patched_init:
        IPBase.IPActorAddress.__init__ = _patched_init


def applied() -> bool:
    return IPBase.IPActorAddress.__init__ is _patched_init and safe_pickle.applied()


apply(os.environ.get(_ENV, "127.0.0.1"))
