"""Config classes (fields = config.json keys), their validation, AutoConfig and the named configs."""
from .base import (
                   CONFIG_CLASSES,
                   DTYPES,
                   AutoConfig,
                   PretrainedConfig,
                   config_class_for,
                   dtype_from_str,
                   read_config_json,
                   read_json_object,
)
from .families import Ernie4_5_MoeConfig, Ernie4_5Config, PhimoeConfig
from .named import NAMED_CONFIGS, named_config

__all__ = ["AutoConfig", "CONFIG_CLASSES", "DTYPES", "Ernie4_5Config", "Ernie4_5_MoeConfig", "NAMED_CONFIGS",
           "PhimoeConfig", "PretrainedConfig", "config_class_for", "dtype_from_str", "named_config",
           "read_config_json", "read_json_object"]
