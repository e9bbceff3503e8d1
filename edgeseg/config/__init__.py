"""Typed experiment configuration, loaded from YAML and validated once."""

from edgeseg.config.loader import apply_overrides, from_dict, read_yaml, to_dict
from edgeseg.config.schema import (
    AugmentConfig,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    MetadataConfig,
    ModalitiesConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    load_experiment,
)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "MetadataConfig",
    "ModalitiesConfig",
    "ModelConfig",
    "QuantConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_experiment",
    "read_yaml",
    "to_dict",
]
