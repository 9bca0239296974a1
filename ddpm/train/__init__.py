"""Training: the options, the configured loss, the training state, the monitor and the loop."""

from .config import IMPORTED, LEGACY_RECIPE, LR_SCHEDULES, MACHINE_LOCAL, TrainConfig, config_from_dict, field_type, lr_at
from .loop import TrainOutcome, train
from .loss import DiffusionLoss, t_probabilities_for
from .state import StepResult, StepSettings, TrainState, train_step

__all__ = ["TrainConfig", "train", "TrainOutcome", "train_step", "StepSettings", "StepResult", "config_from_dict", "field_type", "lr_at",
           "t_probabilities_for", "LR_SCHEDULES", "LEGACY_RECIPE", "MACHINE_LOCAL", "IMPORTED", "DiffusionLoss", "TrainState"]
