"""Mai: one workstation GPU arbitrated between a VLM (Ollama), an in-process OpenCLIP model and a chat model.

`mai.connect()` gives an ExecutionLoop its client; `mai.Mai` is the conversation API. Imports are lazy so that
pure modules (`mai.core`) and the simulators load without Thespian or torch."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "connect": ("mai.client", "connect"),
    "MaiClient": ("mai.client", "MaiClient"),
    "Lease": ("mai.client", "Lease"),
    "Mai": ("mai.conversation", "Mai"),
    "ReplyFragment": ("messages.chat", "ReplyFragment"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mai' has no attribute {name!r}")
