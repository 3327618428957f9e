"""The configuration package: layering (defaults, user file, environment, overrides), every kind of problem
reported with its path, value, accepted text and source, and the frozen tree that comes out."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_MODELS_PATH,
    ConfigError,
    ConfigProblem,
    MaiConfig,
    ModelSpec,
    ModeSpec,
    load_config,
)
from config.schema import SECTIONS
from messages.errors import MaiError, Reason

HOME = "/home/tester"
ENV = {"HOME": HOME}  # never os.environ: a developer's own MAI_* variables must not leak into these tests


def load(*, env: dict[str, str] | None = None, **kwargs: object) -> MaiConfig:
    return load_config(env={**ENV, **(env or {})}, **kwargs)


def problems_of(**kwargs: object) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        load(**kwargs)
    return caught.value.problems


def only_problem(**kwargs: object) -> ConfigProblem:
    problems = problems_of(**kwargs)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def write(tmp_path: Path, text: str, name: str = "user.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def leaf_paths(node: object, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [leaf for key, value in node.items() for leaf in leaf_paths(value, f"{prefix}.{key}" if prefix else key)]


DEFAULT_RAW = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
KNOWN_LEAVES = leaf_paths(DEFAULT_RAW)


# --- defaults ------------------------------------------------------------------------------------------------


def test_defaults_load_with_the_documented_values() -> None:
    cfg = load()
    assert cfg.system.admin_port == 19731
    assert cfg.system.bind_address == "127.0.0.1" and cfg.system.allow_remote is False
    assert cfg.system.state_dir == Path(HOME, ".local/state/mai")
    assert cfg.system.models_file == DEFAULT_MODELS_PATH
    assert cfg.gpu.backend == "nvml" and cfg.gpu.reserve_mb == 512 and cfg.gpu.sample_interval_s == 0.25
    assert cfg.gpu.simulated_ledger == cfg.system.state_dir / "sim-gpu.sqlite"
    assert cfg.ollama.host == "http://127.0.0.1:11434" and cfg.ollama.vlm_model == "qwen2.5vl:7b"
    assert cfg.lmstudio.host == "127.0.0.1:1234" and cfg.lmstudio.api_token is None
    assert cfg.clip.precision == "fp32" and cfg.clip.footprint_mb is None
    assert cfg.modes.default == "idle"
    assert cfg.modes["autopilot"] == ModeSpec(vlm="unloaded", clip="gpu", lease_drain_timeout_s=10, vlm_grace_s=60)
    assert cfg.modes["recording"] == ModeSpec(vlm="loaded", clip="cpu", lease_drain_timeout_s=10, vlm_grace_s=None)
    assert cfg.modes["idle"] == ModeSpec(vlm="keep", clip="keep", lease_drain_timeout_s=10, vlm_grace_s=None)
    assert cfg.logging.file == cfg.system.state_dir / "mai.log"
    assert cfg.chat.history_db == cfg.system.state_dir / "conversation.db"
    assert cfg.chat.role == "chat" and cfg.chat.token_batch_ms == 50
    assert [spec.key for spec in cfg.models] == list(cfg.roles["chat"])
    assert cfg.model("llama3.2:3b") == ModelSpec("llama3.2:3b", "ollama", 2, 8192, 2800, ("chat",))
    assert cfg.sources == (str(DEFAULT_CONFIG_PATH), str(DEFAULT_MODELS_PATH))


def test_default_yaml_has_exactly_the_schema_keys() -> None:
    assert list(DEFAULT_RAW) == list(SECTIONS)
    for name, cls in SECTIONS.items():
        if name == "modes":
            continue
        assert list(DEFAULT_RAW[name]) == [f.name for f in dataclasses.fields(cls)], name
    mode_fields = [f.name for f in dataclasses.fields(ModeSpec)]
    for mode in ("autopilot", "recording", "idle"):
        assert list(DEFAULT_RAW["modes"][mode]) == mode_fields


def test_default_yaml_comments_every_setting() -> None:
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    keyed = [(i, line) for i, line in enumerate(lines) if line.startswith("  ") and not line.startswith("   ")]
    for index, line in keyed:
        if line.strip().startswith("#"):
            continue
        if line.strip().rstrip(":") in ("recording", "idle"):  # the mode table shares one comment block
            continue
        assert lines[index - 1].strip().startswith("#"), f"no comment above {line.strip()!r}"


def test_config_is_frozen_and_pickles() -> None:
    cfg = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gpu.reserve_mb = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.roles["chat"] = ()  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))


def test_model_lookup_names_known_keys_when_absent() -> None:
    with pytest.raises(KeyError, match="qwen2.5-7b-instruct"):
        load().model("gpt-5")


# --- layers --------------------------------------------------------------------------------------------------


def test_user_file_is_deep_merged_onto_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  reserve_mb: 1024\nmodes:\n  autopilot:\n    clip: cpu\n")
    cfg = load(path=path)
    assert cfg.gpu.reserve_mb == 1024 and cfg.gpu.backend == "nvml"
    assert cfg.modes["autopilot"] == ModeSpec(vlm="unloaded", clip="cpu", lease_drain_timeout_s=10, vlm_grace_s=60)
    assert str(path) in cfg.sources


def test_empty_user_file_and_empty_sections_change_nothing(tmp_path: Path) -> None:
    assert load(path=write(tmp_path, "# only comments\n")).to_dict()["gpu"] == load().to_dict()["gpu"]
    assert load(path=write(tmp_path, "gpu:\n  # reserve_mb: 1\n")).gpu == load().gpu


def test_user_may_add_a_mode(tmp_path: Path) -> None:
    cfg = load(path=write(tmp_path, "modes:\n  default: gaming\n  gaming: {vlm: unloaded, clip: cpu}\n"))
    assert cfg.modes.default == "gaming"
    assert cfg.modes["gaming"] == ModeSpec(vlm="unloaded", clip="cpu", lease_drain_timeout_s=10, vlm_grace_s=None)
    assert set(cfg.modes) == {"autopilot", "recording", "idle", "gaming"}


def test_mai_config_names_the_user_file_and_path_argument_wins(tmp_path: Path) -> None:
    from_env = write(tmp_path, "gpu: {reserve_mb: 1}\n", "env.yaml")
    from_arg = write(tmp_path, "gpu: {reserve_mb: 2}\n", "arg.yaml")
    assert load(env={"MAI_CONFIG": str(from_env)}).gpu.reserve_mb == 1
    assert load(env={"MAI_CONFIG": str(from_env)}, path=from_arg).gpu.reserve_mb == 2


def test_user_file_path_expands_home(tmp_path: Path) -> None:
    write(tmp_path, "gpu: {reserve_mb: 3}\n")
    cfg = load_config(path="~/user.yaml", env={"HOME": str(tmp_path)})
    assert cfg.gpu.reserve_mb == 3


def test_missing_user_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    problem = only_problem(env={"MAI_CONFIG": str(missing)})
    assert problem.source == str(missing) and problem.kind == "source"
    assert str(missing) in str(problem) and "not found" in str(problem)


def test_env_overrides_parse_yaml_and_reach_any_depth() -> None:
    env = {
        "MAI_GPU__SAMPLE_INTERVAL_S": "0.5",
        "MAI_GPU__RESERVE_MB": "2048",
        "MAI_LMSTUDIO__ENABLED": "false",
        "MAI_LMSTUDIO__INSTANCE_TTL_S": "600",
        "MAI_CLIP__PRETRAINED": "null",
        "MAI_MODES__AUTOPILOT__CLIP": "cpu",
        "MAI_modes__Recording__VLM_GRACE_S": "3",  # keys are case-insensitive
        "MAI_SOMETHING": "not an override: no double underscore",
        "MAI_CONFIG": "",
    }
    cfg = load(env=env)
    assert cfg.gpu.sample_interval_s == 0.5 and cfg.gpu.reserve_mb == 2048
    assert cfg.lmstudio.enabled is False and cfg.lmstudio.instance_ttl_s == 600
    assert cfg.clip.pretrained is None
    assert cfg.modes["autopilot"].clip == "cpu" and cfg.modes["autopilot"].vlm == "unloaded"
    assert cfg.modes["recording"].vlm_grace_s == 3
    assert "env MAI_GPU__RESERVE_MB" in cfg.sources and "env MAI_SOMETHING" not in cfg.sources


def test_overrides_mapping_applies_last(tmp_path: Path) -> None:
    path = write(tmp_path, "system: {admin_port: 20000}\n")
    env = {"MAI_SYSTEM__ADMIN_PORT": "21000", "MAI_GPU__RESERVE_MB": "7"}
    overrides = {"system.admin_port": 23456, "modes.idle": {"clip": "cpu"}, "system.state_dir": tmp_path}
    cfg = load(path=path, env=env, overrides=overrides)
    assert cfg.system.admin_port == 23456 and cfg.gpu.reserve_mb == 7
    assert cfg.modes["idle"].clip == "cpu" and cfg.modes["idle"].vlm == "keep"
    assert cfg.system.state_dir == tmp_path and cfg.logging.file == tmp_path / "mai.log"
    assert load(path=path, env=env).system.admin_port == 21000


def test_paths_expand_home_and_variables() -> None:
    env = {"MAI_SYSTEM__STATE_DIR": "$DATA/mai", "DATA": "/data", "MAI_LOGGING__FILE": "/var/log/mai.log"}
    cfg = load(env=env)
    assert cfg.system.state_dir == Path("/data/mai")
    assert cfg.logging.file == Path("/var/log/mai.log")  # absolute paths are not moved under state_dir
    assert load(env={"MAI_GPU__SIMULATED_LEDGER": "~/ledger.db"}).gpu.simulated_ledger == Path(HOME, "ledger.db")
    assert load(env={"MAI_LOGGING__FILE": "null"}).logging.file is None


# --- problems ------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("system.admin_port", 80, "an integer from 1024 to 65535"),
    ("system.admin_port", "19731", "an integer from 1024 to 65535"),
    ("system.admin_port", True, "an integer from 1024 to 65535"),
    ("system.bind_address", "localhost", "an IP address"),
    ("system.allow_remote", "yes please", "true or false"),
    ("system.state_dir", "", "a file system path"),
    ("system.ask_timeout_s", 0, "a number > 0"),
    ("gpu.backend", "cuda", "one of nvml, simulated"),
    ("gpu.device", -1, "an integer >= 0 (the NVML index"),
    ("gpu.device", "GPU-12", "an integer >= 0 (the NVML index"),
    ("gpu.device", "MIG-5d1c2f0e-8a3b-4c1d-9e2f-0123456789ab", "an integer >= 0 (the NVML index"),
    ("gpu.device", 1.0, "an integer >= 0 (the NVML index"),
    ("gpu.sample_interval_s", 61, "a number > 0 and <= 60"),
    ("gpu.sample_interval_s", float("nan"), "a number > 0 and <= 60"),
    ("gpu.reserve_mb", 1.5, "an integer >= 0"),
    ("gpu.simulated_total_mb", 100, "an integer >= 256"),
    ("ollama.host", "127.0.0.1:11434", "an http:// or https:// URL"),
    ("ollama.host", "ftp://host", "an http:// or https:// URL"),
    ("ollama.vlm_model", "  ", "an Ollama model name [host[:port]/][namespace/]model[:tag]"),
    ("ollama.vlm_model", "qwen 2.5vl:7b", "an Ollama model name [host[:port]/][namespace/]model[:tag]"),
    ("ollama.vlm_model", "qwen2.5vl:", "an Ollama model name [host[:port]/][namespace/]model[:tag]"),
    ("ollama.vlm_model", "a.b/c.d/vlm:q4", "an Ollama model name [host[:port]/][namespace/]model[:tag]"),
    ("ollama.load_timeout_s", 120.0, "a number >= 300: Ollama sends nothing until a load is done"),
    ("ollama.num_ctx", 128, "an integer from 256 to 1048576"),
    ("ollama.retries", 11, "an integer from 0 to 10"),
    ("ollama.retry_backoff_s", -0.1, "a number >= 0"),
    ("ollama.vram_recovery_fraction", 0, "a number > 0 and <= 1"),
    ("ollama.vram_recovery_fraction", 1.5, "a number > 0 and <= 1"),
    ("lmstudio.instance_ttl_s", 0, "null or a number > 0"),
    ("clip.precision", "int8", "one of fp32, fp16, bf16"),
    ("clip.threads", 0, "null or an integer >= 1"),
    ("clip.footprint_mb", 0, "null or an integer >= 1"),
    ("clip.pretrained", "", "null or a non-empty string"),
    ("modes.autopilot.vlm", "on", "one of loaded, unloaded, keep"),
    ("modes.recording.lease_drain_timeout_s", -1, "a number >= 0"),
    ("modes.idle.vlm_grace_s", "soon", "null or a number >= 0"),
    ("modes.default", "sleep", "one of the mode names: autopilot, recording, idle"),
    ("logging.level", "verbose", "one of debug, info, warning, error"),
    ("logging.console_format", "xml", "one of pretty, json"),
    ("chat.compress_at_fraction", 0, "a number > 0 and <= 1"),
    ("chat.temperature", 2.5, "a number from 0 to 2"),
    ("chat.token_batch_ms", 0, "an integer from 1 to 2000"),
    ("chat.max_tokens", 0, "an integer >= 1"),
    ("chat.role", "summarise", "a role from the model catalog: chat"),
]


@pytest.mark.parametrize(("key", "value", "accepted"), BAD_VALUES)
def test_each_bad_value_is_one_problem_with_path_value_accepted_and_source(key: str, value: object,
                                                                           accepted: str) -> None:
    problem = only_problem(overrides={key: value})
    assert problem.path == key and problem.kind == "value"
    assert problem.value is value or problem.value == value
    assert problem.accepted.startswith(accepted)
    assert problem.source == "override"
    assert str(problem).startswith(f"{key} = {value!r} (from override): accepted: {accepted}")


def test_gpu_device_is_an_index_or_a_uuid_from_any_layer() -> None:
    uuid = "GPU-5d1c2f0e-8a3b-4c1d-9e2f-0123456789ab"
    assert load(overrides={"gpu.device": "GPU-" + uuid[4:].upper()}).gpu.device == uuid
    assert load(overrides={"gpu.device": 1}).gpu.device == 1
    assert load(env={"MAI_GPU__DEVICE": uuid}).gpu.device == uuid
    assert load(env={"MAI_GPU__DEVICE": "2"}).gpu.device == 2
    problem = only_problem(overrides={"gpu.device": uuid[4:]})  # torch's form, without NVML's prefix
    assert problem.suggestion == uuid and "MIG slices are not supported" in problem.accepted


def test_problem_source_names_the_user_file_or_env_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  sample_interval_s: -1\n")
    problem = only_problem(path=path)
    assert (problem.path, problem.value, problem.source) == ("gpu.sample_interval_s", -1, str(path))
    assert str(problem) == f"gpu.sample_interval_s = -1 (from {path}): accepted: a number > 0 and <= 60"
    problem = only_problem(env={"MAI_GPU__SAMPLE_INTERVAL_S": "-1"})
    assert problem.source == "env MAI_GPU__SAMPLE_INTERVAL_S"


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  reserve_mb: -1\n  sampel_interval_s: 1\nclip:\n  precision: fp8\n")
    env = {"MAI_OLLAMA__NUM_CTX": "1", "MAI_CHAT__NOPE": "1"}
    problems = problems_of(path=path, env=env, overrides={"system.admin_port": 1, "logging.level": "loud"})
    assert {p.path for p in problems} == {
        "gpu.reserve_mb", "gpu.sampel_interval_s", "clip.precision", "ollama.num_ctx", "chat.nope",
        "system.admin_port", "logging.level",
    }
    with pytest.raises(ConfigError) as caught:
        load(path=path, env=env, overrides={"system.admin_port": 1, "logging.level": "loud"})
    report = str(caught.value).splitlines()
    assert report[0] == "invalid configuration (7 problems):"
    assert len(report) == 8 and all(line.startswith("  ") for line in report[1:])


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  sampel_interval_s: 1\n")
    problem = only_problem(path=path)
    assert (problem.path, problem.kind, problem.suggestion) == ("gpu.sampel_interval_s", "unknown_key",
                                                                "sample_interval_s")
    assert str(problem).startswith("gpu.sampel_interval_s: unknown key; did you mean 'sample_interval_s'?")
    far = only_problem(overrides={"gpu.zzzz": 1})
    assert far.suggestion is None and "accepted: one of backend, device" in str(far)
    assert only_problem(env={"MAI_GUP__RESERVE_MB": "1"}).suggestion == "gpu"


def test_unknown_key_from_env_is_an_error() -> None:
    problem = only_problem(env={"MAI_OLLAMA__HOSTNAME": "x"})
    assert (problem.path, problem.source, problem.suggestion) == ("ollama.hostname", "env MAI_OLLAMA__HOSTNAME",
                                                                  "host")


def test_close_choice_is_suggested() -> None:
    assert only_problem(overrides={"gpu.backend": "NVML"}).suggestion == "nvml"
    assert only_problem(overrides={"system.bind_address": "localhost"}).suggestion == "127.0.0.1"


def test_misspelt_mode_is_caught_not_added_as_a_new_mode() -> None:
    problem = only_problem(env={"MAI_MODES__AUTOPILTO__CLIP": "cpu"})
    assert (problem.path, problem.suggestion) == ("modes.autopilto", "autopilot")


def test_new_mode_must_set_vlm_and_clip() -> None:
    problem = only_problem(overrides={"modes.gaming": {"clip": "cpu"}})
    assert (problem.path, problem.kind) == ("modes.gaming.vlm", "missing")


def test_env_value_that_is_not_yaml_is_a_problem() -> None:
    problem = only_problem(env={"MAI_CHAT__SYSTEM_PROMPT": "[unclosed"})
    assert problem.path == "chat.system_prompt" and problem.value == "[unclosed"
    assert "YAML" in problem.accepted


def test_yaml_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  reserve_mb: 1\n  backend: [nvml\nclip: {}\n")
    problem = only_problem(path=path)
    assert problem.kind == "source" and problem.source == str(path) and problem.line is not None
    assert f"{path}, line {problem.line}: YAML syntax error" in str(problem)
    problem = only_problem(path=write(tmp_path, "gpu:\n  reserve_mb: 1\n backend: nvml\n"))
    assert problem.line == 3


def test_syntax_error_does_not_hide_other_problems(tmp_path: Path) -> None:
    problems = problems_of(path=write(tmp_path, "gpu: [\n"), overrides={"gpu.reserve_mb": -1})
    assert [p.kind for p in problems] == ["source", "value"]


def test_duplicate_key_in_a_file_is_a_problem(tmp_path: Path) -> None:
    problem = only_problem(path=write(tmp_path, "gpu:\n  reserve_mb: 1\ngpu:\n  backend: simulated\n"))
    assert problem.kind == "source" and problem.line == 3 and "duplicate key 'gpu'" in str(problem)


@pytest.mark.parametrize("text", ["- gpu\n- clip\n", "42\n", "just words\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    problem = only_problem(path=path)
    assert problem.path == "" and problem.source == str(path) and "a mapping of sections" in problem.accepted
    assert str(problem).startswith("(top level) = ")


def test_section_must_be_a_mapping() -> None:
    problem = only_problem(overrides={"gpu": 5})
    assert (problem.path, problem.value) == ("gpu", 5)


def test_non_loopback_bind_is_refused_unless_remote_is_allowed() -> None:
    problem = only_problem(overrides={"system.bind_address": "0.0.0.0"})
    assert problem.path == "system.bind_address" and "unpickles" in problem.accepted
    assert load(overrides={"system.bind_address": "0.0.0.0", "system.allow_remote": True}).system.allow_remote
    assert load(overrides={"system.bind_address": "::1"}).system.bind_address == "::1"


def test_an_allowed_remote_bind_comes_with_a_warning_that_explains_the_risk() -> None:
    assert load().system.exposure_warning() is None
    assert load(overrides={"system.bind_address": "::1", "system.allow_remote": True}).system.exposure_warning() is None
    exposed = load(overrides={"system.bind_address": "0.0.0.0", "system.allow_remote": True}).system
    warning = exposed.exposure_warning()
    assert "0.0.0.0" in warning and str(exposed.admin_port) in warning and "reachable from other hosts" in warning
    assert "no authentication" in warning and "stop Mai" in warning and "firewall" in warning


def test_relation_problems_are_found_alongside_field_problems() -> None:
    problems = problems_of(overrides={"system.admin_port": 1, "system.bind_address": "10.0.0.1",
                                      "system.restart_backoff_max_s": 0.1, "ollama.probe_backoff_max_s": 0.5})
    assert {p.path for p in problems} == {"system.admin_port", "system.bind_address",
                                          "system.restart_backoff_max_s", "ollama.probe_backoff_max_s"}


@pytest.mark.parametrize(("host", "suggestion"), [("http://127.0.0.1:1234", "127.0.0.1:1234"),
                                                  ("ws://studio:1234/api", "studio:1234"),
                                                  ("127.0.0.1", None), ("host:99999", None)])
def test_lmstudio_host_must_be_host_and_port_without_scheme(host: str, suggestion: str | None) -> None:
    problem = only_problem(overrides={"lmstudio.host": host})
    assert problem.path == "lmstudio.host" and problem.suggestion == suggestion
    assert "no scheme" in problem.accepted and "http://" in problem.accepted


def test_secret_is_redacted_in_problems_repr_and_to_dict() -> None:
    problem = only_problem(overrides={"lmstudio.api_token": ["hunter2"]})
    assert problem.value == "***" and "hunter2" not in str(problem)
    # A token is refused (the lmstudio SDK cannot send one), and the refusal does not echo it either.
    refused = only_problem(env={"MAI_LMSTUDIO__API_TOKEN": "hunter2"})
    assert refused.path == "lmstudio.api_token" and "cannot send an API token" in refused.accepted
    assert refused.value == "***" and "hunter2" not in str(refused) and "hunter2" not in json.dumps(refused.to_dict())
    base = load()
    cfg = dataclasses.replace(base, lmstudio=dataclasses.replace(base.lmstudio, api_token="hunter2"))
    assert "hunter2" not in repr(cfg)
    plain = cfg.to_dict()
    assert plain["lmstudio"]["api_token"] == "***" and "hunter2" not in json.dumps(plain)
    assert base.to_dict()["lmstudio"]["api_token"] is None


@pytest.mark.parametrize(("key", "value", "shown", "suggestion"), [
    ("ollama.host", "http://bob:hunter2@127.0.0.1:11434", "http://***@127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("lmstudio.host", "bob:hunter2@127.0.0.1:1234", "***@127.0.0.1:1234", "127.0.0.1:1234"),
    ("lmstudio.host", "ws://bob:hunter2@studio:1234/x", "***@studio:1234", "studio:1234"),
    ("ollama.host", "http://bob:hunter2@127.0.0.1:99999", "***", None),
])
def test_credentials_in_a_host_are_refused_without_echoing_them(key: str, value: str, shown: str,
                                                                suggestion: str | None) -> None:
    problem = only_problem(overrides={key: value})
    assert (problem.path, problem.value, problem.suggestion) == (key, shown, suggestion)
    assert "user:password@" in problem.accepted and "hunter2" not in str(problem)


def test_to_dict_is_plain_json_in_the_yaml_layout(tmp_path: Path) -> None:
    cfg = load(overrides={"modes.gaming": {"vlm": "keep", "clip": "cpu"}})
    plain = json.loads(json.dumps(cfg.to_dict()))
    assert plain["system"]["state_dir"] == str(cfg.system.state_dir)
    assert plain["modes"]["default"] == "idle" and plain["modes"]["gaming"]["clip"] == "cpu"
    assert plain["models"][0]["capabilities"] == ["chat", "tools"]
    assert plain["roles"]["chat"][0] == "qwen2.5-7b-instruct"
    settings_only = {name: plain[name] for name in SECTIONS}
    again = load(path=write(tmp_path, yaml.safe_dump(settings_only)))
    assert [getattr(again, name) for name in SECTIONS] == [getattr(cfg, name) for name in SECTIONS]


def test_config_error_is_a_mai_error_that_pickles_with_its_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        load(overrides={"gpu.reserve_mb": -1, "gpu.backend": "x"})
    error = caught.value
    assert isinstance(error, MaiError) and error.reason is Reason.INVALID_CONFIG
    assert str(error).splitlines()[0] == "invalid configuration (2 problems):"
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == str(error) and copy.reason is Reason.INVALID_CONFIG
    json.dumps(error.details)


# --- the catalog ---------------------------------------------------------------------------------------------

CATALOG = """
models:
  - {key: big, backend: lmstudio, tier: 3, context_window: 32768, footprint_mb: 5600, capabilities: [chat, tools]}
  - {key: small, backend: ollama, tier: 1, context_window: 4096, footprint_mb: 800, capabilities: [chat]}
roles:
  chat: [big, small]
"""


def test_catalog_file_replaces_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, CATALOG, "models.yaml")
    cfg = load(overrides={"system.models_file": str(path)})
    assert [spec.key for spec in cfg.models] == ["big", "small"] and cfg.roles["chat"] == ("big", "small")
    assert cfg.system.models_file == path and str(path) in cfg.sources


@pytest.mark.parametrize(
    ("edit", "path", "value"),
    [
        (("backend: ollama", "backend: vllm"), "models[1].backend", "vllm"),
        (("tier: 1", "tier: -1"), "models[1].tier", -1),
        (("context_window: 4096", "context_window: 100"), "models[1].context_window", 100),
        (("footprint_mb: 800", "footprint_mb: 0"), "models[1].footprint_mb", 0),
        (("[chat]}", "[chat, vison]}"), "models[1].capabilities", ["chat", "vison"]),
        (("key: small", "key: big"), "models[1].key", "big"),
        (("key: small", "key: ''"), "models[1].key", ""),
        (("[big, small]", "[big, smal]"), "roles.chat[1]", "smal"),
        (("[big, small]", "[]"), "roles.chat", []),
        (("[big, small]", "[big, big]"), "roles.chat[1]", "big"),
    ],
)
def test_catalog_problems(tmp_path: Path, edit: tuple[str, str], path: str, value: object) -> None:
    catalog = write(tmp_path, CATALOG.replace(*edit), "models.yaml")
    problems = problems_of(overrides={"system.models_file": str(catalog)})
    assert path in {p.path for p in problems}, problems
    problem = next(p for p in problems if p.path == path)
    assert problem.value == value and problem.source == str(catalog)


def test_role_with_unknown_model_suggests_the_close_key(tmp_path: Path) -> None:
    catalog = write(tmp_path, CATALOG.replace("[big, small]", "[big, smal]"), "models.yaml")
    problem = only_problem(overrides={"system.models_file": str(catalog)})
    assert (problem.path, problem.suggestion) == ("roles.chat[1]", "small")
    assert "a model key from models: big, small" in problem.accepted


def test_chat_role_must_exist_in_the_catalog(tmp_path: Path) -> None:
    catalog = write(tmp_path, CATALOG.replace("chat: [big", "talk: [big"), "models.yaml")
    problem = only_problem(overrides={"system.models_file": str(catalog)})
    assert (problem.path, problem.value, problem.suggestion) == ("chat.role", "chat", None)
    assert "talk" in problem.accepted


def test_missing_catalog_file_is_a_problem_of_models_file(tmp_path: Path) -> None:
    problem = only_problem(env={"MAI_SYSTEM__MODELS_FILE": str(tmp_path / "none.yaml")})
    assert problem.path == "system.models_file" and problem.source == "env MAI_SYSTEM__MODELS_FILE"
    assert "not found" in problem.accepted


def test_catalog_keys_in_the_settings_point_at_models_file() -> None:
    problem = only_problem(overrides={"roles.chat": ["x"]})
    assert problem.path == "roles" and problem.kind == "unknown_key" and "system.models_file" in problem.accepted


# --- junk anywhere -------------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def env_name(key: str) -> str:
    return "MAI_" + "__".join(part.upper() for part in key.split("."))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    injected=st.lists(
        st.tuples(st.sampled_from(KNOWN_LEAVES), st.booleans(), JUNK, st.text(max_size=12)),
        min_size=1,
        max_size=4,
        unique_by=lambda item: item[0],
    )
)
def test_junk_at_known_keys_gives_a_config_or_problems_at_real_keys(
    injected: list[tuple[str, bool, object, str]],
) -> None:
    overrides = {key: junk for key, via_env, junk, _ in injected if not via_env}
    env = {env_name(key): text for key, via_env, _, text in injected if via_env}
    try:
        cfg = load(env=env, overrides=overrides)
    except ConfigError as error:
        assert error.problems
        assert {problem.path for problem in error.problems} <= set(KNOWN_LEAVES), str(error)
        assert str(error).startswith(f"invalid configuration ({len(error.problems)} problem")
    else:
        json.dumps(cfg.to_dict())
