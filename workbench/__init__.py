"""RIS covariance-learning workbench: a thin package behind the notebooks in ``notebooks/``."""

from .config import ConfigError, ExperimentConfig, FixConfig, LossWeights, ModelConfig, SystemConfig, TrainConfig, preset

__version__ = "0.1.0"

__all__ = ["ConfigError", "ExperimentConfig", "FixConfig", "LossWeights", "ModelConfig", "SystemConfig", "TrainConfig", "preset"]
