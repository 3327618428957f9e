"""Ollama model names as the Ollama server resolves them, so Mai, its config check and the Ollama double agree with
the real server on which spellings name one model.

Mirrors `ollama/ollama@fb30760:types/model/name.go`: `ParseNameBare` (lines 146-176) cuts `[host/][namespace/]
model[:tag]` from the right (the tag only after the last "/", so `myhost:5000/team/vlm:q4` has a host with a port),
`Merge` with `DefaultName` (39-59, 199-207) fills `registry.ollama.ai`, `library` and `latest`, `IsValid` checks
every part (257-281, 333-376), `EqualFold` (309-314) compares case-insensitively, and `DisplayShortest` (230-249)
is what /api/ps and /api/tags print. `modelref.ParseRef` (`internal/modelref/modelref.go:28-48, 99-118`) trims
spaces and drops a `:local` source suffix first. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from messages.errors import InvalidRequest

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MISSING_PART = "!MISSING!"  # name.go:36: a part promised by its separator but empty; never valid

ACCEPTED = (
    "an Ollama model name [host[:port]/][namespace/]model[:tag] such as qwen2.5vl:7b, library/qwen2.5vl:7b, "
    "registry.ollama.ai/library/qwen2.5vl:7b or myhost:5000/team/vlm:q4: each part starts with a letter, digit "
    "or _ and holds letters, digits, _, - and . (no . in a namespace; : only in the host); case does not matter"
)


@dataclass(frozen=True)
class OllamaName:
    """A fully qualified name, spelled as given (Ollama keeps the case and compares without it)."""

    host: str
    namespace: str
    model: str
    tag: str

    def key(self) -> tuple[str, str, str, str]:
        """Equal for names Ollama treats as one model (`EqualFold`: ASCII case folding, the only letters allowed)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def display_shortest(self) -> str:
        """What /api/ps and /api/tags print: the default host and namespace left out, the tag always shown."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def parse_ollama_name(text: object) -> OllamaName:
    """The name Ollama would resolve `text` to; InvalidRequest naming the fault where Ollama answers
    400 "invalid model name"."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"Ollama model name must be a non-empty string, got {text!r}; accepted: {ACCEPTED}")
    raw = text.strip()
    if raw.lower().endswith(":local"):  # modelref.parseSourceSuffix: an explicit "run it here"
        raw = raw[: -len(":local")]
    host = namespace = tag = ""
    rest = raw
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = _cut_promised(rest, ":")
    rest, model, promised = _cut_last(rest, "/")
    if not promised:
        model = rest
    else:
        rest, namespace, promised = _cut_last(rest, "/")
        if not promised:
            namespace = rest
        else:
            scheme, sep, after = rest.partition("://")
            host = after if sep else scheme
    name = OllamaName(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG)
    for kind, part in (("host", name.host), ("namespace", name.namespace), ("model", name.model), ("tag", name.tag)):
        problem = _part_problem(kind, part)
        if problem:
            raise InvalidRequest(f"{text!r} is not a valid Ollama model name: {problem}; accepted: {ACCEPTED}")
    return name


def canonical_ollama_name(text: str) -> str:
    """The shortest display form, as /api/ps would list `text` (case as given)."""
    return parse_ollama_name(text).display_shortest()


def same_ollama_model(a: str, b: str) -> bool:
    """Whether Ollama resolves both names to one model; a malformed name matches nothing."""
    try:
        return parse_ollama_name(a).key() == parse_ollama_name(b).key()
    except InvalidRequest:
        return False


def _cut_last(text: str, sep: str) -> tuple[str, str, bool]:
    """name.go cutPromised: split at the last `sep`; an empty side becomes MISSING_PART."""
    before, found, after = text.rpartition(sep)
    if not found:
        return text, "", False
    return before or MISSING_PART, after or MISSING_PART, True


def _cut_promised(text: str, sep: str) -> tuple[str, str]:
    before, after, _ = _cut_last(text, sep)
    return before, after


def _part_problem(kind: str, part: str) -> str | None:
    """name.go isValidPart / isValidLen: why `part` is not a valid `kind`, or None."""
    if part == MISSING_PART:
        return f"the {kind} is empty"
    limit = 350 if kind == "host" else 80
    if not 1 <= len(part) <= limit:
        return f"the {kind} must be 1 to {limit} characters, got {len(part)}"
    if not _word(part[0]):
        return f"the {kind} {part!r} must start with a letter, digit or _"
    for c in part[1:]:
        if c in "_-" or _word(c):
            continue
        if c == "." and kind != "namespace":
            continue
        if c == ":" and kind == "host":
            continue
        return f"the {kind} {part!r} may not contain {c!r}"
    return None


def _word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")
