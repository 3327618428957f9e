"""What a valid Mai configuration is: the frozen dataclass tree the rest of Mai reads, and the rule every value must
follow to get into it.

Each setting is a dataclass field whose metadata carries its rule (`Integer(1024, 65535)`, `OneOf("nvml", ...)`),
so the type, the check and the "accepted" text a user sees live on one line. `Checker` walks a raw tree (plain
dicts from YAML, the environment and overrides) against these fields and never stops at the first failure: every
unknown key, missing key, wrong type, bad range and broken relation between fields becomes a `ConfigProblem`.
Reading files and the environment is `config.loader`'s job; nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from config.ollama_names import ACCEPTED as ACCEPTED_OLLAMA_NAME
from config.ollama_names import parse_ollama_name
from messages.errors import MaiError, Reason
from messages.conversation import TurnKind

Parts = tuple[object, ...]  # a path into a raw tree: ("gpu", "reserve_mb") or ("models", 2, "backend")
SourceOf = Callable[[Parts], str]

REDACTED = "***"
REMOTE_RISK = (
    "Thespian's sockets have no authentication and Thespian unpickles whatever reaches them; Mai refuses every "
    "type but its own messages there, yet anyone who reaches them can stop Mai, change its mode, load and unload "
    "models and read the chat history"
)
REQUIRED_MODES = ("autopilot", "recording", "idle")
_MODE_NAME = re.compile(r"[a-z][a-z0-9_]*")


# --- problems ------------------------------------------------------------------------------------------------


def dotted(parts: Parts) -> str:
    """`("models", 2, "backend")` -> `models[2].backend`; the empty path is the top level of a file."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _show(value: object, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a structure nested too deep
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration: where (dotted path), what was given, what is accepted, and which
    layer the value came from (`default`, a file path, `env MAI_...`, `override`).

    `kind` is `value` (a value breaks its rule), `unknown_key`, `missing` or `source` (the layer itself could not
    be read: a missing file, a YAML syntax error; `value` then says what went wrong and `line` where).
    """

    path: str
    value: object
    accepted: str
    suggestion: str | None = None
    source: str = "default"
    kind: str = "value"
    line: int | None = None

    def __str__(self) -> str:
        origin = f"(from {self.source})"
        hint = f"; did you mean {self.suggestion!r}?" if self.suggestion is not None else ""
        if self.kind == "unknown_key":
            return f"{self.path}: unknown key" + (hint or f"; accepted: {self.accepted}") + f" {origin}"
        if self.kind == "missing":
            return f"{self.path}: missing {origin}; accepted: {self.accepted}"
        if self.kind == "source":
            where = self.source + (f", line {self.line}" if self.line is not None else "")
            return f"{where}: {self.value}; accepted: {self.accepted}{hint}"
        return f"{self.path or '(top level)'} = {_show(self.value)} {origin}: accepted: {self.accepted}{hint}"

    def to_dict(self) -> dict[str, object]:
        plain = dataclasses.asdict(self)
        plain["value"] = _show(self.value)
        return plain


class ConfigError(MaiError):
    """The configuration is invalid; `.problems` lists every problem found, `str()` is the report for humans."""

    default_reason = Reason.INVALID_CONFIG

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        count = len(self.problems)
        header = f"invalid configuration ({count} problem{'' if count == 1 else 's'}):"
        report = "\n".join([header, *(f"  {problem}" for problem in self.problems)])
        super().__init__(report, details={"problems": [problem.to_dict() for problem in self.problems]})

    def __reduce__(self):  # MaiError's rebuild would drop .problems
        return (type(self), (self.problems,))


# --- rules: one per kind of value; `accepted` is what a user reads when a value breaks it ---------------------


class Rejected(Exception):
    """Raised by a rule's `check`; carries an optional "did you mean" for the report, and what to show instead of
    the value when the value holds a credential."""

    def __init__(self, suggestion: str | None = None, *, shown: str | None = None) -> None:
        super().__init__(suggestion)
        self.suggestion = suggestion
        self.shown = shown


def _credentials_refused(host_part: str, rebuild: Callable[[str], str]) -> Rejected:
    """A host with user:password@ in it: suggest it without them, show them as ***."""
    bare = host_part.rpartition("@")[2]
    return Rejected(rebuild(bare), shown=rebuild(f"{REDACTED}@{bare}"))


def _closest(word: object, choices: Iterable[str]) -> str | None:
    if not isinstance(word, str):
        return None
    options = list(choices)
    exact = [option for option in options if option.lower() == word.lower()]
    found = exact or difflib.get_close_matches(word.lower(), options, n=1)
    return found[0] if found else None


def _num(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def _bounds(minimum: float | None, maximum: float | None, exclusive_minimum: bool = False) -> str:
    low = "" if minimum is None else f"> {_num(minimum)}" if exclusive_minimum else f">= {_num(minimum)}"
    if maximum is None:
        return low
    if minimum is None:
        return f"<= {_num(maximum)}"
    return f"{low} and <= {_num(maximum)}" if exclusive_minimum else f"from {_num(minimum)} to {_num(maximum)}"


@dataclass(frozen=True)
class Integer:
    minimum: int | None = None
    maximum: int | None = None

    @property
    def accepted(self) -> str:
        return f"an integer {_bounds(self.minimum, self.maximum)}".rstrip()

    def check(self, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Rejected()
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise Rejected()
        return value


@dataclass(frozen=True)
class Number:
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def accepted(self) -> str:
        return f"a number {_bounds(self.minimum, self.maximum, self.exclusive_minimum)}".rstrip()

    def check(self, value: object) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Rejected()
        try:
            number = float(value)
        except OverflowError:
            raise Rejected() from None
        too_low = self.minimum is not None and (
            number <= self.minimum if self.exclusive_minimum else number < self.minimum
        )
        if not math.isfinite(number) or too_low or (self.maximum is not None and number > self.maximum):
            raise Rejected()
        return number


@dataclass(frozen=True)
class Flag:
    accepted: str = "true or false"

    def check(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise Rejected()
        return value


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def __init__(self, *choices: str) -> None:
        object.__setattr__(self, "choices", choices)

    @property
    def accepted(self) -> str:
        return "one of " + ", ".join(self.choices)

    def check(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise Rejected(_closest(value, self.choices))
        return value


@dataclass(frozen=True)
class Text:
    allow_empty: bool = False

    @property
    def accepted(self) -> str:
        return "a string" if self.allow_empty else "a non-empty string"

    def check(self, value: object) -> str:
        if not isinstance(value, str) or (not self.allow_empty and not value.strip()):
            raise Rejected()
        return value


@dataclass(frozen=True)
class FilePath:
    """A path; the checker expands `~` and `$VARS` in it and hands out a `pathlib.Path`."""

    accepted: str = "a file system path (a non-empty string without NUL characters; ~ and $VARS are expanded)"
    expands: bool = True

    def check(self, value: object) -> str:
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str) or not text.strip() or "\0" in text:  # no OS call accepts a NUL
            raise Rejected()
        return text


@dataclass(frozen=True)
class HttpUrl:
    accepted: str = (
        "an http:// or https:// URL such as http://127.0.0.1:11434, without user:password@ "
        "(the URL appears in logs and status)"
    )

    def check(self, value: object) -> str:
        if not isinstance(value, str):
            raise Rejected()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise Rejected(shown=REDACTED if "@" in value else None) from None
        if "@" in parts.netloc:
            raise _credentials_refused(parts.netloc, lambda netloc: parts._replace(netloc=netloc).geturl())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Rejected(None if "://" in value else f"http://{value}")
        return value


@dataclass(frozen=True)
class HostPort:
    accepted: str = (
        "host:port with no scheme, no path and no user:password@, such as 127.0.0.1:1234 "
        "(the LM Studio SDK rejects http:// and ws:// URLs)"
    )

    def check(self, value: object) -> str:
        if not isinstance(value, str):
            raise Rejected()
        if "@" in value:
            host_port = value.split("://", 1)[-1].split("/", 1)[0]
            refused = _credentials_refused(host_port, lambda text: text)
            raise Rejected(refused.suggestion if self._valid(refused.suggestion or "") else None, shown=refused.shown)
        if "://" in value or "/" in value:
            bare = value.split("://", 1)[-1].split("/", 1)[0]
            raise Rejected(bare if self._valid(bare) else None)
        if not self._valid(value):
            raise Rejected()
        return value

    @staticmethod
    def _valid(text: str) -> bool:
        host, colon, port = text.rpartition(":")
        return bool(colon and host.strip() and not any(c.isspace() for c in text)) and (
            port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
        )


@dataclass(frozen=True)
class IpAddress:
    accepted: str = "an IP address such as 127.0.0.1 or ::1"

    def check(self, value: object) -> str:
        if not isinstance(value, str):
            raise Rejected()
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise Rejected("127.0.0.1" if value.strip().lower() == "localhost" else None) from None
        return value


_GPU_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU, named the way NVML and torch both can: an NVML index (PCI bus order) or the GPU's UUID as
    `nvidia-smi -L` prints it. MIG slices (`MIG-...`) are refused: Mai samples the whole GPU's memory."""

    accepted: str = (
        "an integer >= 0 (the NVML index, PCI bus order) or a GPU UUID such as "
        "GPU-5d1c2f0e-8a3b-4c1d-9e2f-0123456789ab (nvidia-smi -L); MIG slices are not supported"
    )

    def check(self, value: object) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise Rejected()
            return value
        if not isinstance(value, str):
            raise Rejected()
        text = value.strip()
        if text.isdigit():
            return int(text)
        if _GPU_UUID.fullmatch(text):
            return "GPU-" + text[4:].lower()
        if _GPU_UUID.fullmatch("GPU-" + text):  # torch prints the UUID without NVML's prefix
            raise Rejected("GPU-" + text.lower())
        raise Rejected()


@dataclass(frozen=True)
class Capabilities:
    choices: tuple[str, ...] = ("chat", "vision", "tools", "embedding")

    @property
    def accepted(self) -> str:
        return "a list of distinct items from: " + ", ".join(self.choices)

    def check(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise Rejected()
        for item in value:
            if not isinstance(item, str) or item not in self.choices:
                raise Rejected(_closest(item, self.choices))
        if len(set(value)) != len(value):
            raise Rejected()
        return tuple(value)


@dataclass(frozen=True)
class TurnNeed:
    """What one kind of turn requires of the model that answers it: a minimum tier (a preference: the best model
    that can run answers when none reaching it can) and capabilities (hard: never a model without them)."""

    min_tier: int = 0
    capabilities: tuple[str, ...] = ()


_TIER_RULE = re.compile(r"tier\s*>=\s*(\d+)")
_CAPABILITY_RULE = re.compile(r"capability\s+(\S+)")


@dataclass(frozen=True)
class NeedRule:
    """`tier >= 2`, `capability vision`, or a list of such: the catalog's `turns.needs.<kind>`."""

    @property
    def accepted(self) -> str:
        return ("'tier >= N' (N an integer >= 0), 'capability C' (C one of "
                + ", ".join(Capabilities().choices) + "), or a list of them")

    def check(self, value: object) -> TurnNeed:
        items = value if isinstance(value, list) and value else [value]
        min_tier, capabilities = 0, []
        for item in items:
            text = item.strip().lower() if isinstance(item, str) else None
            tier = _TIER_RULE.fullmatch(text) if text is not None else None
            capability = _CAPABILITY_RULE.fullmatch(text) if text is not None else None
            if tier is not None:
                min_tier = max(min_tier, int(tier.group(1)))
            elif capability is not None and capability.group(1) in Capabilities().choices:
                if capability.group(1) not in capabilities:
                    capabilities.append(capability.group(1))
            elif capability is not None:
                raise Rejected(_closest(capability.group(1), Capabilities().choices))
            else:
                raise Rejected()
        return TurnNeed(min_tier, tuple(capabilities))


@dataclass(frozen=True)
class Optional:
    inner: Any

    @property
    def accepted(self) -> str:
        return "null or " + self.inner.accepted

    @property
    def expands(self) -> bool:
        return getattr(self.inner, "expands", False)

    def check(self, value: object) -> object:
        return None if value is None else self.inner.check(value)


def setting(rule: Any, *, default: object = dataclasses.MISSING, secret: bool = False) -> Any:
    """A dataclass field checked by `rule`; a `secret` never appears in `repr`, `to_dict` or a problem report."""
    return field(default=default, repr=not secret, metadata={"rule": rule, "secret": secret})


def _positive() -> Number:
    return Number(0, exclusive_minimum=True)


def _non_negative() -> Number:
    return Number(0)


# --- the tree ------------------------------------------------------------------------------------------------


class FrozenMap(Mapping):
    """A read-only dict that pickles and hashes (MappingProxyType does neither): configs travel between actors."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | Iterable[tuple[object, object]] = ()) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: object) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FrozenMap is read-only")

    def __reduce__(self):
        return (FrozenMap, (self._data,))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


Relation = tuple[str, str]  # (field broken, what is accepted) from a section's `relations()`


def _at_least(values: Mapping[str, Any], larger: str, smaller: str, section: str) -> Iterator[Relation]:
    if values.get(larger) is not None and values.get(smaller) is not None and values[larger] < values[smaller]:
        yield larger, f"a number >= {section}.{smaller} ({_num(values[smaller])})"


@dataclass(frozen=True)
class SystemConfig:
    """How Mai's own processes run: where the admin socket listens, where state lives, how long to wait."""

    admin_port: int = setting(Integer(1024, 65535))
    bind_address: str = setting(IpAddress())
    allow_remote: bool = setting(Flag())
    state_dir: Path = setting(FilePath())
    models_file: Path = setting(Optional(FilePath()))  # null in YAML; the catalog actually read once loaded
    start_timeout_s: float = setting(_positive())
    stop_timeout_s: float = setting(_positive())
    ask_timeout_s: float = setting(_positive())
    restart_backoff_initial_s: float = setting(_positive())
    restart_backoff_max_s: float = setting(_positive())

    @staticmethod
    def relations(values: Mapping[str, Any]) -> Iterator[Relation]:
        yield from _at_least(values, "restart_backoff_max_s", "restart_backoff_initial_s", "system")
        address, allow_remote = values.get("bind_address"), values.get("allow_remote")
        if address is not None and allow_remote is False and not ipaddress.ip_address(address).is_loopback:
            yield "bind_address", (
                "a loopback address (127.0.0.1 or ::1) unless system.allow_remote is true: " + REMOTE_RISK
            )

    def exposure_warning(self) -> str | None:
        """What an operator must be told at start when the sockets are reachable from other hosts, else None."""
        if ipaddress.ip_address(self.bind_address).is_loopback:
            return None
        return (
            f"system.bind_address is {self.bind_address} and system.allow_remote is true, so Mai's admin port "
            f"{self.admin_port} and every actor port are reachable from other hosts. " + REMOTE_RISK[0].upper()
            + REMOTE_RISK[1:] + ". Use this only on a private network or tunnel you trust, behind a firewall."
        )


@dataclass(frozen=True)
class GpuConfig:
    """Which GPU the sampler watches and how often; `simulated` replaces NVML with a ledger file for tests."""

    backend: str = setting(OneOf("nvml", "simulated"))
    device: int | str = setting(GpuDevice())
    sample_interval_s: float = setting(Number(0, 60, exclusive_minimum=True))
    change_threshold_mb: int = setting(Integer(1))
    reserve_mb: int = setting(Integer(0))
    simulated_total_mb: int = setting(Integer(256))
    simulated_ledger: Path = setting(Optional(FilePath()))  # null in YAML means <state_dir>/sim-gpu.sqlite


OLLAMA_LOAD_LIMIT_S = 300  # Ollama's own load limit, OLLAMA_LOAD_TIMEOUT's default (envconfig/config.go)


@dataclass(frozen=True)
class OllamaModelName:
    """A model name in any form Ollama accepts (`config.ollama_names`): checked here, matched as Ollama does."""

    accepted: str = ACCEPTED_OLLAMA_NAME

    def check(self, value: object) -> str:
        try:
            parse_ollama_name(value)
        except MaiError:
            raise Rejected() from None
        return str(value).strip()


@dataclass(frozen=True)
class OllamaConfig:
    """The Ollama server that serves the VLM, and how patiently Mai talks to it."""

    host: str = setting(HttpUrl())
    vlm_model: str = setting(OllamaModelName())
    num_ctx: int = setting(Integer(256, 1_048_576))
    vlm_footprint_mb: int = setting(Integer(1))
    request_timeout_s: float = setting(_positive())
    load_timeout_s: float = setting(_positive())
    unload_timeout_s: float = setting(_positive())
    retries: int = setting(Integer(0, 10))
    retry_backoff_s: float = setting(_non_negative())
    idle_timeout_s: float = setting(_positive())
    lease_ttl_s: float = setting(_positive())
    probe_backoff_initial_s: float = setting(_positive())
    probe_backoff_max_s: float = setting(_positive())
    vram_recovery_timeout_s: float = setting(_positive())
    vram_recovery_poll_s: float = setting(_positive())
    vram_recovery_fraction: float = setting(Number(0, 1, exclusive_minimum=True))

    @staticmethod
    def relations(values: Mapping[str, Any]) -> Iterator[Relation]:
        yield from _at_least(values, "probe_backoff_max_s", "probe_backoff_initial_s", "ollama")
        load_timeout_s = values.get("load_timeout_s")
        if load_timeout_s is not None and load_timeout_s < OLLAMA_LOAD_LIMIT_S:
            yield "load_timeout_s", (
                f"a number >= {OLLAMA_LOAD_LIMIT_S}: Ollama sends nothing until a load is done, aborts the load when "
                f"Mai stops waiting, and allows a load {OLLAMA_LOAD_LIMIT_S} s itself (OLLAMA_LOAD_TIMEOUT), so a "
                "shorter wait fails every slow cold load"
            )


@dataclass(frozen=True)
class LmStudioConfig:
    """The LM Studio server that serves chat models."""

    enabled: bool = setting(Flag())
    host: str = setting(HostPort())
    api_token: str | None = setting(Optional(Text()), secret=True)
    load_timeout_s: float = setting(_positive())
    request_timeout_s: float = setting(_positive())
    instance_ttl_s: float | None = setting(Optional(_positive()))

    @staticmethod
    def relations(values: Mapping[str, Any]) -> Iterator[Relation]:
        if values.get("api_token") is not None:  # shown as *** in the report, like every secret
            yield "api_token", (
                "null: the lmstudio Python SDK Mai uses (1.5) cannot send an API token, so Mai could not "
                "authenticate; turn off 'Require Authentication' in LM Studio's server settings instead"
            )


@dataclass(frozen=True)
class ClipConfig:
    """The in-process OpenCLIP model: which weights, at what precision, and where it starts."""

    backend: str = setting(OneOf("openclip", "simulated"))
    model: str = setting(Text())
    pretrained: str | None = setting(Optional(Text()))
    precision: str = setting(OneOf("fp32", "fp16", "bf16"))
    move_timeout_s: float = setting(_positive())
    footprint_mb: int | None = setting(Optional(Integer(1)))
    threads: int | None = setting(Optional(Integer(1)))


@dataclass(frozen=True)
class ModeSpec:
    """What one mode wants: the VLM loaded/unloaded/left as is, CLIP on gpu/cpu/left as is."""

    vlm: str = setting(OneOf("loaded", "unloaded", "keep"))
    clip: str = setting(OneOf("gpu", "cpu", "keep"))
    lease_drain_timeout_s: float = setting(_non_negative(), default=10.0)
    vlm_grace_s: float | None = setting(Optional(_non_negative()), default=None)


@dataclass(frozen=True)
class ModesConfig(Mapping):
    """The mode table, readable as a mapping (`cfg.modes["autopilot"]`), plus the mode Mai starts in.

    In YAML the modes sit directly under `modes:` next to `default`, so `MAI_MODES__AUTOPILOT__CLIP=cpu` works.
    """

    default: str
    table: FrozenMap  # mode name -> ModeSpec

    def __getitem__(self, name: str) -> ModeSpec:
        return self.table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def to_dict(self) -> dict[str, object]:
        return {"default": self.default, **{name: to_plain(spec) for name, spec in self.table.items()}}


@dataclass(frozen=True)
class LoggingConfig:
    """Where structlog events go; a relative `file` lives under `system.state_dir`."""

    level: str = setting(OneOf("debug", "info", "warning", "error"))
    console: bool = setting(Flag())
    console_format: str = setting(OneOf("pretty", "json"))
    file: Path | None = setting(Optional(FilePath()))


@dataclass(frozen=True)
class ChatConfig:
    """The conversation agent: prompt, which catalog role it draws models from, retry and switching policy."""

    system_prompt: str = setting(Text(allow_empty=True))
    role: str = setting(Text())
    history_db: Path = setting(FilePath())
    compress_at_fraction: float = setting(Number(0, 1, exclusive_minimum=True))
    max_retries: int = setting(Integer(0, 10))
    retry_backoff_s: float = setting(_non_negative())
    cooldown_s: float = setting(_non_negative())
    switch_hysteresis_s: float = setting(_non_negative())
    min_tokens_per_s: float = setting(_non_negative())
    reply_timeout_s: float = setting(_positive())
    max_tokens: int = setting(Integer(1))
    temperature: float = setting(Number(0, 2))
    token_batch_ms: int = setting(Integer(1, 2000))
    leave_room_for_agent: bool = setting(Flag())


@dataclass(frozen=True)
class ModelSpec:
    """One chat model in the catalog; `footprint_mb` is declared here and replaced by a measurement later."""

    key: str = setting(Text())
    backend: str = setting(OneOf("lmstudio", "ollama"))
    tier: int = setting(Integer(0))
    context_window: int = setting(Integer(256))
    footprint_mb: int = setting(Integer(1))
    capabilities: tuple[str, ...] = setting(Capabilities())

    @staticmethod
    def relations(values: Mapping[str, Any]) -> Iterator[Relation]:
        if values.get("backend") == "ollama" and values.get("key") is not None:
            try:
                parse_ollama_name(values["key"])
            except MaiError:
                yield "key", ACCEPTED_OLLAMA_NAME + " (the backend is ollama)"


TURN_KINDS = tuple(kind.value for kind in TurnKind)


@dataclass(frozen=True)
class TurnRules:
    """The catalog's `turns:` what each kind of turn needs of a model (mai.core.turn_needs detects the kinds).
    Absent from a catalog: no kind needs more than chat, and a message is long from `long_at_tokens`."""

    long_at_tokens: int = 2000
    needs: FrozenMap = FrozenMap()  # TurnKind value -> TurnNeed; checked by Checker._turns

    def need(self, kind: str) -> TurnNeed:
        return self.needs.get(kind, TurnNeed())


SECTIONS: dict[str, type] = {
    "system": SystemConfig,
    "gpu": GpuConfig,
    "ollama": OllamaConfig,
    "lmstudio": LmStudioConfig,
    "clip": ClipConfig,
    "modes": ModesConfig,
    "logging": LoggingConfig,
    "chat": ChatConfig,
}
CATALOG_KEYS = ("models", "roles", "turns")


@dataclass(frozen=True)
class MaiConfig:
    """The whole validated configuration. `sources` lists the files and environment variables applied, in order."""

    system: SystemConfig
    gpu: GpuConfig
    ollama: OllamaConfig
    lmstudio: LmStudioConfig
    clip: ClipConfig
    modes: ModesConfig
    logging: LoggingConfig
    chat: ChatConfig
    models: tuple[ModelSpec, ...]
    roles: FrozenMap  # role -> tuple of model keys, best first
    turns: TurnRules = TurnRules()
    sources: tuple[str, ...] = ()

    def model(self, key: str) -> ModelSpec:
        for spec in self.models:
            if spec.key == key:
                return spec
        raise KeyError(f"unknown model {key!r}; known: {', '.join(spec.key for spec in self.models)}")

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data in the YAML layout; secrets that are set show as "***"."""
        plain = {name: to_plain(getattr(self, name)) for name in SECTIONS}
        plain["models"] = [to_plain(spec) for spec in self.models]
        plain["roles"] = {role: list(keys) for role, keys in self.roles.items()}
        plain["turns"] = {"long_at_tokens": self.turns.long_at_tokens,
                          "needs": {kind: to_plain(need) for kind, need in self.turns.needs.items()}}
        plain["sources"] = list(self.sources)
        return plain


def to_plain(value: object) -> object:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: REDACTED
            if f.metadata.get("secret") and getattr(value, f.name) is not None
            else to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    return value


# --- checking ------------------------------------------------------------------------------------------------


def expand_path(text: str, env: Mapping[str, str]) -> Path:
    """`~` and `$VAR` / `${VAR}` from `env` (not necessarily os.environ); unknown variables stay as written."""
    expanded = re.sub(r"\$(\w+|\{[^}]*\})", lambda m: env.get(m.group(1).strip("{}"), m.group(0)), text)
    if expanded == "~" or expanded.startswith("~/"):
        expanded = (env.get("HOME") or str(Path.home())) + expanded[1:]
    return Path(os.path.expanduser(expanded))


def _looks_like_typo(name: str, spec_raw: Mapping[object, object]) -> bool:
    """A new mode that does not set vlm and clip, named like a built-in one, is a misspelt built-in one."""
    incomplete = not {"vlm", "clip"} <= set(spec_raw)
    return name not in REQUIRED_MODES and incomplete and _closest(name, REQUIRED_MODES) is not None


class Checker:
    """Walks raw trees against the schema. Every failure is appended to `problems`; every value that passes is
    kept in `passed` by path, so a caller can use a good `system.models_file` even when other keys are bad."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[ConfigProblem] = []
        self.passed: dict[Parts, object] = {}

    def add(
        self,
        parts: Parts,
        value: object,
        accepted: str,
        source: str,
        *,
        suggestion: str | None = None,
        kind: str = "value",
        line: int | None = None,
    ) -> None:
        self.problems.append(ConfigProblem(dotted(parts), value, accepted, suggestion, source, kind, line))

    # settings: the sections of default.yaml and the user's file

    def settings(self, tree: Mapping[object, object], source_of: SourceOf) -> dict[str, object]:
        """The sections that passed completely, by name."""
        hints = {key: "the model catalog lives in its own file: set system.models_file" for key in CATALOG_KEYS}
        self._unknown_keys(tree, (), list(SECTIONS), source_of, hints)
        sections: dict[str, object] = {}
        for name, cls in SECTIONS.items():
            raw = self._mapping(tree, (name,), source_of, f"a mapping of {name} settings")
            if raw is None:
                continue
            built = self._modes(raw, source_of) if cls is ModesConfig else self.record(cls, raw, (name,), source_of)
            if built is not None:
                sections[name] = built
        return sections

    def record(self, cls: type, raw: Mapping[object, object], parts: Parts, source_of: SourceOf) -> Any:
        """Checks one mapping against a dataclass's fields; returns the instance, or None if anything failed."""
        specs = dataclasses.fields(cls)
        self._unknown_keys(raw, parts, [f.name for f in specs], source_of)
        values: dict[str, object] = {}
        for spec in specs:
            rule, where = spec.metadata["rule"], parts + (spec.name,)
            if spec.name not in raw:
                if spec.default is not dataclasses.MISSING:
                    values[spec.name] = spec.default
                else:
                    self.add(where, None, rule.accepted, source_of(where), kind="missing")
                continue
            value = raw[spec.name]
            try:
                checked = rule.check(value)
            except Rejected as rejected:
                shown = REDACTED if spec.metadata["secret"] and value is not None else value
                shown = shown if rejected.shown is None else rejected.shown
                self.add(where, shown, rule.accepted, source_of(where), suggestion=rejected.suggestion)
                continue
            if getattr(rule, "expands", False) and checked is not None:
                checked = expand_path(checked, self.env)
            values[spec.name] = self.passed[where] = checked
        broken = list(cls.relations(values)) if hasattr(cls, "relations") else []
        secret = {spec.name for spec in specs if spec.metadata["secret"]}
        for name, accepted in broken:
            where = parts + (name,)
            shown = REDACTED if name in secret and values[name] is not None else values[name]
            self.add(where, shown, accepted, source_of(where))
        return cls(**values) if len(values) == len(specs) and not broken else None

    def _modes(self, raw: Mapping[object, object], source_of: SourceOf) -> ModesConfig | None:
        table: dict[str, ModeSpec] = {}
        declared: list[str] = []  # modes checked as modes, whether or not they passed
        failed = False
        for name, spec_raw in raw.items():
            where = ("modes", name)
            if name == "default":
                continue
            if name == "table":  # the dataclass field's name, not a YAML key: modes sit directly under modes:
                accepted = "modes directly under modes: (modes.autopilot.clip, not modes.table.autopilot.clip)"
                self.add(where, spec_raw, accepted, source_of(where), kind="unknown_key")
                failed = True
            elif not isinstance(name, str) or not _MODE_NAME.fullmatch(name):
                accepted = "a mode name: a lowercase identifier (a-z, 0-9, _) starting with a letter"
                self.add(where, name, accepted, source_of(where), suggestion=_closest(name, REQUIRED_MODES))
                failed = True
            elif not isinstance(spec_raw, Mapping):
                accepted = "a mapping with vlm, clip, lease_drain_timeout_s and vlm_grace_s"
                self.add(where, spec_raw, accepted, source_of(where))
                failed = True
            elif _looks_like_typo(name, spec_raw):
                accepted = "a new mode (which sets vlm and clip) or one of " + ", ".join(REQUIRED_MODES)
                suggestion = _closest(name, REQUIRED_MODES)
                self.add(where, spec_raw, accepted, source_of(where), suggestion=suggestion, kind="unknown_key")
                failed = True
            else:
                declared.append(name)
                spec = self.record(ModeSpec, spec_raw, where, source_of)
                failed = failed or spec is None
                if spec is not None:
                    table[name] = spec
        for name in REQUIRED_MODES:
            if name not in raw:
                accepted = "every mode table has autopilot, recording and idle"
                self.add(("modes", name), None, accepted, source_of(("modes",)), kind="missing")
                failed = True
        default_where = ("modes", "default")
        default = raw.get("default")
        if "default" not in raw:
            self.add(default_where, None, "one of the mode names", source_of(default_where), kind="missing")
            failed = True
        elif not isinstance(default, str) or default not in declared:
            accepted = "one of the mode names: " + ", ".join(declared)
            suggestion = _closest(default, declared)
            self.add(default_where, default, accepted, source_of(default_where), suggestion=suggestion)
            failed = True
        return None if failed else ModesConfig(default=default, table=FrozenMap(table))

    # catalog: models.yaml or system.models_file

    def catalog(self, tree: object, source: str) -> tuple[tuple[ModelSpec, ...], FrozenMap, TurnRules] | None:
        """The catalog's models, roles and turn rules, or None if anything in it failed."""
        def source_of(parts: Parts) -> str:  # a catalog is one file: one source for all of it
            return source

        before = len(self.problems)
        if tree is None:
            tree = {}
        if not isinstance(tree, Mapping):
            self.add((), tree, "a mapping with models and roles", source)
            return None
        self._unknown_keys(tree, (), list(CATALOG_KEYS), source_of)
        models: list[ModelSpec] = []
        known_keys: dict[str, int] = {}  # key -> index of the first model that uses it
        raw_models = tree.get("models")
        if not isinstance(raw_models, list):
            kind = "missing" if "models" not in tree else "value"
            self.add(("models",), raw_models, "a list of models (key, backend, tier, ...)", source, kind=kind)
            raw_models = []
        for index, raw in enumerate(raw_models):
            where: Parts = ("models", index)
            if not isinstance(raw, Mapping):
                self.add(where, raw, "a mapping with key, backend, tier, context_window, footprint_mb, "
                         "capabilities", source)
                continue
            spec = self.record(ModelSpec, raw, where, source_of)
            key = raw.get("key")
            if isinstance(key, str) and key in known_keys:
                accepted = f"a key no other model uses (models[{known_keys[key]}] already has it)"
                self.add(where + ("key",), key, accepted, source)
            elif isinstance(key, str):
                known_keys[key] = index
                if spec is not None:
                    models.append(spec)
        roles = self._roles(tree, known_keys, source)
        turns = self._turns(tree, source)
        if len(self.problems) != before or roles is None or turns is None:
            return None
        return tuple(models), roles, turns

    def _turns(self, tree: Mapping[object, object], source: str) -> TurnRules | None:
        """`turns: {long_at_tokens: N, needs: {code: tier >= 2, image: capability vision, ...}}`, optional."""
        if "turns" not in tree or tree["turns"] is None:
            return TurnRules()
        raw = tree["turns"]
        if not isinstance(raw, Mapping):
            self.add(("turns",), raw, "a mapping with long_at_tokens and needs", source)
            return None
        before = len(self.problems)
        self._unknown_keys(raw, ("turns",), ["long_at_tokens", "needs"], lambda parts: source)
        long_at = TurnRules.long_at_tokens
        if "long_at_tokens" in raw:
            rule = Integer(1)
            try:
                long_at = rule.check(raw["long_at_tokens"])
            except Rejected:
                self.add(("turns", "long_at_tokens"), raw["long_at_tokens"], rule.accepted, source)
        needs: dict[str, TurnNeed] = {}
        raw_needs = raw.get("needs") or {}
        if not isinstance(raw_needs, Mapping):
            self.add(("turns", "needs"), raw_needs, "a mapping from a kind of turn (" + ", ".join(TURN_KINDS)
                     + ") to what it needs", source)
            raw_needs = {}
        for kind, value in raw_needs.items():
            where: Parts = ("turns", "needs", kind)
            if kind not in TURN_KINDS:
                self.add(where, value, "a kind of turn: one of " + ", ".join(TURN_KINDS), source,
                         suggestion=_closest(kind, TURN_KINDS), kind="unknown_key")
                continue
            try:
                needs[kind] = NeedRule().check(value)
            except Rejected as rejected:
                self.add(where, value, NeedRule().accepted, source, suggestion=rejected.suggestion)
        return TurnRules(long_at, FrozenMap(needs)) if len(self.problems) == before else None

    def _roles(self, tree: Mapping[object, object], known_keys: Mapping[str, int], source: str) -> FrozenMap | None:
        raw_roles = tree.get("roles")
        if not isinstance(raw_roles, Mapping):
            kind = "missing" if "roles" not in tree else "value"
            self.add(("roles",), raw_roles, "a mapping of role name to a list of model keys", source, kind=kind)
            return None
        roles: dict[str, tuple[str, ...]] = {}
        for role, keys in raw_roles.items():
            where: Parts = ("roles", role)
            if not isinstance(role, str) or not role.strip():
                self.add(where, role, "a role name (a non-empty string)", source)
                continue
            if not isinstance(keys, list) or not keys:
                self.add(where, keys, "a non-empty list of model keys from models", source)
                continue
            for index, key in enumerate(keys):
                if not isinstance(key, str) or key not in known_keys:
                    accepted = "a model key from models: " + ", ".join(known_keys)
                    self.add(where + (index,), key, accepted, source, suggestion=_closest(key, known_keys))
                elif keys.index(key) != index:
                    self.add(where + (index,), key, "each model at most once per role", source)
            roles[role] = tuple(key for key in keys if isinstance(key, str))
        return FrozenMap(roles)

    def links(self, sections: Mapping[str, object], roles: Mapping[str, object], source_of: SourceOf) -> None:
        """Rules between the settings and the catalog."""
        chat = sections.get("chat")
        if isinstance(chat, ChatConfig) and chat.role not in roles:
            where = ("chat", "role")
            accepted = "a role from the model catalog: " + ", ".join(roles)
            self.add(where, chat.role, accepted, source_of(where), suggestion=_closest(chat.role, roles))

    # shared

    def _mapping(
        self, tree: Mapping[object, object], parts: Parts, source_of: SourceOf, accepted: str
    ) -> Mapping[object, object] | None:
        key = parts[-1]
        if key not in tree:
            self.add(parts, None, accepted, source_of(parts), kind="missing")
            return None
        value = tree[key]
        if not isinstance(value, Mapping):
            self.add(parts, value, accepted, source_of(parts))
            return None
        return value

    def _unknown_keys(
        self,
        raw: Mapping[object, object],
        parts: Parts,
        known: list[str],
        source_of: SourceOf,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        for key in raw:
            if key in known:
                continue
            where = parts + (key,)
            hint = (hints or {}).get(key) if isinstance(key, str) else None
            accepted = hint or "one of " + ", ".join(known)
            suggestion = None if hint else _closest(key, known)
            self.add(where, raw[key], accepted, source_of(where), suggestion=suggestion, kind="unknown_key")


def assemble(
    sections: Mapping[str, Any],
    models: tuple[ModelSpec, ...],
    roles: FrozenMap,
    catalog_path: Path,
    sources: Iterable[str],
    turns: TurnRules | None = None,
) -> MaiConfig:
    """The final tree from checked parts: state-dir-relative paths resolved, null defaults made concrete."""
    system, gpu, logging_, chat = sections["system"], sections["gpu"], sections["logging"], sections["chat"]
    state_dir: Path = system.state_dir
    return MaiConfig(
        system=dataclasses.replace(system, models_file=catalog_path),
        gpu=dataclasses.replace(gpu, simulated_ledger=state_dir / (gpu.simulated_ledger or "sim-gpu.sqlite")),
        ollama=sections["ollama"],
        lmstudio=sections["lmstudio"],
        clip=sections["clip"],
        modes=sections["modes"],
        logging=dataclasses.replace(logging_, file=None if logging_.file is None else state_dir / logging_.file),
        chat=dataclasses.replace(chat, history_db=state_dir / chat.history_db),
        models=models,
        roles=roles,
        turns=turns if turns is not None else TurnRules(),
        sources=tuple(sources),
    )
