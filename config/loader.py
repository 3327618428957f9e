"""Where configuration values come from, in the order they apply:

1. `config/default.yaml` (every key, with comments: the file users copy);
2. one user file: the `path` argument, else the file named by `MAI_CONFIG`; deep-merged, so it holds only the keys
   it changes (an empty section, `gpu:` with everything commented out, changes nothing);
3. environment variables `MAI_<SECTION>__<KEY>[__<KEY>...]`, keys case-insensitive, values read as YAML;
4. `overrides`, a mapping of dotted keys (`{"system.admin_port": 23456}`) from tests and the CLI;

then the model catalog (`config/models.yaml`, or `system.models_file`). Each value remembers which layer set it,
so a problem can say "(from env MAI_GPU__RESERVE_MB)". Checking is `config.schema`'s job; this module collects
every problem from both and raises one `ConfigError` listing them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from config.schema import Checker, ConfigError, ConfigProblem, MaiConfig, Parts, assemble, dotted, expand_path

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")
DEFAULT_MODELS_PATH = Path(__file__).with_name("models.yaml")
CONFIG_FILE_ENV = "MAI_CONFIG"
ENV_PREFIX = "MAI_"
ENV_SEPARATOR = "__"
DEFAULT_SOURCE = "default"
OVERRIDE_SOURCE = "override"

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Bounds on a parsed document: merging and reporting walk it recursively, and aliases may make it cyclic
# (`a: &x [*x]`) or expand exponentially ("billion laughs") although the text is small.
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_FILE_BYTES = 1 << 20  # a config or catalog is a few KiB; this stops `--config /dev/zero` reading forever
_SHAPE_ACCEPTED = f"a document at most {MAX_DEPTH} levels deep with at most {MAX_VALUES} values, no alias inside itself"


class _StrictLoader(_BaseLoader):
    """SafeLoader that notes duplicate keys: PyYAML would silently keep the last one, hiding half a section."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[object, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, source: str) -> tuple[object, list[ConfigProblem]]:
    """The parsed document (None when empty) and the problems reading it; never raises for a bad file."""
    accepted = "a readable YAML file"
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            return None, [ConfigProblem("", f"larger than {MAX_FILE_BYTES} bytes", accepted, source=source,
                                        kind="source")]
        text = raw.decode("utf-8")
    except FileNotFoundError:
        return None, [ConfigProblem("", "file not found", accepted, source=source, kind="source")]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, [ConfigProblem("", f"cannot read: {reason}", accepted, source=source, kind="source")]
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        where = f" (column {mark.column + 1})" if mark is not None else ""
        what = f"YAML syntax error: {getattr(exc, 'problem', None) or exc}{where}"
        return None, [ConfigProblem("", what, "valid YAML", source=source, kind="source", line=line)]
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        return None, [ConfigProblem("", f"cannot read a value: {exc}", "valid YAML", source=source, kind="source")]
    finally:
        loader.dispose()
    shape = shape_problem(data)
    if shape is not None:
        return None, [ConfigProblem("", shape, _SHAPE_ACCEPTED, source=source, kind="source")]
    problems = [
        ConfigProblem("", f"duplicate key {key!r} (only the last one would count)", "each key once per mapping",
                      source=source, kind="source", line=line)
        for key, line in loader.duplicates
    ]
    return data, problems


def shape_problem(data: object) -> str | None:
    """What makes a parsed document unsafe to walk (too deep, cyclic, too many values), or None. Iterative, so
    it cannot itself run out of stack."""
    stack: list[tuple[object, int]] = [(data, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"more than {MAX_VALUES} values once aliases are expanded"
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep (or an alias that contains itself)"
        if isinstance(node, Mapping):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in node)
    return None


class _Layers:
    """The merged raw tree, the layer that set each part of it, and the problems met while merging."""

    def __init__(self) -> None:
        self.tree: dict[object, object] = {}
        self.origin: dict[Parts, str] = {(): DEFAULT_SOURCE}
        self.applied: list[str] = []
        self.problems: list[ConfigProblem] = []

    def source_of(self, parts: Parts) -> str:
        for end in range(len(parts), -1, -1):
            if parts[:end] in self.origin:
                return self.origin[parts[:end]]
        return DEFAULT_SOURCE

    def apply_file(self, path: Path, source: str) -> None:
        data, problems = read_yaml(path, source)
        self.problems.extend(problems)
        if problems and data is None:
            return
        self.applied.append(str(path))
        if data is None:  # an empty file, or one that is all comments
            return
        if not isinstance(data, Mapping):
            self.problems.append(ConfigProblem("", data, "a mapping of sections (system:, gpu:, ...)", None, source))
            return
        for key, value in data.items():
            self.merge((key,), value, source)

    def apply_env(self, name: str, text: str) -> None:
        source = f"env {name}"
        parts = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_SEPARATOR))
        if not all(parts):
            accepted = f"{ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY> with no empty part"
            self.problems.append(ConfigProblem("", "malformed override name", accepted, source=source, kind="source"))
            return
        try:
            value = yaml.load(text, Loader=_BaseLoader)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            accepted = f"a YAML value; quote text that YAML would misread ({getattr(exc, 'problem', None) or exc})"
            self.problems.append(ConfigProblem(dotted(parts), text, accepted, None, source))
            return
        shape = shape_problem(value)
        if shape is not None:
            self.problems.append(ConfigProblem(dotted(parts), text, f"{_SHAPE_ACCEPTED} (this one is {shape})", None,
                                               source))
            return
        self.applied.append(source)
        self.merge(parts, value, source)

    def apply_override(self, key: object, value: object) -> None:
        parts = tuple(key.split(".")) if isinstance(key, str) else ()
        if not all(parts) or not parts:
            accepted = "a dotted key such as system.admin_port"
            self.problems.append(ConfigProblem("", f"malformed key {key!r}", accepted, source=OVERRIDE_SOURCE,
                                               kind="source"))
            return
        self.merge(parts, value, OVERRIDE_SOURCE)

    def merge(self, parts: Parts, value: object, source: str) -> None:
        """Sets `value` at `parts`; a mapping merges into a mapping already there, anything else replaces it."""
        node = self.tree
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
                self._mark(parts[:depth], source)
            node = child
        existing = node.get(parts[-1])
        if isinstance(existing, dict) and isinstance(value, Mapping):
            for key, item in value.items():
                self.merge(parts + (key,), item, source)
        elif not (isinstance(existing, dict) and value is None):  # `gpu:` with all keys commented out
            node[parts[-1]] = _copy(value)
            self._mark(parts, source)

    def _mark(self, parts: Parts, source: str) -> None:
        for known in [known for known in self.origin if known[: len(parts)] == parts]:
            del self.origin[known]
        self.origin[parts] = source


def _copy(value: object) -> object:
    """Our own copy of mappings and lists, so later layers never write into a caller's objects."""
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> MaiConfig:
    """Loads, merges and checks the configuration; raises `ConfigError` listing every problem found."""
    env = os.environ if env is None else env
    layers = _Layers()
    layers.apply_file(DEFAULT_CONFIG_PATH, DEFAULT_SOURCE)
    user_file = path if path is not None else env.get(CONFIG_FILE_ENV) or None
    if user_file is not None:
        user_path = expand_path(os.fspath(user_file), env)
        layers.apply_file(user_path, str(user_path))
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and ENV_SEPARATOR in name:
            layers.apply_env(name, env[name])
    for key, value in (overrides or {}).items():
        layers.apply_override(key, value)
    if overrides:
        layers.applied.append(OVERRIDE_SOURCE)

    checker = Checker(env)
    sections = checker.settings(layers.tree, layers.source_of)
    catalog = None
    models_file_at = ("system", "models_file")
    if models_file_at in checker.passed:  # a bad models_file is already a problem; reading it would add noise
        chosen = checker.passed[models_file_at]
        catalog_path = chosen if isinstance(chosen, Path) else DEFAULT_MODELS_PATH
        catalog_source = DEFAULT_SOURCE if chosen is None else str(catalog_path)
        data, problems = read_yaml(catalog_path, catalog_source)
        if problems and data is None and chosen is not None:
            accepted = f"null or a readable model catalog file ({problems[0].value})"
            checker.add(models_file_at, str(chosen), accepted, layers.source_of(models_file_at))
        else:
            checker.problems.extend(problems)
            catalog = checker.catalog(data, catalog_source)
            layers.applied.append(str(catalog_path))
    if catalog is not None:
        checker.links(sections, catalog[1], layers.source_of)
    if checker.problems or layers.problems:
        raise ConfigError(layers.problems + checker.problems)
    models, roles, turns = catalog
    return assemble(sections, models, roles, catalog_path, layers.applied, turns)
