"""Validation helpers shared by every message: a bad field raises `InvalidRequest` naming the field, the value
given and what is accepted, so a wrong message fails where it is built, not three processes later."""

from __future__ import annotations

import math
import uuid
from typing import Iterable

from messages.errors import InvalidRequest


def new_request_id() -> str:
    """A correlation id: Thespian's `ask` returns whatever arrives next, so replies are matched by this."""
    return uuid.uuid4().hex


def invalid(cls_name: str, field: str, value: object, accepted: str) -> InvalidRequest:
    return InvalidRequest(
        f"{cls_name}.{field}: got {value!r}; accepted: {accepted}",
        details={"field": f"{cls_name}.{field}", "value": repr(value), "accepted": accepted},
    )


def check_text(obj: object, field: str, *, allow_empty: bool = False, max_len: int = 1_000_000) -> None:
    value = getattr(obj, field)
    if not isinstance(value, str) or (not allow_empty and not value.strip()) or len(value) > max_len:
        what = "a string" if allow_empty else "a non-empty string"
        raise invalid(type(obj).__name__, field, value, f"{what} of at most {max_len} characters")


def check_number(
    obj: object, field: str, *, minimum: float | None = 0.0, maximum: float | None = None, optional: bool = False
) -> None:
    value = getattr(obj, field)
    if value is None and optional:
        return
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float is no finite number either
        ok = False
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = f"a finite number >= {minimum}" if minimum is not None else "a finite number"
        if maximum is not None:
            bounds += f" and <= {maximum}"
        raise invalid(type(obj).__name__, field, value, bounds + (" or None" if optional else ""))


def check_int(obj: object, field: str, *, minimum: int = 0, optional: bool = False) -> None:
    value = getattr(obj, field)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise invalid(type(obj).__name__, field, value, f"an integer >= {minimum}" + (" or None" if optional else ""))


def check_choice(obj: object, field: str, choices: Iterable[object]) -> None:
    value = getattr(obj, field)
    options = list(choices)
    if value not in options:
        raise invalid(type(obj).__name__, field, value, "one of " + ", ".join(repr(o) for o in options))


def check_instance(obj: object, field: str, kind: type | tuple[type, ...], *, optional: bool = False) -> None:
    value = getattr(obj, field)
    if value is None and optional:
        return
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(type(obj).__name__, field, value, f"a {names}" + (" or None" if optional else ""))
