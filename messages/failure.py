"""The one typed failure reply: every request's failure carries a reason code and a sentence for humans."""

from __future__ import annotations

from dataclasses import dataclass, field

from messages.base import check_text, invalid
from messages.errors import MaiError, Reason, error_for


@dataclass(frozen=True)
class Failure:
    request_id: str
    reason: Reason
    message: str
    details: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_text(self, "request_id", allow_empty=True)
        if not isinstance(self.reason, Reason):  # the reason's wire string ("timeout") is accepted too
            if not isinstance(self.reason, str) or self.reason not in {r.value for r in Reason}:
                raise invalid("Failure", "reason", self.reason, "one of " + ", ".join(r.value for r in Reason))
            object.__setattr__(self, "reason", Reason(self.reason))
        check_text(self, "message")
        if not isinstance(self.details, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
            for pair in self.details
        ):
            raise invalid("Failure", "details", self.details, "a tuple of (key, value) string pairs")

    @classmethod
    def from_error(cls, request_id: str, err: BaseException) -> "Failure":
        if isinstance(err, MaiError):
            details = tuple((str(k), str(v)) for k, v in err.details.items())
            return cls(request_id, err.reason, err.message or type(err).__name__, details)
        return cls(request_id, Reason.INTERNAL, f"{type(err).__name__}: {err}" or "internal error")

    def to_error(self) -> MaiError:
        return error_for(self.reason, self.message, dict(self.details))
