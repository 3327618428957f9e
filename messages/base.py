"""Validation helpers shared by every message: a bad field raises `InvalidRequest` naming the field, the value
given and what is accepted, so a wrong message fails where it is built, not three processes later.

Unpickling builds a dataclass without calling `__post_init__`, so what arrives from a socket has skipped that
check: `revalidate` runs it again on receipt, and checks every field against its annotation besides."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
import uuid
from typing import Any, Iterable

from messages.errors import InvalidRequest

_SHOWN_CHARS = 200  # of a value in an error: enough to recognise it, not a megabyte of hostile text in a log


def new_request_id() -> str:
    """A correlation id: Thespian's `ask` returns whatever arrives next, so replies are matched by this."""
    return uuid.uuid4().hex


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an int past Python's digit limit, a hostile __repr__: still name the field
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def invalid(cls_name: str, field: str, value: object, accepted: str) -> InvalidRequest:
    shown = _shown(value)
    return InvalidRequest(
        f"{cls_name}.{field}: got {shown}; accepted: {accepted}",
        details={"field": f"{cls_name}.{field}", "value": shown, "accepted": accepted},
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


# --- on receipt ---------------------------------------------------------------------------------------------------


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _conforms(value: object, kind: Any) -> bool:
    """Whether `value` is of the annotated kind; numpy's numbers count as numbers, kinds not modelled pass."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is object:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, arg) for arg in args)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(_conforms(item, arg) for item, arg in zip(value, args))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def _kind_name(kind: Any) -> str:
    text = kind.__name__ if isinstance(kind, type) else str(kind)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)  # typing.Any -> Any, a.b.VramSnapshot -> VramSnapshot


def revalidate(message: object) -> None:
    """Check a message that arrived from a socket as its constructor would have, nested messages included, and
    its fields against their annotations; raise `InvalidRequest` naming the first bad field."""
    pending, seen = [message], set()
    while pending:
        obj = pending.pop()
        if id(obj) in seen:  # a pickle can make an object refer to itself
            continue
        seen.add(id(obj))
        if isinstance(obj, tuple):
            pending.extend(obj)
            continue
        cls = type(obj)
        if not (dataclasses.is_dataclass(obj) and cls.__module__.startswith("messages.")):
            continue
        for name, kind in _field_types(cls):
            value = getattr(obj, name, dataclasses.MISSING)
            if value is dataclasses.MISSING:
                raise invalid(cls.__name__, name, None, "present (the message lacks this field)")
            if not _conforms(value, kind):
                raise invalid(cls.__name__, name, value, f"a value of type {_kind_name(kind)}")
            pending.append(value)
        post_init = getattr(obj, "__post_init__", None)
        if post_init is not None:
            try:
                post_init()
            except InvalidRequest:
                raise
            except Exception as err:  # noqa: BLE001 - a check that broke on a hostile value still refuses it
                raise invalid(cls.__name__, "*", obj, f"a message its own checks accept ({type(err).__name__})") from err
