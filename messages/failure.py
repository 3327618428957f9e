"""The one typed failure reply: every request's failure carries a reason code and a sentence for humans."""

from __future__ import annotations

from dataclasses import dataclass, field

from messages.base import check_text
from messages.errors import MaiError, Reason, error_for


@dataclass(frozen=True)
class Failure:
    request_id: str
    reason: Reason
    message: str
    details: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_text(self, "request_id", allow_empty=True)
        if not isinstance(self.reason, Reason):
            object.__setattr__(self, "reason", Reason(self.reason))
        check_text(self, "message")

    @classmethod
    def from_error(cls, request_id: str, err: BaseException) -> "Failure":
        if isinstance(err, MaiError):
            details = tuple((str(k), str(v)) for k, v in err.details.items())
            return cls(request_id, err.reason, err.message or type(err).__name__, details)
        return cls(request_id, Reason.INTERNAL, f"{type(err).__name__}: {err}" or "internal error")

    def to_error(self) -> MaiError:
        return error_for(self.reason, self.message, dict(self.details))
