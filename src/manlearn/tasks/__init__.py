"""Tasks: what a network is trained for (final head, loss, predict, the local head a rule may ask for).

``ClassificationTask`` is the default of :class:`~manlearn.LocalLearner`; ``RetinaNetTask`` (detection)
and ``DeepLabV3Task`` (segmentation) read every stage of the backbone. Any object with the members of
:class:`Task` is a task.
"""
from ..detection.retinanet import RetinaNetTask
from ..segmentation.deeplab import DeepLabV3Task
from .base import READS, Task, check_task, loss_precision
from .classification import ClassificationTask, LinearProbe

__all__ = ["Task", "check_task", "loss_precision", "READS", "ClassificationTask", "LinearProbe",
           "RetinaNetTask", "DeepLabV3Task"]
