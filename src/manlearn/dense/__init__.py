"""Local learning beyond classification: detection and segmentation on stage-cut backbones.

Dense runs are configured by :class:`manlearn.config.TrainConfig` with a ``task:`` section and trained by
:class:`manlearn.train.Trainer`; ``DenseTrainer`` is a deprecated alias.
"""
from .learner import DENSE_METHODS, DenseLocalLearner, DenseStepOutput, DenseTask, LocalTaskLoss
from .trainer import DenseTrainer, evaluate_checkpoint

__all__ = ["DENSE_METHODS", "DenseLocalLearner", "DenseStepOutput", "DenseTask", "LocalTaskLoss",
           "DenseTrainer", "evaluate_checkpoint"]
