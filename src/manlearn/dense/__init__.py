"""Local learning beyond classification: detection and segmentation on stage-cut backbones."""
from .learner import DENSE_METHODS, DenseLocalLearner, DenseStepOutput, DenseTask, LocalTaskLoss

__all__ = ["DENSE_METHODS", "DenseLocalLearner", "DenseStepOutput", "DenseTask", "LocalTaskLoss"]
