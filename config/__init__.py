"""Mai's configuration: `load_config()` merges `default.yaml`, one user file, `MAI_<SECTION>__<KEY>` environment
variables and explicit overrides, checks the result against `config.schema`, and returns a frozen `MaiConfig`
or raises one `ConfigError` that lists every problem with its dotted path, the value, what is accepted and where
the value came from."""

from config.loader import DEFAULT_CONFIG_PATH, DEFAULT_MODELS_PATH, load_config
from config.schema import (
    ChatConfig,
    ClipConfig,
    ConfigError,
    ConfigProblem,
    FrozenMap,
    GpuConfig,
    LmStudioConfig,
    LoggingConfig,
    MaiConfig,
    ModelSpec,
    ModesConfig,
    ModeSpec,
    OllamaConfig,
    SystemConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MODELS_PATH",
    "ChatConfig",
    "ClipConfig",
    "ConfigError",
    "ConfigProblem",
    "FrozenMap",
    "GpuConfig",
    "LmStudioConfig",
    "LoggingConfig",
    "MaiConfig",
    "ModeSpec",
    "ModelSpec",
    "ModesConfig",
    "OllamaConfig",
    "SystemConfig",
    "load_config",
]
