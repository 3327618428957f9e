"""Mai's error vocabulary: one reason code per way things fail, used by exceptions and by failure replies.

Adapters translate a client library's errors into these once; actors turn them into `Failure` replies; the
client API turns a `Failure` back into the matching exception. So a caller can always branch on `.reason`.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping


class Reason(str, Enum):
    """Machine-readable failure reasons (stable strings: they appear in `--json` output and logs)."""

    BACKEND_UNREACHABLE = "backend_unreachable"
    CONNECTION_LOST = "connection_lost"
    TIMEOUT = "timeout"
    INSUFFICIENT_VRAM = "insufficient_vram"
    OUT_OF_MEMORY = "out_of_memory"
    MODEL_NOT_FOUND = "model_not_found"
    LOAD_FAILED = "load_failed"
    PREDICTION_FAILED = "prediction_failed"
    NO_GPU = "no_gpu"
    INVALID_REQUEST = "invalid_request"
    INVALID_CONFIG = "invalid_config"
    BUSY = "busy"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    NOT_RUNNING = "not_running"
    NO_MODEL_AVAILABLE = "no_model_available"
    INTERNAL = "internal"


class MaiError(Exception):
    """Base of every error Mai raises on purpose; `reason` says which kind, `str()` says it for humans."""

    default_reason: Reason = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: Reason = reason or self.default_reason
        self.details: dict[str, object] = dict(details or {})

    def __reduce__(self):  # keep reason and details across pickling (actor boundaries)
        return (_rebuild_error, (type(self), self.message, self.reason, self.details))


def _rebuild_error(cls: type[MaiError], message: str, reason: Reason, details: dict[str, object]) -> MaiError:
    err = cls.__new__(cls)
    MaiError.__init__(err, message, reason=reason, details=details)
    return err


class BackendUnavailable(MaiError):
    default_reason = Reason.BACKEND_UNREACHABLE


class ConnectionLost(MaiError):
    default_reason = Reason.CONNECTION_LOST


class OperationTimeout(MaiError):
    default_reason = Reason.TIMEOUT


class InsufficientVram(MaiError):
    """A load or move that would not fit; names the bytes needed, the bytes free and what could be evicted."""

    default_reason = Reason.INSUFFICIENT_VRAM

    def __init__(
        self,
        message: str,
        *,
        needed_bytes: int = 0,
        free_bytes: int = 0,
        evictable: tuple[str, ...] = (),
        details: Mapping[str, object] | None = None,
    ) -> None:
        merged = {"needed_bytes": needed_bytes, "free_bytes": free_bytes, "evictable": list(evictable)}
        merged.update(details or {})
        super().__init__(message, details=merged)


class OutOfMemory(MaiError):
    default_reason = Reason.OUT_OF_MEMORY


class ModelNotFound(MaiError):
    default_reason = Reason.MODEL_NOT_FOUND


class LoadFailed(MaiError):
    default_reason = Reason.LOAD_FAILED


class PredictionFailed(MaiError):
    default_reason = Reason.PREDICTION_FAILED


class NoGpu(MaiError):
    default_reason = Reason.NO_GPU


class InvalidRequest(MaiError, ValueError):
    default_reason = Reason.INVALID_REQUEST


class Busy(MaiError):
    default_reason = Reason.BUSY


class Cancelled(MaiError):
    default_reason = Reason.CANCELLED


class Superseded(MaiError):
    default_reason = Reason.SUPERSEDED


class NotRunning(MaiError):
    default_reason = Reason.NOT_RUNNING


class NoModelAvailable(MaiError):
    default_reason = Reason.NO_MODEL_AVAILABLE


ERROR_FOR_REASON: dict[Reason, type[MaiError]] = {
    Reason.BACKEND_UNREACHABLE: BackendUnavailable,
    Reason.CONNECTION_LOST: ConnectionLost,
    Reason.TIMEOUT: OperationTimeout,
    Reason.INSUFFICIENT_VRAM: InsufficientVram,
    Reason.OUT_OF_MEMORY: OutOfMemory,
    Reason.MODEL_NOT_FOUND: ModelNotFound,
    Reason.LOAD_FAILED: LoadFailed,
    Reason.PREDICTION_FAILED: PredictionFailed,
    Reason.NO_GPU: NoGpu,
    Reason.INVALID_REQUEST: InvalidRequest,
    Reason.BUSY: Busy,
    Reason.CANCELLED: Cancelled,
    Reason.SUPERSEDED: Superseded,
    Reason.NOT_RUNNING: NotRunning,
    Reason.NO_MODEL_AVAILABLE: NoModelAvailable,
}


def error_for(reason: Reason, message: str, details: Mapping[str, object] | None = None) -> MaiError:
    """Build the exception class that matches a reason code (used when a `Failure` reply reaches a client)."""
    return _rebuild_error(ERROR_FOR_REASON.get(reason, MaiError), message, reason, dict(details or {}))
