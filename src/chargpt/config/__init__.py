"""Every option, defined once: the dataclasses (`options`, and `serving` for the server), the
named presets and how the layers of options combine (`presets`), and the outside sources made
from them: TOML files and command-line flags (`sources`).

    from chargpt.config import ModelConfig, TrainConfig, build_configs
"""

from chargpt.config.options import (
    MAX_SEED,
    QUANTIZE_HELP,
    LoadConfig,
    ModelConfig,
    Quantize,
    SampleConfig,
    TrainConfig,
    check_quantize_dtype,
    option,
    parse_duration,
)
from chargpt.config.presets import build_configs
from chargpt.config.serving import ServeConfig
from chargpt.config.sources import from_dict

__all__ = [
    "MAX_SEED",
    "QUANTIZE_HELP",
    "LoadConfig",
    "ModelConfig",
    "Quantize",
    "SampleConfig",
    "ServeConfig",
    "TrainConfig",
    "build_configs",
    "check_quantize_dtype",
    "from_dict",
    "option",
    "parse_duration",
]
