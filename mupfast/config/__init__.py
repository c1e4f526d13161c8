"""Run configuration: a dataclass per section, YAML files with dotted overrides, and their checks.

* :mod:`~mupfast.config.schema`: the sections and their fields (imports nothing of mupfast).
* :mod:`~mupfast.config.load`: ``load_config(path, overrides)``, overrides, types checked key by key.
* :mod:`~mupfast.config.validate`: the cross-field rules, one section at a time.

Features (fine-tuning) bring their own sections and checks, registered through :mod:`mupfast.plugins`.
"""

from mupfast.config.load import (
    apply_override,
    config_from_dict,
    load_config,
    read_raw_config,
    with_overrides,
)
from mupfast.config.schema import (
    PARAMETRIZATIONS,
    ClipConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    Parametrization,
    ScheduleConfig,
    SourceConfig,
    TrainConfig,
    ZeroConfig,
)
from mupfast.config.validate import validate

__all__ = [
    "PARAMETRIZATIONS",
    "ClipConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "Parametrization",
    "ScheduleConfig",
    "SourceConfig",
    "TrainConfig",
    "ZeroConfig",
    "apply_override",
    "config_from_dict",
    "load_config",
    "read_raw_config",
    "validate",
    "with_overrides",
]
