"""Typed configuration: dataclass schema, presets, YAML + ``key=value`` loading and validation."""
from .loader import ConfigError, field_help, from_dict, load_config, to_dict, to_yaml, validate
from .schema import HeptapodConfig
from .presets import PRESETS

__all__ = ["ConfigError", "HeptapodConfig", "PRESETS", "field_help", "from_dict", "load_config", "to_dict",
           "to_yaml", "validate"]
