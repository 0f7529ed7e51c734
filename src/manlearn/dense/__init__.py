"""Local learning beyond classification: detection and segmentation on stage-cut backbones."""
from .config import DenseConfig, load_dense_config, validate_dense
from .learner import DENSE_METHODS, DenseLocalLearner, DenseStepOutput, DenseTask, LocalTaskLoss
from .trainer import DenseTrainer, evaluate_checkpoint

__all__ = ["DENSE_METHODS", "DenseLocalLearner", "DenseStepOutput", "DenseTask", "LocalTaskLoss",
           "DenseConfig", "load_dense_config", "validate_dense", "DenseTrainer", "evaluate_checkpoint"]
